"""A modality's encoder from the packaged frozen backbone and a trained head (models.transfer)."""

import numpy as np
import pytest
from PIL import Image

from models.data import Record

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


def _patterned_records(tmp_path, modality: str, per_label: int, size: int, n_val: int) -> list[Record]:
    """Two findings drawn as noisy stripes and rings, ``n_val`` of each in the val split."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    records = []
    for label, pattern in (
        ("stripes", (xx // 6) % 2),
        ("rings", ((xx - size // 2) ** 2 + (yy - size // 2) ** 2) // 60 % 2),
    ):
        for i in range(per_label):
            picture = np.clip(pattern * 200 + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
            name = f"{label}{i}.png"
            Image.fromarray(picture).save(tmp_path / name)
            records.append(Record(name, tmp_path / name, modality, label, "val" if i < n_val else "train"))
    return records


def test_head_on_the_packaged_backbone_trains_on_served_features_and_exports(tmp_path):
    """The cached training features are those the exported graph computes, and the export passes
    the checker and parity (write_model); the kept head is the best val epoch's."""
    from models.export import write_model
    from models.preprocess import PreprocessContract, to_model_input
    from models.probe import load_backbone
    from models.runtime import OnnxEncoder
    from models.transfer import BackboneHeadEncoder, extract_features, fit

    records = _patterned_records(tmp_path, "xray", per_label=6, size=48, n_val=2)
    contract = PreprocessContract(input_size=64)
    backbone = load_backbone()
    features = extract_features(BackboneHeadEncoder(backbone), records, contract, progress=False)
    assert features.shape == (12, 1280)
    labels = np.array([r.label for r in records])
    splits = np.array([r.split for r in records])
    encoder, scores = fit(features, labels, splits, hidden=16, epochs=20, seed=0, backbone=backbone)
    assert set(scores["by_epoch"]) == {10, 20}
    assert scores["best"] == max(scores["by_epoch"].values())
    assert scores["best_epoch"] == min(e for e, s in scores["by_epoch"].items() if s == scores["best"])
    # serving computes from the picture what training read from the cache
    inputs = torch.from_numpy(
        np.stack([to_model_input(np.asarray(Image.open(r.path)), contract) for r in records])
    )
    with torch.no_grad():
        np.testing.assert_allclose(encoder.features(inputs).numpy(), features, rtol=1e-4, atol=1e-4)
        expected = encoder.encode(inputs).numpy()
    assert np.allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)
    path = tmp_path / "xray.onnx"
    write_model(encoder, contract, path, {"version": "t-1", "trained": True, "embedding_dim": 48})
    served = OnnxEncoder(path, device="cpu")
    assert served.dim == 48 and served.contract.input_size == 64
    # write_model held the export to 1e-4 on its own random batches; here, features standardised by
    # the spread of 8 training pictures magnify float32 differences between the two runtimes
    np.testing.assert_allclose(served.embed(inputs.numpy()), expected, atol=5e-3)


def test_fine_tuned_blocks_fused_with_the_shipped_autoencoder_export_as_served(tmp_path):
    """--tune-from trains only the blocks it names; --fuse-with joins the shipped autoencoder, whose
    part of the joint vector equals that autoencoder served on its own contract; the export matches."""
    from models.export import write_model
    from models.preprocess import PreprocessContract, to_model_input
    from models.probe import load_backbone
    from models.runtime import OnnxEncoder, default_model_path
    from models.transfer import BackboneHeadEncoder, extract_trunk, fine_tune, fuse

    autoencoder = default_model_path().with_name("ours-ae64.onnx")
    records = _patterned_records(tmp_path, "mri", per_label=30, size=96, n_val=5)
    contract = PreprocessContract(input_size=96)
    encoder = BackboneHeadEncoder(load_backbone(), hidden=16, tune_from=15)
    blocks = encoder.backbone._blocks
    frozen_before = [p.detach().clone() for p in blocks[14].parameters()]
    tuned_before = [p.detach().clone() for p in blocks[15].parameters()]
    trunk, mirrored = extract_trunk(encoder, records, contract, 15, flip=True)
    assert mirrored is not None and mirrored.shape == trunk.shape and trunk.dtype == np.float16
    labels = np.array([r.label for r in records])
    splits = np.array([r.split for r in records])
    scores = fine_tune(
        encoder,
        trunk,
        mirrored,
        labels,
        splits,
        epochs=2,
        seed=0,
        temperature=0.1,
        lr_backbone=1e-3,
        eval_every=1,
    )
    assert set(scores["by_epoch"]) == {1, 2} and 0.0 <= scores["best"] <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, blocks[14].parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(tuned_before, blocks[15].parameters(), strict=True))

    fused, fusion = fuse(encoder, autoencoder, [0.5, 1.5], records, contract)
    assert fusion["member"]["file"] == "ours-ae64.onnx" and set(fusion["by_weight"]) == {0.5, 1.5}
    assert fusion["val_map@10"] == max(fusion["by_weight"].values()) == fusion["by_weight"][fused.weight]
    pictures = [np.asarray(Image.open(r.path)) for r in records[:6]]
    inputs = torch.from_numpy(np.stack([to_model_input(p, contract) for p in pictures]))
    shipped = OnnxEncoder(autoencoder, device="cpu")
    with torch.no_grad():
        joint = fused.joint(inputs).numpy()
        expected = fused.encode(inputs).numpy()
    on_its_own = shipped.embed(np.stack([to_model_input(p, shipped.contract) for p in pictures]))
    np.testing.assert_allclose(joint[:, 48:] / fused.weight, on_its_own, atol=1e-4)
    assert np.allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)
    path = tmp_path / "mri.onnx"
    write_model(fused, contract, path, {"version": "t-1", "trained": True, "embedding_dim": 48})
    served = OnnxEncoder(path, device="cpu")
    assert served.dim == 48 and served.contract.input_size == 96
    np.testing.assert_allclose(served.embed(inputs.numpy()), expected, atol=5e-3)


def test_an_autoencoder_whose_card_disagrees_with_its_onnx_file_is_refused(tmp_path):
    """The torch rebuild follows the card; a card that does not describe the file stops the fusion."""
    import json
    import shutil

    from models.errors import ConfigError
    from models.fusion import autoencoder_from_onnx
    from models.runtime import default_model_path

    source = default_model_path().with_name("ours-ae64.onnx")
    for suffix in (".onnx", ".card.json", ".preprocess.json"):
        shutil.copy(source.with_name("ours-ae64" + suffix), tmp_path / ("ae" + suffix))
    card_path = tmp_path / "ae.card.json"
    card = json.loads(card_path.read_text())
    card["architecture"]["blocks"] = 0
    card_path.write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="card does not describe the file"):
        autoencoder_from_onnx(tmp_path / "ae.onnx")
    card["architecture"]["name"] = "resnet"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="not an exported PaperAutoencoder"):
        autoencoder_from_onnx(tmp_path / "ae.onnx")


def test_a_cache_is_reused_only_for_the_same_recipe_and_pictures(tmp_path):
    """Trunk activations of another block, flip setting or picture list are recomputed, never reused."""
    from models.transfer import cached, store

    path = tmp_path / "trunk-14.npz"
    recipe = {"contract": {"input_size": 224}, "block": 14, "flip": True}
    keys = np.array(["a.jpg", "b.jpg"])
    store(path, recipe, keys, trunk=np.ones((2, 3), np.float16))
    assert cached(path, recipe, keys, refresh=False)["trunk"].shape == (2, 3)
    assert cached(path, recipe, keys, refresh=True) is None
    assert cached(path, {**recipe, "block": 15}, keys, refresh=False) is None
    assert cached(path, {**recipe, "flip": False}, keys, refresh=False) is None
    assert cached(path, recipe, keys[::-1], refresh=False) is None
    assert cached(tmp_path / "absent.npz", recipe, keys, refresh=False) is None


@pytest.mark.parametrize("modality", ["xray", "mri"])
def test_the_card_says_what_the_recipe_trained_and_joined(modality):
    """A frozen backbone's card says so; a fine-tuned and joined one names the blocks and the member."""
    import argparse

    from models.transfer import export_card

    args = argparse.Namespace(
        modality=modality, hidden=512, tune_from=None, flip=False, size=224, version="t-1",
        temperature=0.05, epochs=2, seed=0, lr_backbone=1e-4, eval_every=1,
    )  # fmt: skip
    scores = {"by_epoch": {"2": 0.5}, "best": 0.5, "best_epoch": 2}
    frozen = export_card(args, scores, None, "sha")
    assert "backbone is frozen" in frozen["limitations"] and "Two networks" not in frozen["limitations"]
    member = {"file": "ours-ae64.onnx", "version": "1.2.0", "sha256": "0" * 64}
    fusion = {"val_map@10": 0.6, "weight": 1.5, "by_weight": {1.5: 0.6}, "member": member}
    tuned = export_card(
        argparse.Namespace(**{**vars(args), "tune_from": 14, "flip": True}), scores, fusion, "sha"
    )
    assert "frozen" not in tuned["limitations"] and "blocks 14-15" in tuned["limitations"]
    assert "ours-ae64 1.2.0" in tuned["limitations"] and "{" not in tuned["limitations"]
    assert (
        tuned["architecture"]["fused_with"] == member
        and tuned["training"]["augmentation"] == "horizontal flip"
    )
