"""Train an encoder (``cbmir train`` / ``python -m models.train``).

    python -m models.train --arch paper --config full --out runs/paper
    python -m models.train --arch paper --config small --out runs/paper-small
    python -m models.train --arch ours --config full --out runs/ours --set arch_kwargs.input_size=96

Seeded; tqdm progress; resumable (``--resume`` continues from ``last.pt``: weights, optimizer and
scheduler state, epoch, RNG); ``--max-minutes`` stops cleanly after the epoch that crosses the
limit so long runs can be split. The run folder gets ``config.json`` (resolved config),
``metrics.jsonl`` (one line per epoch), ``last.pt`` and ``best.pt`` (best by ``select_by``:
validation loss, or validation finding-level mAP@10 for the retrieval-trained models).

Splits: train on the manifest's ``train`` split, select on ``val``; ``test`` is never read.
Preprocessed inputs are cached under ``runs/cache`` (ignored by git).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import data as data_mod
from models.errors import ConfigError
from models.metrics import finding_metrics
from models.preprocess import PreprocessContract
from models.retrieval import rank_euclidean

if TYPE_CHECKING:  # torch is imported where it is used, so importing this module stays light
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

ARCH_PRESETS: dict[str, dict[str, Any]] = {
    # the paper: MSE autoencoder, Adam 1e-3 with Keras decay 2e-5, best by val loss, 35 epochs
    "paper": {
        "arch_kwargs": {"input_size": 64},
        "objective": {"mse": 1.0},
        "sampler": "shuffle",
        "select_by": "val_loss",
        "epochs": 35,
        "batch_size": 64,
    },
    # GeM autoencoder + supervised contrastive on finding labels + whitening (ladder step 2)
    "gem": {
        "arch_kwargs": {
            "input_size": 64,
            "widths": [128, 128, 128, 128],
            "blocks": 0,
            "batchnorm": False,
            "embed_dim": 128,
            "pooling": "gem",
        },
        "objective": {"mse": 10.0, "supcon": 1.0},
        "sampler": "balanced",
        "select_by": "val_map",
        "epochs": 15,
        "batch_size": 112,
        "fit_whitening": True,
    },
    "resnet": {
        "arch_kwargs": {"input_size": 64},
        "objective": {"ce": 1.0},
        "sampler": "balanced",
        "select_by": "val_map",
        "epochs": 8,
        "batch_size": 112,
    },
    "pca": {
        "arch_kwargs": {"input_size": 64, "n_components": 128},
        "objective": {},
        "epochs": 0,
        "select_by": "none",
    },
}
_RETRIEVAL = {
    "objective": {"mse": 100.0, "supcon": 1.0},
    "sampler": "balanced",
    "select_by": "val_map",
    "batch_size": 112,
    "epochs": 8,
}
_PAPER_BODY_GEM = {
    "input_size": 64,
    "widths": [128, 128, 128, 128],
    "blocks": 0,
    "batchnorm": False,
    "embed_dim": 128,
    "pooling": "gem",
}
# The "ours" ladder: each step adds one idea from the related work to the last step that was kept
# (kept = better validation finding-level mAP@10, macro over modalities). See models/README.md.
_S1 = {"input_size": 64, "normalize": True}
_S3 = {"input_size": 64, "widths": [32, 64, 128, 256], "batchnorm": True, "normalize": True}
_S4 = {"input_size": 128, "widths": [32, 64, 128, 256, 256], "batchnorm": True, "normalize": True}
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    # 1: the paper's autoencoder + supervised contrastive loss on finding labels, L2-normalised latent
    "ours-s1-supcon": ("paper", dict(_RETRIEVAL, arch_kwargs=_S1)),
    # 2: GeM-pooled 128-d head on the same encoder body, decoder from the embedding; the run also
    #    fits a learned whitening afterwards: best-unwhitened.pt is step 2, best.pt is 2 + whitening
    "ours-s2-gem": ("gem", dict(_RETRIEVAL, arch_kwargs=_PAPER_BODY_GEM, fit_whitening=True)),
    # 3: BatchNorm and a widening 32-64-128-256 encoder (and its mirrored decoder), on step 1
    "ours-s3-bn": ("paper", dict(_RETRIEVAL, arch_kwargs=_S3)),
    # 4: larger input, 128×128 (one more stride-2 stage keeps the 4×4×3 latent)
    "ours-s4-input128": ("paper", dict(_RETRIEVAL, arch_kwargs=_S4)),
    # 5: residual blocks (ResNet basic block after every stride-2 conv of the encoder), on step 3
    "ours-s5-residual": ("paper", dict(_RETRIEVAL, arch_kwargs=dict(_S3, blocks=1))),
    # 6: augmentation (random affine ±8°, scale 0.9-1.1, shift ±6 %, gamma 0.8-1.25), on step 5
    "ours-s6-augment": ("paper", dict(_RETRIEVAL, arch_kwargs=dict(_S3, blocks=1), augment=True)),
    # 7: longer training, 20 instead of 8 epochs, on step 5 (step 6 was not kept)
    "ours-s7-longer": ("paper", dict(_RETRIEVAL, arch_kwargs=dict(_S3, blocks=1), epochs=20)),
    # 8: step 6's augmentation on the pictures only: EEG traces keep their fixed time/amplitude scale
    "ours-s8-augment-images": (
        "paper",
        dict(
            _RETRIEVAL,
            arch_kwargs=dict(_S3, blocks=1),
            epochs=20,
            augment=[data_mod.XRAY, data_mod.MRI, data_mod.OCT],
        ),
    ),
    # 9: step 8 trained longer, 30 epochs (it was still improving at epoch 20)
    "ours-s9-augment-longer": (
        "paper",
        dict(
            _RETRIEVAL,
            arch_kwargs=dict(_S3, blocks=1),
            epochs=30,
            augment=[data_mod.XRAY, data_mod.MRI, data_mod.OCT],
        ),
    ),
}
# 10: step 9 with the EEG drawn as trace over spectrogram (models.eeg, render "trace-spectrogram")
RECIPES["ours-s10-eeg-spectrogram"] = (
    "paper",
    dict(RECIPES["ours-s9-augment-longer"][1], eeg_render="trace-spectrogram"),
)
# EEG views (measured, not kept: models/README.md): step 10's recipe on the EEG alone, every segment
# also seen through 16 time-shifted, sign-flipped views; an epoch is 17 passes (53 batches)
RECIPES["ours-eeg-views"] = (
    "paper",
    dict(
        RECIPES["ours-s10-eeg-spectrogram"][1],
        modalities=[data_mod.EEG],
        augment=False,
        eeg_views={"count": 16, "polarity": True},
        epochs=24,
    ),
)
# "ours" = the last kept step of the ladder (what models/weights ships)
RECIPES["ours"] = RECIPES["ours-s10-eeg-spectrogram"]
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "full": {"subset": None},
    # a class-balanced subset and 2 epochs: a few minutes on a 2-core CPU
    "small": {"subset": {"train": 24, "val": 8}, "epochs": 2},
}
BASE_CONFIG: dict[str, Any] = {
    "seed": 0,
    "lr": 1e-3,
    "lr_decay": 2e-5,
    "supcon_temperature": 0.1,
    "augment": False,
    "fit_whitening": False,
    "whitening_shrinkage": 0.1,
    "threads": 1,
    "patience": None,
    "channels_last": True,
    "eeg_render": "trace",  # models.eeg.RENDERS; stored in the model's preprocessing contract
    "modalities": None,  # train and select on these modalities only (None: all of them)
    # {"count": V, "polarity": bool}: V time-shifted (and sign-flipped) views of every EEG training
    # segment, drawn once (models.eeg.training_view); each batch row of an EEG segment is one of its
    # V views or the segment as drawn, at equal odds, and an epoch is V + 1 passes of batches
    "eeg_views": None,
}
# settings allowed to change when resuming: performance-only ones, and ``epochs`` (extending a
# run gives the same result as a longer run from scratch: per-step LR decay, per-epoch seeded batches)
RESUMABLE_KEYS = {"threads", "max_minutes", "data", "channels_last", "epochs", "device"}
DEVICES = ("auto", "cpu", "cuda")


def resolve_torch_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is a ConfigError."""
    import torch

    if name not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device='cuda' but this torch build sees no CUDA GPU "
            f"(torch {torch.__version__}, cuda {torch.version.cuda})"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """The device holding the model's parameters (or buffers); the CPU for an empty model."""
    import torch

    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def resolve_config(
    arch: str, size: str, overrides: list[str] | None = None, **explicit: Any
) -> dict[str, Any]:
    """Base config <- arch preset <- size preset <- ``--set key=value`` overrides <- explicit args."""
    recipe = None
    if arch in RECIPES:
        recipe, (arch, recipe_overrides) = arch, RECIPES[arch]
    elif arch not in ARCH_PRESETS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCH_PRESETS) + sorted(RECIPES)}")
    config = copy.deepcopy(BASE_CONFIG)
    config.update(copy.deepcopy(ARCH_PRESETS[arch]))
    if recipe:
        config.update(copy.deepcopy(recipe_overrides))
    config.update(copy.deepcopy(SIZE_PRESETS[size]))
    config["arch"], config["size"], config["recipe"] = arch, size, recipe
    for item in overrides or []:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    config.update({k: v for k, v in explicit.items() if v is not None})
    return config


def select_subset(records: list[data_mod.Record], per_class: int, seed: int) -> list[data_mod.Record]:
    """Up to ``per_class`` records of each finding, drawn with a seeded RNG, in manifest order."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r.finding, []).append(i)
    keep = sorted(i for idx in by_class.values() for i in rng.sample(idx, min(per_class, len(idx))))
    return [records[i] for i in keep]


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) on L2-normalised embeddings."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, -1e9)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    valid = n_pos > 0
    if not valid.any():
        return z.sum() * 0.0
    mean_log_prob = (log_prob * positives).sum(1)[valid] / n_pos[valid]
    return -mean_log_prob.mean()


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (scale 0.9-1.1, rotation ±8°, shift ±6%) and gamma 0.8-1.25, per image."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = u(-8, 8) * math.pi / 180
    scale = u(0.9, 1.1)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(u(math.log(0.8), math.log(1.25)))[:, None, None, None]
    return out.clamp(0, 1).pow(gamma)


def augment_selected(x: torch.Tensor, mask: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """``augment_batch`` on the rows where ``mask`` is true; the other rows are returned untouched."""
    import torch

    if not mask.any():
        return x
    if mask.all():
        return augment_batch(x, generator)
    chosen = torch.from_numpy(mask)
    out = x.clone()
    out[chosen] = augment_batch(x[chosen], generator).to(x.dtype)
    return out


def compute_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the configured objective terms; returns (total, {term: value})."""
    import torch.nn.functional as F

    objective = config["objective"]
    output, z = model(x)
    terms = {}
    if objective.get("mse"):
        target = x if output.shape[-1] == x.shape[-1] else F.adaptive_avg_pool2d(x, output.shape[-2:])
        terms["mse"] = F.mse_loss(output, target)
    if objective.get("supcon"):
        terms["supcon"] = supcon_loss(z, y, config["supcon_temperature"])
    if objective.get("ce"):
        terms["ce"] = F.cross_entropy(output, y)
    total: torch.Tensor = sum(objective[name] * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}


def batch_order(
    labels: np.ndarray, batch_size: int, sampler: str, rng: np.random.Generator, passes: int = 1
) -> list[np.ndarray]:
    """Index batches for one epoch of ``passes`` × the data: shuffled, or class-balanced (every
    class, equal share; the only sampler that takes several passes)."""
    n = len(labels)
    n_batches = max(1, passes * n // batch_size)
    if sampler == "shuffle":
        if passes != 1:
            raise ConfigError("the shuffle sampler takes one pass per epoch")
        order = rng.permutation(n)
        return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    classes = np.unique(labels)
    per_class = max(2, batch_size // len(classes))
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    return [
        np.concatenate([rng.choice(pools[c], per_class, replace=len(pools[c]) < per_class) for c in classes])
        for _ in range(n_batches)
    ]


def pick_views(
    inputs: np.ndarray, idx: np.ndarray, views: np.ndarray, view_rows: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``inputs[idx]`` with every row that has views (``view_rows >= 0``) replaced by one of its
    ``views`` or kept as drawn, at equal odds."""
    batch = inputs[idx]
    rows = view_rows[idx]
    choice = rng.integers(-1, views.shape[1], len(idx))  # -1: the segment as drawn
    use = (rows >= 0) & (choice >= 0)
    if use.any():
        batch[use] = views[rows[use], choice[use]]
    return batch


def embed_tensor(model: Any, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model.encode`` of ``inputs`` in batches, on the model's device, as float32 numpy."""
    import torch

    model.eval()
    device = model_device(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(inputs[start : start + batch_size]).to(device)
            out.append(model.encode(batch).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def validation_map(
    model: Any,
    train_inputs: np.ndarray,
    train_records: list[data_mod.Record],
    val_inputs: np.ndarray,
    val_records: list[data_mod.Record],
    k: int = 10,
) -> dict[str, Any]:
    """Finding-level mAP@10 of val queries against the train database (Euclidean on ``encode``)."""
    db = embed_tensor(model, train_inputs)
    qs = embed_tensor(model, val_inputs)
    order = rank_euclidean(qs, db, 20)
    db_find = np.array([r.finding for r in train_records])
    counts = {f: int((db_find == f).sum()) for f in set(db_find.tolist())}
    result = finding_metrics(
        [r.modality for r in val_records],
        [r.finding for r in val_records],
        [db_find[row].tolist() for row in order],
        [counts.get(r.finding, 0) for r in val_records],
    )
    return {
        "val_map@10": result["macro"][f"map@{k}"],
        **{f"val_map@10_{m}": result[m][f"map@{k}"] for m in result if m not in ("overall", "macro")},
    }


class Trainer:
    """One training run in ``out_dir`` (see module docstring)."""

    def __init__(
        self,
        config: dict[str, Any],
        out_dir: str | Path,
        train_records: list[data_mod.Record],
        train_inputs: np.ndarray,
        val_records: list[data_mod.Record],
        val_inputs: np.ndarray,
        manifest_sha256: str | None = None,
    ):
        import torch

        from models.network import build_model, describe

        self.torch = torch
        self.config = config
        self.out_dir = Path(out_dir)
        self.train_records, self.val_records = train_records, val_records
        self.train_inputs, self.val_inputs = train_inputs, val_inputs
        self.manifest_sha256 = manifest_sha256
        self.classes = sorted({r.finding for r in train_records})
        class_index = {c: i for i, c in enumerate(self.classes)}
        self.train_labels = np.array([class_index[r.finding] for r in train_records])
        self.val_labels = np.array([class_index.get(r.finding, -1) for r in val_records])
        # augment: False, True (every picture) or a list of modalities whose pictures are augmented
        augment = config["augment"]
        self.augment_mask = np.array(
            [bool(augment) and (augment is True or r.modality in augment) for r in train_records]
        )
        torch.manual_seed(config["seed"])
        arch_kwargs = dict(config["arch_kwargs"])
        if config["arch"] == "resnet":
            arch_kwargs.setdefault("n_classes", len(self.classes))
        for key in ("widths",):
            if key in arch_kwargs:
                arch_kwargs[key] = tuple(arch_kwargs[key])
        self.arch_kwargs = arch_kwargs
        # One of models.network.ARCHITECTURES: all have encode(); fit, whiten, raw_embedding per arch.
        self.model: Any = build_model(config["arch"], **arch_kwargs)
        self.summary = describe(self.model)
        self.memory_format = torch.channels_last if config.get("channels_last") else torch.contiguous_format
        self.device = resolve_torch_device(config.get("device", "cpu"))
        # torch's annotations of Module.to omit the memory_format it accepts
        self.model = self.model.to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]
        self.contract = training_contract(config)
        self.eeg_views, self.view_rows, self.passes = None, np.full(len(train_records), -1), 1
        if config.get("eeg_views"):
            if config["sampler"] != "balanced":
                raise ConfigError("eeg_views needs the balanced sampler")
            rows = np.flatnonzero([r.modality == data_mod.EEG for r in train_records])
            self.view_rows[rows] = np.arange(len(rows))
            count = int(config["eeg_views"]["count"])
            self.eeg_views = data_mod.eeg_view_inputs(
                [train_records[i] for i in rows],
                self.contract,
                count,
                bool(config["eeg_views"]["polarity"]),
                config["seed"],
            )
            self.passes = count + 1
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config["lr"]) if params else None
        decay = config["lr_decay"]
        self.scheduler = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 / (1.0 + decay * step))
            if self.optimizer
            else None
        )
        self.epoch, self.step = 0, 0
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        torch = self.torch
        with torch.no_grad():
            dim = int(
                self.model.encode(
                    self.torch.zeros(
                        1, 1, self.contract.input_size, self.contract.input_size, device=self.device
                    )
                ).shape[1]
            )
        return {
            "arch": self.config["arch"],
            "arch_kwargs": self.arch_kwargs,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_score if self.config["select_by"] == "val_loss" else None,
            "config": self.config,
            "contract": self.contract.to_dict(),
            "embedding_dim": dim,
            "manifest_sha256": self.manifest_sha256,
            "classes": self.classes,
            "summary": self.summary,
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def save(self, name: str, ckpt: dict[str, Any] | None = None) -> None:
        ckpt = ckpt or self.checkpoint()
        tmp = self.out_dir / f".{name}.tmp"
        self.torch.save(ckpt, tmp)
        tmp.replace(self.out_dir / name)

    def resume(self) -> None:
        ckpt = self.torch.load(self.out_dir / "last.pt", map_location="cpu", weights_only=False)
        old = {k: v for k, v in ckpt["config"].items() if k not in RESUMABLE_KEYS | {"recipe"}}
        new = {k: v for k, v in self.config.items() if k not in RESUMABLE_KEYS | {"recipe"}}
        if old != new:
            raise SystemExit(
                f"config differs from the checkpoint's; refusing to resume\nold: {old}\nnew: {new}"
            )
        self.model.load_state_dict(ckpt["model"])
        if self.optimizer and self.scheduler:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best_score, self.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
        self.history = ckpt.get("history", [])
        self.torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        logger.info("resumed from epoch %d (step %d)", self.epoch, self.step)

    # -- training ------------------------------------------------------------------------------
    def evaluate_val(self) -> dict[str, Any]:
        torch = self.torch
        self.model.eval()
        result: dict[str, Any] = {}
        if self.config["objective"]:
            losses, n = 0.0, 0
            terms_sum: dict[str, float] = {}
            labels = np.where(self.val_labels < 0, 0, self.val_labels)
            chunks = [c for c in np.array_split(np.arange(len(labels)), max(1, len(labels) // 128)) if len(c)]
            with torch.no_grad():
                for idx in chunks:
                    x = torch.from_numpy(self.val_inputs[idx]).to(self.device)
                    y = torch.from_numpy(labels[idx]).to(self.device)
                    loss, terms = compute_loss(self.model, x, y, self.config)
                    losses += loss.item() * len(idx)
                    n += len(idx)
                    for key, value in terms.items():
                        terms_sum[key] = terms_sum.get(key, 0.0) + value * len(idx)
            result["val_loss"] = losses / max(n, 1)
            result.update({f"val_{k}": v / max(n, 1) for k, v in terms_sum.items()})
        if self.config["select_by"] == "val_map":
            result.update(
                validation_map(
                    self.model, self.train_inputs, self.train_records, self.val_inputs, self.val_records
                )
            )
        return result

    def is_better(self, metrics: dict[str, Any]) -> bool:
        select = self.config["select_by"]
        if select == "none":
            return True
        score = metrics["val_loss"] if select == "val_loss" else -metrics["val_map@10"]
        if self.best_score is None or score < self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            return True
        return False

    def train_epoch(self) -> dict[str, Any]:
        from tqdm import tqdm

        torch = self.torch
        config = self.config
        rng = np.random.default_rng([config["seed"], self.epoch])
        generator = torch.Generator().manual_seed(config["seed"] * 1000 + self.epoch)
        batches = batch_order(self.train_labels, config["batch_size"], config["sampler"], rng, self.passes)
        assert self.optimizer is not None and self.scheduler is not None  # every trained arch has parameters
        self.model.train()
        total, n = 0.0, 0
        terms_sum: dict[str, float] = {}
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}/{config['epochs']}", unit="batch", leave=False)
        for idx in bar:
            picked = (
                self.train_inputs[idx]
                if self.eeg_views is None
                else pick_views(self.train_inputs, idx, self.eeg_views, self.view_rows, rng)
            )
            x = torch.from_numpy(picked).contiguous(memory_format=self.memory_format)
            x = augment_selected(x, self.augment_mask[idx], generator)
            x = x.to(self.device, non_blocking=True)
            y = torch.from_numpy(self.train_labels[idx]).to(self.device)
            loss, terms = compute_loss(self.model, x, y, config)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            total += loss.item() * len(idx)
            n += len(idx)
            for key, value in terms.items():
                terms_sum[key] = terms_sum.get(key, 0.0) + value * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        return {
            "train_loss": total / max(n, 1),
            **{f"train_{k}": v / max(n, 1) for k, v in terms_sum.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def fit(self, max_minutes: float | None = None) -> bool:
        """Train up to ``config['epochs']``; returns True when finished, False when stopped early."""
        torch = self.torch
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        started = time.monotonic()
        if self.config["arch"] == "pca":
            self.model.fit(torch.from_numpy(self.train_inputs).to(self.device))
            self.epoch = 0
            metrics = {"epoch": 0, **self.evaluate_val()}
            self.history.append(metrics)
            self.is_better(metrics)
            self._log_epoch(metrics)
            self.save("last.pt")
            self.save("best.pt")
            return True
        patience = self.config.get("patience")
        while self.epoch < self.config["epochs"]:
            t0 = time.monotonic()
            metrics = self.train_epoch()
            self.epoch += 1
            metrics.update(self.evaluate_val())
            metrics = {"epoch": self.epoch, **metrics, "seconds": round(time.monotonic() - t0, 1)}
            improved = self.is_better(metrics)
            metrics["best_epoch"] = self.best_epoch
            self.history.append(metrics)
            self._log_epoch(metrics)
            ckpt = self.checkpoint()
            if improved:
                self.save("best.pt", ckpt)
            self.save("last.pt", ckpt)
            if patience and self.best_epoch is not None and self.epoch - self.best_epoch >= patience:
                logger.info("no improvement for %d epochs; stopping", patience)
                break
            if (
                max_minutes
                and (time.monotonic() - started) / 60 > max_minutes
                and self.epoch < self.config["epochs"]
            ):
                logger.info(
                    "stopping after epoch %d (--max-minutes %.1f); continue with --resume",
                    self.epoch,
                    max_minutes,
                )
                return False
        if self.config.get("fit_whitening"):
            self.fit_whitening()
        return True

    def fit_whitening(self) -> None:
        """Fit the model's whitening on train embeddings, in ``best.pt`` (the old one is kept as
        best-unwhitened.pt)."""
        torch = self.torch
        best_path = self.out_dir / "best.pt"
        ckpt = torch.load(best_path, map_location=self.device, weights_only=False)
        if ckpt.get("whitened"):
            return
        self.model.load_state_dict(ckpt["model"])
        self.model.eval()
        with torch.no_grad():
            raw = torch.cat(
                [
                    self.model.raw_embedding(torch.from_numpy(self.train_inputs[i : i + 256]).to(self.device))
                    for i in range(0, len(self.train_inputs), 256)
                ]
            )
        self.model.whiten.fit(raw, shrinkage=self.config["whitening_shrinkage"])
        whitened = dict(ckpt, model=self.model.state_dict(), whitened=True)
        whitened["whitening_val"] = validation_map(
            self.model, self.train_inputs, self.train_records, self.val_inputs, self.val_records
        )
        torch.save(ckpt, self.out_dir / "best-unwhitened.pt")
        self.save("best.pt", whitened)
        logger.info("whitening fitted; val %s", whitened["whitening_val"])
        with (self.out_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"whitening": whitened["whitening_val"]}) + "\n")

    def _log_epoch(self, metrics: dict[str, Any]) -> None:
        with (self.out_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}
        logger.info("epoch %s: %s", metrics.get("epoch"), shown)


def training_contract(config: dict[str, Any]) -> PreprocessContract:
    """The preprocessing contract a run trains with (and its exported model serves with)."""
    return PreprocessContract(
        input_size=config["arch_kwargs"]["input_size"], eeg_render=config.get("eeg_render", "trace")
    )


def load_training_data(
    config: dict[str, Any], cache_dir: Path | None = data_mod.DEFAULT_CACHE_DIR
) -> tuple[list[data_mod.Record], np.ndarray, list[data_mod.Record], np.ndarray, str]:
    """(train records, train inputs, val records, val inputs, manifest sha256) per the config."""
    data_dir = Path(config["data"])
    contract = training_contract(config)
    modalities = config.get("modalities")
    train = data_mod.read_manifest(data_dir, splits=["train"], modalities=modalities)
    val = data_mod.read_manifest(data_dir, splits=["val"], modalities=modalities)
    subset = config.get("subset")
    if subset:
        train = select_subset(train, subset["train"], config["seed"])
        val = select_subset(val, subset["val"], config["seed"])
    all_records = train + val
    inputs = data_mod.cached_model_inputs(all_records, contract, cache_dir)
    return train, inputs[: len(train)], val, inputs[len(train) :], data_mod.manifest_sha256(data_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        default="paper",
        choices=sorted(ARCH_PRESETS) + sorted(RECIPES),
        help="model family, or a named recipe (a step of the 'ours' ladder)",
    )
    parser.add_argument(
        "--config",
        default="full",
        choices=sorted(SIZE_PRESETS),
        help="'small': class-balanced subset, 2 epochs (minutes); 'full': all of train/val",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, config, metrics)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data folder with manifest.csv (default: $CBMIR_SHARED_DATA or ../shared/data)",
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry (JSON value; dotted keys, e.g. arch_kwargs.input_size=96)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch crossing this")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)"
    )
    parser.add_argument("--no-cache", action="store_true", help="do not cache preprocessed inputs")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=DEVICES,
        help="where torch trains: the CPU, a CUDA GPU, or auto (CUDA when present)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    try:
        device = resolve_torch_device(args.device)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("training on %s", device)
    data_dir = args.data or data_mod.shared_data_dir()
    config = resolve_config(
        args.arch,
        args.config,
        args.set,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        data=str(Path(data_dir).resolve()),
        threads=args.threads,
        device=args.device,
    )
    out = Path(args.out)
    if (out / "last.pt").exists() and not args.resume:
        logger.error("%s already holds a run; pass --resume to continue it or choose another --out", out)
        return 2
    random.seed(config["seed"])
    np.random.seed(config["seed"])
    train, train_x, val, val_x, sha = load_training_data(
        config, None if args.no_cache else data_mod.DEFAULT_CACHE_DIR
    )
    logger.info(
        "train %d, val %d pictures; config %s",
        len(train),
        len(val),
        hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12],
    )
    trainer = Trainer(config, out, train, train_x, val, val_x, sha)
    logger.info("model: %s", trainer.summary)
    if args.resume and (out / "last.pt").exists():
        trainer.resume()
    finished = trainer.fit(args.max_minutes)
    logger.info(
        "%s; best epoch %s (score %s) in %s",
        "finished" if finished else "paused",
        trainer.best_epoch,
        trainer.best_score,
        out / "best.pt",
    )
    return 0 if finished else 3


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
