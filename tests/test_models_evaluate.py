"""Evaluation: pluggable retriever, report files, known numbers on a hand-made data folder."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from models import eeg
from models.data import read_manifest, shared_data_dir
from models.evaluate import evaluate_retriever, run_evaluation


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """6 X-rays (3 normal, 3 viral), 4 EEG segments (2 seizure, 2 healthy); split by index."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    for label, pattern in (("normal", xx), ("viral", yy)):
        for i in range(3):
            img = np.clip(pattern * 6 + rng.normal(0, 8, pattern.shape), 0, 255).astype(np.uint8)
            path = f"xray/{label}/{i}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / path)
            rows.append([path, "xray", label, "test" if i == 0 else "train"])
    t = np.arange(4097) / eeg.BONN_SAMPLING_HZ
    for label, amp in (("seizure", 600), ("healthy_eyes_open", 60)):
        for i in range(2):
            signal = amp * np.sin(2 * np.pi * (3 + i) * t)
            path = root / f"eeg/{label}/{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(str(int(v)) for v in signal))
            rows.append([str(path), "eeg", label, "test" if i == 0 else "train"])  # absolute path
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "label", "split", "source", "patient", "sha256"])
        writer.writerows([*row, "synthetic", "", ""] for row in rows)
    return root


class FixedRetriever:
    """Ranks the database by a fixed key order (ignores the picture)."""

    def __init__(self, order):
        self.order = order

    def index(self, items):
        self.keys = [item.key for item in items]

    def search(self, item, k):
        return [key for key in self.order if key in self.keys and key != item.key][:k]


def test_evaluate_with_a_fixed_retriever_gives_known_numbers(data_dir):
    queries = read_manifest(data_dir, splits=["test"])
    database = read_manifest(data_dir, splits=["train"])
    keys = [d.key for d in database]
    # xray/normal/1, xray/normal/2, xray/viral/1, xray/viral/2, eeg seizure 1, eeg healthy 1
    metrics, rankings = evaluate_retriever(FixedRetriever(keys), queries, database)
    assert rankings.shape == (4, 6)
    finding = metrics["finding"]
    # xray/normal/0: hits at ranks 1,2 of R=2 -> AP 1; xray/viral/0: hits at 3,4 -> (1/3 + 2/4)/2
    assert finding["xray"]["map@5"] == pytest.approx((1 + (1 / 3 + 2 / 4) / 2) / 2)
    assert finding["xray"]["precision@5"] == pytest.approx(2 / 5)
    # eeg seizure/0: hit at rank 5 -> 1/5; healthy/0: hit at rank 6 -> 0 within 5, 1/6 within 10
    assert finding["eeg"]["map@5"] == pytest.approx((1 / 5 + 0) / 2)
    assert finding["eeg"]["map@10"] == pytest.approx((1 / 5 + 1 / 6) / 2)
    modality = metrics["modality"]
    assert modality["precision@20"] == pytest.approx((4 + 4 + 2 + 2) / 20 / 4)
    assert modality["accuracy@20"] == pytest.approx(0.5)  # EEG queries: majority is xray
    assert modality["recall@20"] == 1.0


def test_run_evaluation_writes_report_and_metrics(data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    metrics = run_evaluation(data_dir, ["test"], ["train"], tmp_path, map_method="pca")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for k in (20, 40, 60, 80, 100):
        for name in ("accuracy", "precision", "recall"):
            assert f"{name}@{k}" in saved["modality"]
    for modality in ("xray", "eeg", "overall"):
        for k in (5, 10, 20):
            assert f"precision@{k}" in saved["finding"][modality] and f"map@{k}" in saved["finding"][modality]
    assert saved["model"]["version"] == metrics["model"]["version"]
    for name in ("report.md", "pr_curves.png", "query_grid.jpg", "embedding_map.png"):
        assert (tmp_path / name).is_file()
    assert saved["data"]["n_queries"] == 4 and saved["data"]["n_database"] == 6


def test_service_style_retriever_matches_numpy_retriever(data_dir):
    from models.retrieval import NumpyRetriever
    from models.runtime import OnnxEncoder

    queries, database = read_manifest(data_dir, splits=["test"]), read_manifest(data_dir, splits=["train"])
    numpy_metrics, numpy_rank = evaluate_retriever(
        NumpyRetriever(OnnxEncoder(device="cpu")), queries, database
    )

    class KeyOnly:  # exercises the generic (key-returning) path of evaluate_retriever
        def __init__(self):
            self.inner = NumpyRetriever(OnnxEncoder(device="cpu"))

        def index(self, items):
            self.inner.index(items)

        def search(self, item, k):
            return self.inner.search(item, k)

    key_metrics, key_rank = evaluate_retriever(KeyOnly(), queries, database)
    assert np.array_equal(numpy_rank, key_rank) and numpy_metrics == key_metrics


@pytest.mark.slow
def test_default_model_reproduces_its_recorded_subset_numbers(tmp_path):
    """The card (or routes file) of the shipped model records a subset evaluation; rerunning it must
    match."""
    if not (shared_data_dir() / "manifest.csv").is_file():
        pytest.skip("shared data not available")
    from models.runtime import EncoderSet

    card = EncoderSet.load(device="cpu").card
    reference = card.get("metrics", {}).get("subset_check")
    if not reference:
        pytest.skip("the default model's card records no subset check")
    from models.data import manifest_sha256

    if reference["manifest_sha256"] != manifest_sha256(shared_data_dir()):
        pytest.skip("shared data differ from the data the reference numbers were measured on")
    metrics = run_evaluation(
        shared_data_dir(),
        reference["queries"],
        reference["database"],
        tmp_path,
        subset=reference["subset"],
        plots=False,
        pr_depth=100,
    )
    for modality, expected in reference["finding_map@10"].items():
        assert metrics["finding"][modality]["map@10"] == pytest.approx(expected, abs=1e-9)
    assert metrics["modality"]["precision@20"] == pytest.approx(reference["modality_precision@20"], abs=1e-9)


@pytest.fixture(scope="module")
def two_site_dir(tmp_path_factory):
    """X-ray from one source; OCT trained on site A (train/val) and held out at site B (test)."""
    root = tmp_path_factory.mktemp("sites")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:40, 0:40]
    rows = []
    plan = [
        ("xray", "only-site", "train", 3),
        ("xray", "only-site", "val", 1),
        ("oct", "site-a", "train", 3),
        ("oct", "site-a", "val", 2),
        ("oct", "site-b", "test", 2),
    ]
    for modality, source, split, count in plan:
        for label, pattern in (("normal", xx), ("cnv", yy)):
            for i in range(count):
                img = np.clip(pattern * 6 + rng.normal(0, 8, pattern.shape), 0, 255).astype(np.uint8)
                path = f"{modality}/{source}/{split}/{label}{i}.png"
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / path)
                rows.append([path, modality, label, split, source, "", ""])
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "label", "split", "source", "patient", "sha256"])
        writer.writerows(rows)
    return root


def test_cross_site_holds_out_the_sources_never_trained_on(two_site_dir):
    from models.evaluate import cross_site_evaluation, cross_site_lines

    result = cross_site_evaluation(two_site_dir, device="cpu")
    assert result["single_source"] == {"xray": "only-site"}
    oct_entry = result["modalities"]["oct"]
    assert oct_entry["training_sources"] == ["site-a"]
    assert oct_entry["n_database"] == 10  # site A's train + val, OCT only; site B never in it
    assert set(oct_entry["queries"]) == {"in-site (val)", "site-b"}
    assert oct_entry["queries"]["site-b"]["n_queries"] == 4
    assert oct_entry["queries"]["in-site (val)"]["n_queries"] == 4
    # the two findings are a horizontal vs a vertical ramp: any working encoder separates them
    assert oct_entry["queries"]["site-b"]["map@10"] > 0.9
    lines = cross_site_lines(result)
    assert any(line.startswith("oct: trained on site-a; queries site-b (4)") for line in lines)
    assert any("xray: one source only" in line for line in lines)


@pytest.mark.slow
def test_default_model_cross_site_numbers_match_its_card():
    """OCT is the one modality with a second source in the shared data: the card's figures rerun."""
    if not (shared_data_dir() / "manifest.csv").is_file():
        pytest.skip("shared data not available")
    from models.data import manifest_sha256
    from models.evaluate import cross_site_evaluation
    from models.runtime import EncoderSet

    reference = EncoderSet.load(device="cpu").card.get("metrics", {}).get("cross_site")
    if not reference:
        pytest.skip("the default model's card records no cross-site check")
    if reference["manifest_sha256"] != manifest_sha256(shared_data_dir()):
        pytest.skip("shared data differ from the data the reference numbers were measured on")
    result = cross_site_evaluation(shared_data_dir(), device="cpu", database_splits=reference["database"])
    assert set(result["single_source"]) == set(reference["single_source"])
    for modality, entry in reference["modalities"].items():
        for name, figures in entry["queries"].items():
            measured = result["modalities"][modality]["queries"][name]["map@10"]
            assert measured == pytest.approx(figures["map@10"], abs=1e-9)


def test_embedding_map_draws_one_panel_per_encoder(tmp_path):
    """A model of several encoders gets one map per encoder (distances across them mean nothing)."""
    from models.evaluate import _plot_map

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(80, 8)).astype(np.float32)
    findings = ["xray/normal", "xray/viral"] * 20 + ["mri/glioma", "oct/cnv"] * 20
    single, split = tmp_path / "one.png", tmp_path / "two.png"
    _plot_map(embeddings, findings, single, "pca")
    _plot_map(
        embeddings,
        findings,
        split,
        "pca",
        groups=[("xray encoder", np.arange(40)), ("default encoder", np.arange(40, 80))],
    )
    one, two = Image.open(single).size, Image.open(split).size
    assert two[0] == 2 * one[0] and two[1] == one[1]
