"""The pretrained-backbone probe: packaged weights load offline, features and scores are right."""

import numpy as np
import pytest
from PIL import Image

from models.data import Record
from models.probe import backbone_input, extract_features, map_at_10, probe

pytest.importorskip("torch")


def test_map_at_10_on_a_hand_made_ranking():
    database = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = np.array(["a", "a", "b", "b"])
    # query at 0.4: ranking a, a, b, b -> AP 1; query at 10.4 labelled a: b, b, a, a -> (1/3 + 2/4) / 2
    score = map_at_10(np.array([[0.4], [10.4]]), np.array(["a", "a"]), database, labels)
    assert score == pytest.approx((1.0 + (1 / 3 + 2 / 4) / 2) / 2)


def test_backbone_input_is_scaled_and_normalised():
    picture = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    x = backbone_input(picture, 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    # min-max first: the darkest pixel is 0 before the ImageNet normalisation of each channel
    assert x[0].min() == pytest.approx(-0.485 / 0.229, abs=0.05)


def test_packaged_backbone_separates_two_patterns(tmp_path):
    """The ImageNet weights ship in the package (no download); two patterns get separate features."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    records = []
    for label, pattern in (
        ("stripes", (xx // 6) % 2),
        ("rings", ((xx - 24) ** 2 + (yy - 24) ** 2) // 60 % 2),
    ):
        for i in range(6):
            picture = np.clip(pattern * 200 + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
            path = tmp_path / f"{label}{i}.png"
            Image.fromarray(picture).save(path)
            records.append(Record(path.name, path, "xray", label, "val" if i < 2 else "train"))
    features = extract_features(records, 64, progress=False)
    assert features.shape == (12, 1280) and np.isfinite(features).all()
    labels = np.array([r.label for r in records])
    splits = np.array([r.split for r in records])
    result = probe(features, labels, splits, epochs=10, seed=0)
    assert result["raw"] == pytest.approx(1.0)
    assert set(result) >= {"pca_whitened_64", "supcon_linear", "supcon_mlp512"}
    assert result["supcon_mlp512"]["best_epoch"] == 10
