"""One encoder made of two: a fine-tuned backbone head and an exported autoencoder, projected to 48-d.

Used by ``python -m models.transfer --fuse-with models/weights/ours-ae64.onnx`` (ours 2.1.0's MRI
encoder). On validation the two disagree on different pictures: for MRI, the EfficientNet-Lite0
head alone gives 0.943 and ``ours-ae64`` alone 0.926, their joined vectors 0.966. The joint vector
``[head(x), w · ae(x↓)]`` (both unit vectors, ``x↓`` the contract input resized to the
autoencoder's size with the antialiased bilinear filter that equals Pillow's) is centred and
projected onto its first 48 principal axes fitted on the training split, then L2-normalised, so
the result is a 48-d unit vector like every other encoder's and one index holds them all.

The autoencoder arrives as an ONNX file, since only the exported encoders are kept:
:func:`autoencoder_from_onnx` rebuilds it in torch from its card (the exporter folded BatchNorm
into the convolutions; the rebuilt BatchNorm layers are identities carrying the folded biases) and
refuses the result unless it matches onnxruntime on the ONNX file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.errors import ConfigError
from models.network import PaperAutoencoder
from models.preprocess import PreprocessContract
from models.runtime import load_sidecars

REBUILD_ATOL = 1e-4  # torch rebuild vs onnxruntime, max abs difference of the embeddings
ONNX_PREFIX = "model."  # models.export wraps the network as ``model``


def autoencoder_from_onnx(
    onnx_path: str | Path,
) -> tuple[PaperAutoencoder, dict[str, Any], PreprocessContract]:
    """The exported autoencoder as a torch module in eval mode, with its card and contract."""
    import onnx
    from onnx import numpy_helper

    onnx_path = Path(onnx_path)
    card, contract = load_sidecars(onnx_path)
    arch = card.get("architecture", {})
    if arch.get("name") != "paper":
        raise ConfigError(
            f"{onnx_path.name} is not an exported PaperAutoencoder (architecture {arch.get('name')!r})"
        )
    model = PaperAutoencoder(
        input_size=int(arch["input_size"]),
        widths=tuple(arch["widths"]) if arch.get("widths") else None,
        batchnorm=bool(arch.get("batchnorm")),
        normalize=bool(arch.get("normalize")),
        blocks=int(arch.get("blocks", 0)),
    ).eval()
    weights = {
        init.name.removeprefix(ONNX_PREFIX): torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in onnx.load(str(onnx_path)).graph.initializer
        if init.name.startswith(ONNX_PREFIX)
    }
    modules = dict(model.named_modules())
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ConfigError(f"{onnx_path.name} has no weight {name}: its card does not describe the file")
        used.add(name)
        return weights[name]

    with torch.no_grad():
        for name, module in modules.items():
            if not isinstance(module, nn.Conv2d) or not name.startswith(("encoder_body", "to_latent")):
                continue
            module.weight.copy_(take(f"{name}.weight"))
            if module.bias is not None:
                module.bias.copy_(take(f"{name}.bias"))
                continue
            parent, _, index = name.rpartition(".")
            norm = modules[f"{parent}.{int(index) + 1}"]
            if not isinstance(norm, nn.BatchNorm2d):
                raise ConfigError(f"{onnx_path.name}: no BatchNorm after {name}")
            norm.weight.fill_(1.0)
            norm.bias.copy_(take(f"{name}.weight_bias"))
            assert norm.running_mean is not None and norm.running_var is not None  # track_running_stats
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)  # sqrt(var + eps) == 1: the folded conv alone
    if missing := sorted(set(weights) - used):
        raise ConfigError(
            f"{onnx_path.name}: weights {missing[:5]} not placed in the rebuilt network: "
            "its card does not describe the file"
        )
    check_rebuild(model, onnx_path, contract.input_size)
    return model, card, contract


def check_rebuild(model: PaperAutoencoder, onnx_path: Path, size: int) -> float:
    """Max abs difference of the rebuilt encoder against onnxruntime on the file; refuses a mismatch."""
    import onnxruntime as ort

    batch = np.random.default_rng(0).random((4, 1, size, size), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.no_grad():
        got = model.encode(torch.from_numpy(batch)).numpy()
    diff = float(np.abs(got - expected).max())
    if not diff < REBUILD_ATOL:
        raise ConfigError(f"{onnx_path.name} rebuilt in torch differs from onnxruntime by {diff:.2e}")
    return diff


def check_compatible(outer: PreprocessContract, inner: PreprocessContract) -> None:
    """The inner encoder's input must follow from the outer contract's by resizing alone."""
    same = ("intensity", "resize", "interpolation", "channels", "mean", "std")
    differ = [f for f in same if getattr(outer, f) != getattr(inner, f)]
    if differ or outer.interpolation != "bilinear" or (outer.mean, outer.std) != (0.0, 1.0):
        raise ConfigError(f"cannot fuse encoders whose contracts differ in {differ or ['normalisation']}")
    if inner.input_size > outer.input_size:
        raise ConfigError("the fused autoencoder's input must not be larger than the outer contract's")


def fit_projection(joint: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection (D, dim)): the first ``dim`` principal axes of the training vectors."""
    if joint.shape[1] < dim or len(joint) < dim:
        raise ConfigError(
            f"cannot fit {dim} axes to {len(joint)} training vectors of {joint.shape[1]} values"
        )
    mean = joint.mean(0)
    _, _, axes = np.linalg.svd(joint - mean, full_matrices=False)
    return mean.astype(np.float32), axes[:dim].T.astype(np.float32).copy()


class FusedEncoder(nn.Module):
    """(N, 1, S, S) contract input -> (N, dim) unit vectors: both encoders, joined and projected."""

    joint_mean: torch.Tensor
    projection: torch.Tensor

    def __init__(self, first: nn.Module, autoencoder: PaperAutoencoder, weight: float = 1.0, dim: int = 48):
        """Unfitted until :meth:`set_projection`: the projection keeps ``first``'s ``dim`` values."""
        super().__init__()
        self.first = first.eval()
        self.autoencoder = autoencoder.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.size = autoencoder.input_size
        self.weight = float(weight)
        width = dim + autoencoder.latent_dim
        self.register_buffer("joint_mean", torch.zeros(width))
        self.register_buffer("projection", torch.eye(width, dim))

    def set_projection(self, weight: float, mean: np.ndarray, projection: np.ndarray) -> None:
        """The autoencoder's weight and the projection fitted for it (:func:`fit_projection`)."""
        self.weight = float(weight)
        self.joint_mean.copy_(torch.from_numpy(mean))
        self.projection.copy_(torch.from_numpy(projection))

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """[first's unit vector, weight · the autoencoder's unit vector of the resized picture]."""
        small = F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
        )
        first: Any = self.first
        return torch.cat([first.encode(x), self.weight * self.autoencoder.encode(small)], dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding the index stores."""
        return F.normalize((self.joint(x) - self.joint_mean) @ self.projection, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.encode(x)
