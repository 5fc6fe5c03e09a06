"""ONNX export (checker + parity, single file, dynamic batch) and the serving runtime."""

import json
import subprocess
import sys

import numpy as np
import pytest

from models.runtime import ModelNotFound, OnnxEncoder, default_model_path, sidecar_paths
from services.core.errors import ConfigError, InvalidInput

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from models.export import write_model
    from models.network import PaperAutoencoder
    from models.preprocess import PreprocessContract

    torch.manual_seed(0)
    model = PaperAutoencoder(input_size=16).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.onnx"
    card = write_model(
        model,
        PreprocessContract(input_size=16),
        path,
        {"version": "test-1", "trained": False, "embedding_dim": 48},
    )
    return model, path, card


def test_export_is_single_file_with_sidecars(tiny_model):
    _, path, card = tiny_model
    assert path.is_file() and not path.with_name(path.name + ".data").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "tiny.card.json",
        "tiny.card.md",
        "tiny.onnx",
        "tiny.preprocess.json",
    ]
    card_md = path.with_name("tiny.card.md").read_text()
    assert card_md.startswith("# Model card: tiny test-1") and "UNTRAINED" in card_md
    assert "## Intended use" in card_md and "## Limitations" in card_md
    assert card["onnx"]["parity_max_abs_diff"] < 1e-4
    card_path, contract_path = sidecar_paths(path)
    assert json.loads(card_path.read_text())["version"] == "test-1"
    assert json.loads(contract_path.read_text())["input_size"] == 16


def test_runtime_matches_torch_for_any_batch_size(tiny_model):
    model, path, _ = tiny_model
    encoder = OnnxEncoder(path, device="cpu")
    assert encoder.providers == ["CPUExecutionProvider"]
    assert encoder.dim == 48 and encoder.version == "test-1" and encoder.contract.input_size == 16
    for n in (1, 3, 17):
        x = np.random.default_rng(n).random((n, 1, 16, 16), dtype=np.float32)
        got = encoder.embed(x)
        assert got.shape == (n, 48) and got.dtype == np.float32
        with torch.no_grad():
            np.testing.assert_allclose(got, model.encode(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert encoder.embed(np.zeros((0, 1, 16, 16), np.float32)).shape == (0, 48)
    with pytest.raises(InvalidInput):
        encoder.embed(np.zeros((2, 1, 8, 8), np.float32))


def test_parity_failure_aborts_export(tmp_path, monkeypatch):
    from models import export
    from models.network import PaperAutoencoder
    from models.preprocess import PreprocessContract

    monkeypatch.setattr(export, "PARITY_ATOL", 0.0)
    with pytest.raises(export.ExportError):
        export.write_model(
            PaperAutoencoder(input_size=16),
            PreprocessContract(input_size=16),
            tmp_path / "bad.onnx",
            {"version": "x", "embedding_dim": 48},
        )
    assert not list(tmp_path.glob("bad*"))


def test_missing_model_or_sidecars_raise(tiny_model, tmp_path):
    _, path, _ = tiny_model
    with pytest.raises(ModelNotFound):
        OnnxEncoder(tmp_path / "nope.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(ModelNotFound):
        OnnxEncoder(lonely)


def test_cuda_request_without_cuda_is_a_clear_error(tiny_model):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.raises(ConfigError):
        OnnxEncoder(tiny_model[1], device="cuda")
    assert OnnxEncoder(tiny_model[1], device="auto").providers == ["CPUExecutionProvider"]


def test_shipped_default_model_and_cards():
    path = default_model_path()
    encoder = OnnxEncoder(path, device="cpu")
    x = np.random.default_rng(0).random((2, *encoder.input_shape), dtype=np.float32)
    assert encoder.embed(x).shape == (2, encoder.dim)
    for onnx_path in path.parent.glob("*.onnx"):
        card_path, contract_path = sidecar_paths(onnx_path)
        card = json.loads(card_path.read_text())
        assert contract_path.is_file()
        # the governance board's view of the same card, written by the export
        assert card_path.with_suffix(".md").read_text().startswith(f"# Model card: {card['name']}")
        for key in (
            "version",
            "architecture",
            "trained",
            "input_contract",
            "metrics",
            "date",
            "intended_use",
            "limitations",
            "training",
        ):
            assert key in card, (onnx_path.name, key)
        assert "manifest_sha256" in card["training"]
        assert onnx_path.stat().st_size < 8 * 2**20


def test_serving_modules_do_not_import_torch():
    code = (
        "import sys, models.runtime, models.preprocess, models.eeg, models.retrieval, models.metrics; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_card_markdown_shows_population_figures_and_off_site_check(tmp_path):
    from models.card import card_markdown, training_population
    from models.data import Record

    records = [
        Record(f"o{i}", tmp_path / f"o{i}.png", "oct", "cnv", split, source=source)
        for i, (split, source) in enumerate(
            [
                ("train", "retinal-oct-c8"),
                ("train", "retinal-oct-c8"),
                ("val", "retinal-oct-c8"),
                ("test", "kermany-oct-test"),
            ]
        )
    ]
    population = training_population(records)
    assert population["oct"]["images"] == {"test": 1, "train": 2, "val": 1}
    assert population["oct"]["sources"]["retinal-oct-c8"]["images"] == {"train": 2, "val": 1}
    assert "Kermany OCT2017" in population["oct"]["sources"]["kermany-oct-test"]["what"]
    finding = {m: {"map@10": 0.5} for m in ("xray", "mri", "oct", "eeg", "macro")}
    card = {
        "name": "m",
        "version": "9",
        "trained": True,
        "intended_use": "use",
        "limitations": "limits",
        "training": {"population": population},
        "metrics": {
            "val": {"finding": finding, "modality": {"precision@20": 0.99}},
            "cross_site": {
                "modalities": {
                    "oct": {
                        "training_sources": ["retinal-oct-c8"],
                        "queries": {"kermany-oct-test": {"n_queries": 1, "map@10": 0.25}},
                    }
                },
                "single_source": {"xray": "kermany-cxr"},
            },
        },
    }
    text = card_markdown(card)
    assert "| oct | retinal-oct-c8: " in text and "| 2 / 1 / 0 |" in text
    assert "| val | 99.00 % | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |" in text
    assert "| oct | retinal-oct-c8 | kermany-oct-test | 1 | 0.250 |" in text
    assert "| xray | kermany-cxr | no second source in the data | - | - |" in text
    assert "| test |" not in text  # no test figures were given, none are shown
