"""``cbmir library``: what a curated collection must look like, and what it may not carry."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.core.errors import InvalidInput
from services.ingest.library import check_finding
from services.ops.report import Card, QuerySection, write_report
from tests import support


def _cbmir(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(support.CBMIR), *args], env=env, capture_output=True, text=True, timeout=300)


def _library(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "label", "split"])
        for name, modality, label in rows:
            if not name.startswith(("..", "missing")):
                picture = np.random.default_rng(len(name)).integers(0, 255, (32, 32), dtype=np.uint8)
                Image.fromarray(picture).save(folder / name)
            writer.writerow([name, modality, label, "train"])
    return folder


@pytest.mark.parametrize(
    "label, expected",
    [
        ("glioma", "glioma"),
        ("Interictal_Focal", "interictal_focal"),
        ("cnv", "cnv"),
        ("no-tumor", "no-tumor"),
    ],
)
def test_finding_labels_are_short_terms(label, expected):
    assert check_finding(label) == expected


@pytest.mark.parametrize(
    "label",
    ["", "John Smith, 12 Main St.", "patient_john_smith_has_pneumonia", "<b>x</b>", "1234567", "a" * 33],
)
def test_free_text_is_not_a_finding(label):
    with pytest.raises(InvalidInput):
        check_finding(label)


def test_import_records_findings_and_refuses_what_it_must(tmp_path, data_dir):
    env = support.base_env(data_dir)
    (tmp_path / "outside.png").write_bytes(b"")
    folder = _library(
        tmp_path / "lib",
        [
            ("a.png", "mri", "glioma"),
            ("b.png", "mri", "Pituitary"),
            ("c.png", "xray", "Patient John Smith has pneumonia"),  # free text: refused
            ("../outside.png", "mri", "glioma"),  # out of the folder: refused
            ("missing.png", "mri", "glioma"),  # no such file
        ],
    )
    result = _cbmir(env, "library", "import", str(folder))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "5 cases: 2 sent to the workers" in result.stdout and "3 failed" in result.stdout
    assert "John" not in result.stdout + result.stderr
    listed = json.loads(_cbmir(env, "library", "list").stdout)
    assert listed == {"total": 2, "findings": {"mri": {"glioma": 1, "pituitary": 1}}}
    assert len(list((data_dir / "spool" / "incoming").iterdir())) == 2  # spooled for the workers

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.csv").write_text("name,kind\nx,y\n")
    refused = _cbmir(env, "library", "import", str(bad))
    assert refused.returncode == 2 and "path (or file), modality and label" in refused.stderr
    budget = _cbmir(env, "library", "import", str(folder), "--max-file-mb", "0")
    assert budget.returncode == 1 and "5 failed" in budget.stdout


def test_the_report_escapes_what_it_shows(tmp_path):
    page = write_report(
        tmp_path / "r.html",
        "<script>alert(1)</script>",
        [
            QuerySection(
                Card(None, "q <img src=x onerror=alert(1)>"), [Card(b"\x89PNG", "#1", ["finding: <b>"])]
            )
        ],
    )
    text = page.read_text()
    assert "<script>alert" not in text and "<img src=x" not in text and "&lt;b&gt;" in text
    assert "data:image/png;base64," in text
