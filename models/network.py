"""Network definitions (torch; imported by training and export only, never by serving).

Every model has ``encode(x) -> (N, dim)`` (what gets exported) and ``forward(x) ->
(output, embedding)`` used by training. Architectures: ``paper`` (below; with
options it is also "ours", see ``models.train.RECIPES``), ``gem`` (:class:`GemAutoencoder`),
``resnet`` (:class:`ResNetClassifier`), ``pca`` (:class:`PcaEncoder`).

``paper`` -- the convolutional autoencoder of the reference paper:

* input: 1×64×64 (our choice; see ``models/README.md``), values in [0, 1] (min-max contract);
* encoder: 4 × [Conv2D 3×3, stride 2, 128 filters, "same" padding, LeakyReLU(0.2)]
  (64 -> 32 -> 16 -> 8 -> 4), then Conv2D 3×3, stride 1, 3 filters, linear -> 4×4×3 = **48**
  latent values, flattened (the embedding);
* decoder, the encoder's mirror: Conv2D 3×3 3 -> 128 + LeakyReLU(0.2), 3 × [ConvTranspose2D
  3×3, stride 2, 128 filters, LeakyReLU(0.2)] (4 -> 32), ConvTranspose2D 3×3, stride 2, 1 filter
  + sigmoid (32 -> 64);
* trained with MSE reconstruction loss (Adam lr 1e-3, Keras-style decay 2e-5 per iteration).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(c_in: int, c_out: int, stride: int, batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batchnorm)]
    layers += [nn.BatchNorm2d(c_out)] if batchnorm else []
    return nn.Sequential(*layers, nn.LeakyReLU(0.2))


def _up_block(c_in: int, c_out: int, batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=not batchnorm)
    ]
    layers += [nn.BatchNorm2d(c_out)] if batchnorm else []
    return nn.Sequential(*layers, nn.LeakyReLU(0.2))


class PaperAutoencoder(nn.Module):
    """The paper's convolutional autoencoder with a 48-value latent (see module docstring).

    ``widths`` (one per stride-2 stage, default ``filters`` everywhere), ``batchnorm``,
    ``blocks`` (residual blocks after each stride-2 conv of the encoder) and ``normalize``
    (L2-normalised embedding, so Euclidean ranking is cosine ranking) exist for the "ours" ladder;
    the defaults are the paper's network.
    """

    def __init__(
        self,
        input_size: int = 64,
        filters: int = 128,
        latent_dim: int = 48,
        bottleneck: int = 4,
        widths: tuple[int, ...] | None = None,
        batchnorm: bool = False,
        normalize: bool = False,
        blocks: int = 0,
    ):
        super().__init__()
        self.normalize = normalize
        depth = round(math.log2(input_size / bottleneck))
        if bottleneck * 2**depth != input_size:
            raise ValueError(f"input_size must be {bottleneck}·2^k, got {input_size}")
        if latent_dim % (bottleneck * bottleneck):
            raise ValueError("latent_dim must be a multiple of bottleneck²")
        widths = tuple(widths) if widths else (filters,) * depth
        if len(widths) != depth:
            raise ValueError(f"need {depth} widths for input {input_size}, got {widths}")
        self.input_size, self.depth, self.latent_dim = input_size, depth, latent_dim
        self.latent_channels = latent_dim // (bottleneck * bottleneck)
        ins = (1, *widths[:-1])
        stages: list[nn.Module] = []
        for c_in, c_out in zip(ins, widths, strict=True):
            stages.append(_conv_block(c_in, c_out, 2, batchnorm))
            stages += [ResidualBlock(c_out) for _ in range(blocks)]
        self.encoder_body = nn.Sequential(*stages)
        self.to_latent = nn.Conv2d(widths[-1], self.latent_channels, 3, padding=1)
        self.from_latent = _conv_block(self.latent_channels, widths[-1], 1, batchnorm)
        rev = widths[::-1]
        self.decoder_body = nn.Sequential(*[_up_block(i, o, batchnorm) for i, o in itertools.pairwise(rev)])
        self.to_image = nn.ConvTranspose2d(widths[0], 1, 3, stride=2, padding=1, output_padding=1)

    def encode_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.encoder_body(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.flatten(self.encode_map(x), 1)
        return F.normalize(z, dim=1) if self.normalize else z

    def decode_map(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.to_image(self.decoder_body(self.from_latent(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_map = self.encode_map(x)
        return self.decode_map(z_map), torch.flatten(z_map, 1)


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.): (mean x^p)^(1/p) over space, p learned."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class Whitening(nn.Module):
    """Learned linear whitening ``(z - mean) @ matrix`` fitted on training embeddings; identity until
    fitted."""

    mean: torch.Tensor  # buffers (register_buffer)
    matrix: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) @ self.matrix

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, shrinkage: float = 0.1) -> None:
        """PCA whitening with shrinkage toward the mean eigenvalue (keeps all dimensions)."""
        mean = embeddings.mean(0)
        centred = (embeddings - mean).double()
        cov = centred.T @ centred / max(1, len(centred) - 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval = eigval.clamp(min=1e-12)
        eigval = (1 - shrinkage) * eigval + shrinkage * eigval.mean()
        self.mean.copy_(mean)
        self.matrix.copy_((eigvec / eigval.sqrt()).float())
        self.fitted.fill_(True)


class GemAutoencoder(nn.Module):
    """Autoencoder with a GeM-pooled head (step 2 of the "ours" ladder; not kept, see README).

    * encoder: per stage [Conv 3×3 stride 2 (+ BatchNorm if ``batchnorm``) + LeakyReLU(0.2), then
      ``blocks`` residual 3×3 conv pairs], widths ``widths``; input S×S -> S/2^len(widths). With
      widths (128,)*4, blocks 0 and no BatchNorm this is exactly the paper's encoder body;
    * head: ``pooling`` = "gem" (GeM over the last map) or "flatten" (the whole map), then a
      linear layer to ``embed_dim``; :meth:`encode` applies the optional fitted
      :class:`Whitening` and L2-normalises (so Euclidean ranking equals cosine ranking);
    * decoder (training only): linear embedding -> 128×4×4, ConvTranspose ×3 (-> 32×32) and a
      1-channel sigmoid output; the reconstruction target is the input box-resized to 32×32.
    """

    def __init__(
        self,
        input_size: int = 64,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        blocks: int = 1,
        embed_dim: int = 128,
        pooling: str = "gem",
        recon_size: int = 32,
        whitening: bool = True,
        batchnorm: bool = True,
    ):
        super().__init__()
        self.input_size, self.embed_dim, self.pooling, self.recon_size = (
            input_size,
            embed_dim,
            pooling,
            recon_size,
        )
        layers: list[nn.Module] = []
        c_in = 1
        for width in widths:
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(width)] if batchnorm else []
            layers += [nn.LeakyReLU(0.2)]
            layers += [ResidualBlock(width) for _ in range(blocks)]
            c_in = width
        self.features = nn.Sequential(*layers)
        final = input_size // 2 ** len(widths)
        if pooling == "gem":
            self.pool: nn.Module = GeM()
            pooled = widths[-1]
        elif pooling == "flatten":
            self.pool = nn.Flatten(1)
            pooled = widths[-1] * final * final
        else:
            raise ValueError(f"unknown pooling {pooling!r}")
        self.head = nn.Linear(pooled, embed_dim)
        self.whiten = Whitening(embed_dim) if whitening else None
        self.decoder_in = nn.Linear(embed_dim, 128 * 4 * 4)
        ups, size, ch = [], 4, 128
        while size < recon_size // 2:
            ups += [
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                nn.LeakyReLU(0.2),
            ]
            ch //= 2
            size *= 2
        ups += [nn.ConvTranspose2d(ch, 1, 3, stride=2, padding=1, output_padding=1)]
        self.decoder = nn.Sequential(*ups)

    def raw_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.raw_embedding(x)
        if self.whiten is not None:
            z = self.whiten(z)
        return F.normalize(z, dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.decoder_in(z).view(-1, 128, 4, 4)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.raw_embedding(x)
        return self.decode(z), z


class ResidualBlock(nn.Module):
    """Two 3×3 convs with BatchNorm and an identity shortcut (ResNet basic block, same width)."""

    def __init__(self, width: int, activation: str = "leaky"):
        super().__init__()
        act = nn.LeakyReLU(0.2) if activation == "leaky" else nn.ReLU()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            act,
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class DownBlock(nn.Module):
    """ResNet basic block that halves the size and changes the width (1×1 projection shortcut)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.body(x))


class ResNetClassifier(nn.Module):
    """ResNet-18-like classifier from scratch: stem 3×3/2, stages [2,2,2,2] basic blocks, widths
    ``widths``, global average pooling, linear classifier. The embedding is the L2-normalised
    penultimate (pooled) feature vector."""

    def __init__(
        self, input_size: int = 64, widths: tuple[int, ...] = (32, 64, 128, 256), n_classes: int = 14
    ):
        super().__init__()
        self.input_size = input_size
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages: list[nn.Module] = [ResidualBlock(widths[0], "relu"), ResidualBlock(widths[0], "relu")]
        for c_in, c_out in itertools.pairwise(widths):
            stages += [DownBlock(c_in, c_out), ResidualBlock(c_out, "relu")]
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], n_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.penultimate(x), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.penultimate(x)
        return self.classifier(z), z


class PcaEncoder(nn.Module):
    """Raw pixels -> PCA projection (fitted on training inputs) -> L2 norm (cosine ranking)."""

    mean: torch.Tensor  # buffers (register_buffer)
    components: torch.Tensor

    def __init__(self, input_size: int = 64, n_components: int = 128):
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mean", torch.zeros(input_size * input_size))
        self.register_buffer("components", torch.zeros(input_size * input_size, n_components))

    @torch.no_grad()
    def fit(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(len(inputs), -1).double()
        mean = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        self.mean.copy_(mean.float())
        self.components.copy_(vh[: self.components.shape[1]].T.float())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((torch.flatten(x, 1) - self.mean) @ self.components, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.encode(x)


class EncoderOnly(nn.Module):
    """Wraps a model's ``encode`` as ``forward`` for export: (N,1,S,S) -> (N, dim)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode(self.model, x)


def encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.encode(x)``: every architecture here has ``encode`` (nn.Module types its attributes
    as ``Tensor | Module``, so the call goes through this one typed place)."""
    method = cast(Callable[[torch.Tensor], torch.Tensor], model.encode)
    return method(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "paper": PaperAutoencoder,
    "gem": GemAutoencoder,
    "resnet": ResNetClassifier,
    "pca": PcaEncoder,
}


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered architecture by name."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(**kwargs)


def describe(model: nn.Module) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({n_params / 1e6:.2f} M parameters)"
