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


def test_a_run_on_one_modality_gets_that_modalitys_card_texts():
    from models.export import INTENDED_USE, LIMITATIONS, card_from_checkpoint

    ckpt = {"arch": "paper", "arch_kwargs": {"input_size": 64}, "embedding_dim": 48}
    eeg_only = card_from_checkpoint(dict(ckpt, config={"modalities": ["eeg"]}), "1.0.0")
    assert "EEG only" in eeg_only["intended_use"] and "Bonn" in eeg_only["limitations"]
    assert "X-ray" not in eeg_only["intended_use"] + eeg_only["limitations"]
    every = card_from_checkpoint(dict(ckpt, config={"modalities": None}), "1.0.0")
    assert "intended_use" not in every and "limitations" not in every  # write_model's defaults apply
    assert "chest X-ray" in INTENDED_USE and "Bonn EEG" in LIMITATIONS


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
    from models.routes import routes_card_path
    from models.runtime import EncoderSet, is_routes_file

    path = default_model_path()
    encoders = EncoderSet.load(path, device="cpu")
    for encoder in encoders.members():
        x = np.random.default_rng(0).random((2, *encoder.input_shape), dtype=np.float32)
        assert encoder.embed(x).shape == (2, encoders.dim)
    if is_routes_file(path):  # a set of encoders has its own card (which encoder embeds what, figures)
        routes = json.loads(path.read_text())
        assert encoders.version.startswith(routes["version"] + "+") and {"val", "test"} <= set(
            routes["metrics"]
        )
        assert (
            routes_card_path(path)
            .read_text()
            .startswith(f"# Model card: {routes['name']} {routes['version']}")
        )
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
        assert onnx_path.stat().st_size < 24 * 2**20  # the pretrained X-ray encoder is about 17 MB


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


@pytest.fixture(scope="module")
def routed_model(tiny_model, tmp_path_factory):
    """A set of two 48-d encoders: X-ray through its own (32² input), everything else through tiny."""
    import shutil

    from models.export import write_model
    from models.network import PaperAutoencoder
    from models.preprocess import PreprocessContract

    folder = tmp_path_factory.mktemp("routed")
    for source in tiny_model[1].parent.iterdir():
        shutil.copy(source, folder / source.name)
    torch.manual_seed(1)
    xray = PaperAutoencoder(input_size=32).eval()
    write_model(
        xray,
        PreprocessContract(input_size=32),
        folder / "tiny-xray.onnx",
        {"version": "x-1", "trained": False, "embedding_dim": 48},
    )
    torch.manual_seed(2)
    write_model(
        PaperAutoencoder(input_size=16, latent_dim=32).eval(),
        PreprocessContract(input_size=16),
        folder / "tiny-32d.onnx",
        {"version": "d-1", "trained": False, "embedding_dim": 32},
    )
    routes = {
        "name": "tiny-set",
        "version": "set-1",
        "default": {"file": "tiny.onnx", "version": "test-1"},
        "modalities": {"xray": {"file": "tiny-xray.onnx", "version": "x-1"}},
    }
    path = folder / "tiny-set.routes.json"
    path.write_text(json.dumps(routes))
    return path, routes, xray, tiny_model[0]


def _write_routes(folder, routes, name="other.routes.json"):
    path = folder / name
    path.write_text(json.dumps(routes))
    return path


def test_encoder_set_routes_each_modality_to_its_encoder(routed_model):
    from models.data import MODALITIES
    from models.runtime import EncoderSet, model_eeg_render, model_files, model_version

    path, _, xray_model, default_model = routed_model
    encoders = EncoderSet.load(path, device="cpu")
    assert encoders.routed and encoders.version.startswith("set-1+") and encoders.dim == 48
    assert [e.model_path.name for e in encoders.members()] == ["tiny.onnx", "tiny-xray.onnx"]
    assert encoders.for_modality("xray").contract.input_size == 32
    assert encoders.for_modality("mri") is encoders.for_modality("other") is encoders.default
    vocabulary = (*MODALITIES, "other")
    assert encoders.comparable("xray", vocabulary) == ("xray",)
    assert encoders.comparable("eeg", vocabulary) == ("mri", "oct", "eeg", "other")
    assert model_version(path) == encoders.version and model_eeg_render(path) == "trace"
    assert [p.name for p in model_files(path)] == [
        "tiny-set.routes.json",
        *(
            f"{stem}{suffix}"
            for stem in ("tiny", "tiny-xray")
            for suffix in (".onnx", ".card.json", ".preprocess.json")
        ),
    ]
    # mixed modalities: each item through its own encoder, in the items' order, one call per encoder
    rng = np.random.default_rng(0)
    inputs = [rng.random((2, 1, 32, 32), np.float32), rng.random((1, 1, 16, 16), np.float32)]
    inputs.append(rng.random((3, 1, 32, 32), np.float32))
    calls = []

    def run(encoder, rows):
        calls.append((encoder.model_path.name, len(rows)))
        return encoder.embed(rows)

    vectors = encoders.embed_each(inputs, ["xray", "mri", "xray"], run)
    assert sorted(calls) == [("tiny-xray.onnx", 5), ("tiny.onnx", 1)]
    with torch.no_grad():
        for rows, model, got in zip(inputs, (xray_model, default_model, xray_model), vectors, strict=True):
            np.testing.assert_allclose(got, model.encode(torch.from_numpy(rows)).numpy(), atol=1e-4)
    # one ONNX file is a set of one encoder: nothing is routed, every modality is comparable
    single = EncoderSet.load(path.with_name("tiny.onnx"), device="cpu")
    assert not single.routed and single.version == "test-1"
    assert single.comparable("xray", vocabulary) == vocabulary


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": ""}, "names no version"),
        ({"modalities": {"xray": {"file": "tiny-xray.onnx", "version": "x-2"}}}, "do not belong together"),
        ({"modalities": {"ct": {"file": "tiny-xray.onnx", "version": "x-1"}}}, "unknown modalities"),
        ({"modalities": {"xray": {"file": "tiny-32d.onnx", "version": "d-1"}}}, "one dimension"),
        ({"default": "tiny.onnx"}, "must be"),
        ({"modalities": ["xray"]}, "must map a modality"),
        ({"modalities": {"xray": {"file": "../tiny-xray.onnx", "version": "x-1"}}}, "beside the routes file"),
    ],
)
def test_encoder_set_refuses_routes_that_do_not_fit(routed_model, change, message):
    from models.runtime import EncoderSet

    path, routes, _, _ = routed_model
    bad = _write_routes(path.parent, {**routes, **change})
    with pytest.raises(ConfigError, match=message):
        EncoderSet.load(bad, device="cpu")


def test_a_member_swapped_under_the_same_version_is_another_model(routed_model, tmp_path):
    """The index's model version digests the members: an encoder replaced behind an unchanged routes
    file (same names, same versions) changes it, so the index refuses the new vectors until a reindex."""
    import shutil

    from models.runtime import EncoderSet, model_version

    path, _, _, _ = routed_model
    copy = tmp_path / "set"
    shutil.copytree(path.parent, copy)
    before = model_version(copy / path.name)
    assert before == EncoderSet.load(path, device="cpu").version
    tiny = (copy / "tiny.onnx").read_bytes()
    (copy / "tiny.onnx").write_bytes(tiny + b"\0")  # other bytes, same card and version
    assert model_version(copy / path.name) != before and model_version(copy / path.name).startswith("set-1+")


def test_offline_ranking_stays_within_each_encoder(routed_model, tmp_path):
    """With several encoders, a query is ranked only against the items its own encoder embedded."""
    from PIL import Image

    from models.data import Record
    from models.retrieval import NumpyRetriever
    from models.runtime import EncoderSet

    rng = np.random.default_rng(3)
    records = []
    for i, modality in enumerate(["xray", "mri", "oct", "xray", "mri", "xray", "oct"]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(path)
        records.append(Record(path.name, path, modality, "a", "train"))
    retriever = NumpyRetriever(EncoderSet.load(routed_model[0], device="cpu"))
    retriever.index(records)
    by_key = {r.key: r.modality for r in records}
    xray_hits, mri_hits = retriever.search_many([records[0], records[1]], 10)
    assert sorted(xray_hits) == ["3.png", "5.png"]  # the other X-rays, never itself
    assert sorted(by_key[k] for k in mri_hits) == ["mri", "oct", "oct"]
    # the evaluation's fast path (indices, not keys) ranks the same way, its short rows padded with -1
    from models.evaluate import evaluate_retriever

    metrics, rankings = evaluate_retriever(retriever, records, records, index=False)
    for query, row in zip(records, rankings, strict=True):
        ranked = [records[i].modality for i in row if i >= 0]
        assert ranked and set(ranked) <= ({"xray"} if query.modality == "xray" else {"mri", "oct"})
    assert [records[i].key for i in rankings[0] if i >= 0] == xray_hits
    assert metrics["modality"]["per_modality"]["xray"]["precision@20"] == pytest.approx(2 / 20)  # 2 others
    with pytest.raises(ValueError, match="give the queries' modalities"):
        retriever.search_indices(["0.png"], retriever.embeddings[:1], 5)


def test_routes_writer_checks_the_set_and_writes_its_card(routed_model, tmp_path):
    from models.routes import routes_card_path, write_routes
    from models.runtime import EncoderSet

    path, _, _, _ = routed_model
    folder = path.parent
    out = folder / "written.routes.json"
    document = write_routes(
        out, version="set-2", default=folder / "tiny.onnx", routes={"xray": folder / "tiny-xray.onnx"}
    )
    # versions come from the encoders' cards, not from the caller
    assert document["modalities"] == {"xray": {"file": "tiny-xray.onnx", "version": "x-1"}}
    assert EncoderSet.load(out, device="cpu").version.startswith("set-2+")
    card = routes_card_path(out).read_text()
    assert card.startswith("# Model card: written set-2 (one encoder per modality)")
    assert "| xray | tiny-xray.onnx | x-1 | 32×32 grey |" in card
    assert "| mri, oct, eeg, any other | tiny.onnx | test-1 | 16×16 grey |" in card
    assert "## How queries are compared" in card and "INVALID_ARGUMENT" in card
    # a set that would not load is not written, and leaves nothing behind
    with pytest.raises(ConfigError, match="one dimension"):
        write_routes(
            folder / "bad.routes.json",
            version="v",
            default=folder / "tiny.onnx",
            routes={"xray": folder / "tiny-32d.onnx"},
        )
    assert not list(folder.glob("*bad*"))
    # figures measured on another model are refused
    with pytest.raises(ConfigError, match="not of this set"):
        write_routes(
            folder / "figures.routes.json",
            version="set-2",
            default=folder / "tiny.onnx",
            routes={"xray": folder / "tiny-xray.onnx"},
            evaluated={"runs/eval/x/metrics.json": "set-1+00000000"},
        )
    assert not list(folder.glob("*figures*"))
    with pytest.raises(ConfigError, match="beside the routes file"):
        write_routes(tmp_path / "far.routes.json", version="v", default=folder / "tiny.onnx", routes={})
