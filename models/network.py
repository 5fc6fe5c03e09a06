"""Network definitions (torch; imported by training and export only, never by serving).

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

import math

import torch
from torch import nn
import torch.nn.functional as F


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1), nn.LeakyReLU(0.2)
    )


class PaperAutoencoder(nn.Module):
    """The paper's convolutional autoencoder with a 48-value latent (see module docstring)."""

    def __init__(self, input_size: int = 64, filters: int = 128, latent_dim: int = 48, bottleneck: int = 4):
        super().__init__()
        depth = int(round(math.log2(input_size / bottleneck)))
        if bottleneck * 2**depth != input_size:
            raise ValueError(f"input_size must be {bottleneck}·2^k, got {input_size}")
        if latent_dim % (bottleneck * bottleneck):
            raise ValueError("latent_dim must be a multiple of bottleneck²")
        self.input_size, self.depth, self.latent_dim = input_size, depth, latent_dim
        self.latent_channels = latent_dim // (bottleneck * bottleneck)
        down = [_conv_block(1 if i == 0 else filters, filters, 2) for i in range(depth)]
        self.encoder_body = nn.Sequential(*down)
        self.to_latent = nn.Conv2d(filters, self.latent_channels, 3, padding=1)
        self.from_latent = _conv_block(self.latent_channels, filters, 1)
        self.decoder_body = nn.Sequential(*[_up_block(filters, filters) for _ in range(depth - 1)])
        self.to_image = nn.ConvTranspose2d(filters, 1, 3, stride=2, padding=1, output_padding=1)

    def encode_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.encoder_body(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.encode_map(x), 1)

    def decode_map(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.to_image(self.decoder_body(self.from_latent(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_map = self.encode_map(x)
        return self.decode_map(z_map), torch.flatten(z_map, 1)


class EncoderOnly(nn.Module):
    """Wraps a model's ``encode`` as ``forward`` for export: (N,1,S,S) -> (N, dim)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {"paper": PaperAutoencoder}


def build_model(arch: str, **kwargs) -> nn.Module:
    """Instantiate a registered architecture by name."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(**kwargs)


def describe(model: nn.Module) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({n_params / 1e6:.2f} M parameters)"


__all__ = ["PaperAutoencoder", "EncoderOnly", "ARCHITECTURES", "build_model", "describe", "F"]
