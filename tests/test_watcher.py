"""``cbmir watch`` end to end: real watcher, real Celery worker (embedded broker), real query service.

One stack per module (the processes are the expensive part); each test drops its own files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import CBMIR, SHARED_DATA, Proc, base_env, start_query, start_worker, wait_until

SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
ROUTINE_SCALP_EEG = "1.2.840.10008.5.1.4.1.1.9.7.1"
BONN_HZ = 173.61
SETTLE_S = 1.0


def start_watcher(env: dict[str, str], watch_dir: Path) -> Proc:
    proc = Proc("watch", [str(CBMIR), "watch", str(watch_dir)], env)
    proc.wait_for(r"cbmir watch: watching ")
    return proc


class Stack:
    def __init__(self, root: Path):
        self.data = root / "data"
        self.watch = root / "in"
        self.env = base_env(self.data)
        self.query, port = start_query(self.env)
        self.worker = start_worker(self.env, port)
        self.watcher = start_watcher(self.env, self.watch)
        from services.query.client import SearchClient

        self.client = SearchClient(f"127.0.0.1:{port}")
        self.client.wait_ready()

    @property
    def archive(self) -> Path:
        return self.data / "archive"

    @property
    def quarantine(self) -> Path:
        return self.data / "quarantine"

    def quarantine_reasons(self) -> dict[str, str]:
        """quarantined file name -> reason."""
        return {
            json.loads(p.read_text())["name"]: json.loads(p.read_text())["reason"]
            for p in self.quarantine.glob("*.reason.json")
        }

    def processes(self) -> list[Proc]:
        return [self.query, self.worker, self.watcher]

    def stop(self) -> None:
        self.client.close()
        for proc in (self.watcher, self.worker, self.query):
            proc.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("watch"))
    yield stack
    stack.stop()


# --- inputs --------------------------------------------------------------------------------------


def synthetic_picture(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    picture = 127 + 100 * np.sin(x / (3 + seed % 5)) * np.cos(y / (4 + seed % 3))
    return np.clip(picture + rng.normal(0, 10, picture.shape), 0, 255).astype(np.uint8)


def png_bytes(picture: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def eeg_signal() -> tuple[np.ndarray, float, str]:
    """A Bonn segment from the shared data when present, else a synthetic one (µV, Hz, what)."""
    manifest = SHARED_DATA / "manifest.csv"
    if manifest.exists():
        for line in manifest.read_text().splitlines()[1:]:
            path, modality = line.split(",")[:2]
            if modality == "eeg":
                return np.loadtxt(SHARED_DATA / path), BONN_HZ, path
    t = np.arange(4097) / BONN_HZ
    return (80 * np.sin(2 * np.pi * 10 * t) + 30 * np.sin(2 * np.pi * 3 * t)).round(), BONN_HZ, "synthetic"


def write_edf(path: Path, samples_uv: np.ndarray, sampling_hz: float) -> None:
    import pyedflib

    writer = pyedflib.EdfWriter(str(path), 1, file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setSignalHeader(
            0,
            {
                "label": "EEG Cz-Ref",
                "dimension": "uV",
                "sample_frequency": sampling_hz,
                "physical_max": float(samples_uv.max()),
                "physical_min": float(samples_uv.min()),
                "digital_max": 32767,
                "digital_min": -32768,
                "transducer": "",
                "prefilter": "",
            },
        )
        writer.writeSamples([np.asarray(samples_uv, dtype=np.float64)])
    finally:
        writer.close()


def dicom_file(tmp: Path) -> Path:
    """An MR object built by services.dicom.dicomize (from the shared data when present)."""
    from services.dicom import dicomize

    row = None
    manifest = SHARED_DATA / "manifest.csv"
    if manifest.exists():
        row = next(r for r in dicomize.read_manifest(SHARED_DATA) if r["modality"] == "mri")
        src = SHARED_DATA
    else:
        src = tmp
        Image.fromarray(synthetic_picture(7, 128)).save(tmp / "synthetic-mr.png")
        row = {"path": "synthetic-mr.png", "modality": "mri"}
    return dicomize.dicomize_row(row, src, tmp / "mr.dcm")


def archived_headers(stack: Stack) -> dict[str, object]:
    from services.dicom.decode import read_header

    return {p.name: read_header(p) for p in stack.archive.iterdir() if p.is_file()}


def processed(stack: Stack, relative: str) -> bool:
    return (stack.watch / ".processed" / relative).exists() and not (stack.watch / relative).exists()


def processed_files(stack: Stack) -> list[str]:
    done = stack.watch / ".processed"
    return sorted(str(p.relative_to(done)) for p in done.rglob("*") if p.is_file())


def assert_alive(stack: Stack) -> None:
    for proc in stack.processes():
        assert proc.process.poll() is None, f"{proc.name} died:\n{proc.output()}"


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_dicom_png_and_edf_are_indexed_and_found(stack: Stack, tmp_path: Path) -> None:
    from models.eeg import render_eeg_trace
    from services.dicom.decode import decode_for_embedding, read_header

    dicom = dicom_file(tmp_path)
    dicom_uid = read_header(dicom).sop_instance_uid
    shutil.copy(dicom, stack.watch / "from-pacs.dcm")

    picture = synthetic_picture(1)
    png = png_bytes(picture)
    (stack.watch / "xray").mkdir(exist_ok=True)
    (stack.watch / "xray" / "chest.png").write_bytes(png)

    samples, hz, what = eeg_signal()
    edf = tmp_path / "rec.edf"
    write_edf(edf, samples, hz)
    (stack.watch / "eeg").mkdir(exist_ok=True)
    partial = stack.watch / "eeg" / "rec.edf.part"  # a copy in progress: ignored until renamed
    shutil.copy(edf, partial)
    time.sleep(SETTLE_S * 2)
    assert partial.exists(), "a .part file must be left alone"
    os.replace(partial, stack.watch / "eeg" / "rec.edf")

    wait_until(
        lambda: (
            all(processed(stack, r) for r in ("from-pacs.dcm", "xray/chest.png", "eeg/rec.edf"))
            and len(list(stack.archive.iterdir())) >= 3
        ),
        90,
        "three files indexed and archived",
    )
    headers = archived_headers(stack)
    by_class = {h.sop_class_uid: h for h in headers.values()}
    assert dicom_uid in {h.sop_instance_uid for h in headers.values()}
    assert f"{dicom_uid}.dcm" in headers
    sc, eeg = by_class[SC_IMAGE], by_class[ROUTINE_SCALP_EEG]
    assert (sc.modality, sc.modality_code) == ("xray", "CR")  # from the folder name
    assert (eeg.modality, eeg.modality_code) == ("eeg", "EEG")

    hits = stack.client.search(sop_instance_uid=dicom_uid, k=3, exclude_self=False).hits
    assert hits[0].sop_instance_uid == dicom_uid and hits[0].distance < 1e-4
    hits = stack.client.search(image=png, image_modality="xray", k=3).hits
    assert hits[0].sop_instance_uid == sc.sop_instance_uid and hits[0].distance < 1e-4, hits
    hits = stack.client.search(sop_instance_uid=eeg.sop_instance_uid, k=3, exclude_self=False).hits
    assert hits[0].sop_instance_uid == eeg.sop_instance_uid and hits[0].distance < 1e-4

    # the EDF became a waveform the worker renders like the training corpus: compare pictures
    _, frames = decode_for_embedding(stack.archive / f"{eeg.sop_instance_uid}.dcm")
    rendered = np.rint(frames[0].image * 255).astype(np.uint8)
    reference = render_eeg_trace(samples, hz)
    differing = int((rendered != reference).sum())
    print(f"EEG from {what}: {differing} of {reference.size} pixels differ from the training rendering")
    assert differing <= 0.002 * reference.size

    stats = stack.client.stats()
    per_modality = {m.modality: m.count for m in stats.per_modality}
    assert sum(per_modality.values()) == stats.total >= 3
    assert stats.quarantined == 0, stack.quarantine_reasons()
    assert_alive(stack)


@pytest.mark.integration
def test_slowly_written_file_is_taken_only_when_complete(stack: Stack) -> None:
    picture = synthetic_picture(2, 160)
    data = png_bytes(picture)
    target = stack.watch / "xray" / "slow.png"
    target.parent.mkdir(exist_ok=True)
    chunks = [data[i : i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
    before = stack.client.stats().total
    with open(target, "wb") as handle:
        for number, chunk in enumerate(chunks):
            handle.write(chunk)
            handle.flush()
            # short pauses (under the settle time), and one long one with the file still open
            time.sleep(SETTLE_S * 2.5 if number == 2 else SETTLE_S * 0.4)
            assert target.exists(), f"taken after chunk {number + 1} of {len(chunks)}"
            assert "slow.png" not in stack.quarantine_reasons()
    assert not (stack.watch / ".processed" / "xray" / "slow.png").exists()
    wait_until(
        lambda: (
            processed(stack, "xray/slow.png")
            and stack.client.stats().total == before + 1
            and stack.client.stats().pending == 0
        ),
        60,
        "slow.png indexed",
    )
    hits = stack.client.search(image=data, image_modality="xray", k=1).hits
    assert hits[0].distance < 1e-4  # the whole picture was ingested, not a prefix
    assert "slow.png" not in stack.quarantine_reasons()
    assert not (stack.watch / ".failed").exists()


@pytest.mark.integration
def test_ignored_names_stay(stack: Stack) -> None:
    data = png_bytes(synthetic_picture(3))
    ignored = [
        "xray/.hidden.png",
        "xray/copy.png.tmp",
        "xray/copy.png.partial",
        "xray/backup.png~",
        ".private/x.png",
    ]
    for name in ignored:
        (stack.watch / name).parent.mkdir(parents=True, exist_ok=True)
        (stack.watch / name).write_bytes(data)
    time.sleep(SETTLE_S * 4)
    for name in ignored:
        assert (stack.watch / name).exists(), name


@pytest.mark.integration
def test_restart_does_not_reingest(stack: Stack) -> None:
    wait_until(lambda: stack.client.stats().pending == 0, 60, "nothing pending")
    before = {p.name: p.stat().st_ino for p in stack.archive.iterdir()}
    done_before = processed_files(stack)
    total_before = stack.client.stats().total
    stack.watcher.stop()
    assert stack.watcher.process.returncode == 0, stack.watcher.output()

    data = png_bytes(synthetic_picture(4))
    (stack.watch / "mri").mkdir(exist_ok=True)
    (stack.watch / "mri" / "while-down.png").write_bytes(data)  # arrives while the watcher is down
    stack.watcher = start_watcher(stack.env, stack.watch)
    wait_until(
        lambda: (
            processed(stack, "mri/while-down.png")
            and stack.client.stats().total == total_before + 1
            and len(list(stack.archive.iterdir())) == len(before) + 1
        ),
        60,
        "the file dropped while down is indexed after the restart",
    )
    time.sleep(SETTLE_S * 3)  # give a wrong re-ingest time to happen
    after = {p.name: p.stat().st_ino for p in stack.archive.iterdir()}
    assert {name: after.get(name) for name in before} == before, "an archived object was re-ingested"
    assert len(after) == len(before) + 1
    done_after = processed_files(stack)
    assert done_after == sorted([*done_before, "mri/while-down.png"])
    hits = stack.client.search(image=data, image_modality="mri", k=1, modalities=["mri"]).hits
    assert hits[0].distance < 1e-4 and hits[0].modality_code == "MR"


@pytest.mark.integration
def test_broken_files_are_quarantined_with_their_reason(stack: Stack, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "malformed", Path(__file__).parent / "corpus" / "malformed.py"
    )
    malformed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(malformed)
    malformed.generate(tmp_path / "corpus")

    drops = {
        "xray/not-really.png": (b"this is a text file, not a PNG\n" * 10, "not-an-image"),
        "xray/cut.jpg": (b"\xff\xd8\xff\xe0" + bytes(60), "not-an-image"),
        "eeg/broken.edf": (b"0       " + b"garbage header" * 30, "not-edf"),
        "report.dcm": ((tmp_path / "corpus" / "sr_document.dcm").read_bytes(), "sr-document"),
        "plan.dcm": ((tmp_path / "corpus" / "rt_plan.dcm").read_bytes(), "no-image"),
        "empty.dcm": (b"", "empty"),
        "notes.txt": (b"hello\n", "unsupported-file-type"),
    }
    before = stack.client.stats()
    for name, (data, _) in drops.items():
        (stack.watch / name).parent.mkdir(parents=True, exist_ok=True)
        (stack.watch / name).write_bytes(data)
    wait_until(
        lambda: all((stack.watch / ".failed" / name).exists() for name in drops),
        60,
        "broken files moved to .failed",
    )
    reasons = stack.quarantine_reasons()
    for name, (data, reason) in drops.items():
        base = Path(name).name
        assert reasons.get(base) == reason, (name, reasons)
        assert (stack.quarantine / base).read_bytes() == data  # the quarantined copy is the file
        assert (stack.watch / ".failed" / name).read_bytes() == data  # and the original is kept
        record = json.loads((stack.quarantine / f"{base}.reason.json").read_text())
        assert record["stage"] == "watcher"
    stats = stack.client.stats()
    assert stats.quarantined == before.quarantined + len(drops)
    counted = {r.reason: r.count for r in stats.quarantine_reasons}
    for _, reason in drops.values():
        assert counted.get(reason, 0) >= 1
    assert stats.total == before.total
    assert_alive(stack)


# --- the rules, without processes ----------------------------------------------------------------


def test_input_rules() -> None:
    from services.ingest.convert import detect_kind, folder_modality
    from services.ingest.watcher import is_ignored

    for name in (
        ".x.png",
        "a/.b/c.dcm",
        ".processed/xray/a.png",
        ".failed/a.dcm",
        "a.png.part",
        "a.tmp",
        "a.dcm.partial",
        "a.png~",
    ):
        assert is_ignored(Path(name)), name
    for name in ("a.png", "xray/b.jpg", "eeg/c.edf", "d", "deep/er/e.dcm"):
        assert not is_ignored(Path(name)), name
    dicm = bytes(128) + b"DICM" + bytes(10)
    assert detect_kind("x.png", dicm) == "dicom"  # content wins over the suffix
    assert detect_kind("x.dcm", b"\x89PNG\r\n\x1a\n" + bytes(200)) == "png"
    assert detect_kind("x", b"\xff\xd8\xff\xe0" + bytes(200)) == "jpeg"
    assert detect_kind("x.dat", b"0       " + bytes(200)) == "edf"
    assert detect_kind("x.jpeg", b"junk") == "jpeg" and detect_kind("x.EDF", b"junk") == "edf"
    assert detect_kind("x.dcm", b"junk") == "dicom" and detect_kind("noext", b"junk") == "dicom"
    assert detect_kind("notes.txt", b"hello") == "unknown"
    assert [
        folder_modality(Path(p))
        for p in ("xray/a.png", "MRI/b.png", "oct/x/y.png", "eeg/t.png", "ct/a.png", "a.png")
    ] == ["CR", "MR", "OPT", "EEG", "OT", "OT"]


@pytest.mark.parametrize("signal", ["bonn-like integers", "offset and fractional", "volts-scale"])
def test_eeg_dataset_keeps_the_signal(signal: str) -> None:
    from services.dicom.build import dataset_bytes
    from services.dicom.decode import read_eeg_waveform
    from services.ingest.convert import eeg_dataset

    t = np.arange(5000) / 256.0
    x = {
        "bonn-like integers": np.rint(150 * np.sin(2 * np.pi * 9 * t)),
        "offset and fractional": 40000 + 37.25 * np.sin(2 * np.pi * 3 * t),
        "volts-scale": 2e6 * np.sin(2 * np.pi * 1 * t),
    }[signal]
    data = dataset_bytes(eeg_dataset(x, 256.0, digest="ab" * 32, when=0.0))
    samples, hz = read_eeg_waveform(data)
    assert hz == pytest.approx(256.0)
    error = np.abs(samples - x).max()
    assert error <= (0 if signal == "bonn-like integers" else 1e-4 * max(np.ptp(x), 1)), error
