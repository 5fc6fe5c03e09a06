"""A modality's encoder from the packaged frozen backbone and a trained head (models.transfer)."""

import numpy as np
import pytest
from PIL import Image

from models.data import Record

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


def test_head_on_the_packaged_backbone_trains_on_served_features_and_exports(tmp_path):
    """The cached training features are those the exported graph computes, and the export passes
    the checker and parity (write_model); the kept head is the best val epoch's."""
    from models.export import write_model
    from models.preprocess import PreprocessContract, to_model_input
    from models.probe import load_backbone
    from models.runtime import OnnxEncoder
    from models.transfer import BackboneHeadEncoder, extract_features, fit

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    records = []
    for label, pattern in (
        ("stripes", (xx // 6) % 2),
        ("rings", ((xx - 24) ** 2 + (yy - 24) ** 2) // 60 % 2),
    ):
        for i in range(6):
            picture = np.clip(pattern * 200 + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(picture).save(tmp_path / f"{label}{i}.png")
            records.append(
                Record(
                    f"{label}{i}.png",
                    tmp_path / f"{label}{i}.png",
                    "xray",
                    label,
                    "val" if i < 2 else "train",
                )
            )
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
