"""The ICM-LoRA generator: a conditional VAE over flat LoRA vectors (a plain ``nn.Module``).

The flat vector is zero-padded to a multiple of ``2 ** len(channels)`` and read as a 1-channel
sequence. Encoder: stride-2 Conv1d blocks (BatchNorm, LeakyReLU), flatten, a linear layer, then the
condition joins before the mean / log-variance heads. Decoder: a linear layer from [z, c] to the
last feature map and mirrored ConvTranspose1d blocks (BatchNorm, ELU), then a Conv1d to one
channel. Defaults are the paper's (12 blocks, channels 8 ... 256 ... 8, kernel 7, latent 256).

The conv decoder builds each stretch of ``2 ** len(channels)`` entries from a few numbers of the
last feature map through kernels shared by every stretch, so what it can write differs little from
stretch to stretch. ``dense_rank`` > 0 adds a low-rank dense head beside it: [z, c] -> rank ->
(D,), a basis of its own for every entry (``rank * D`` weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icm_lora.thin_conv import ToOneChannel

PAPER_CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)


def conv_encoder(in_channels: int, channels: tuple[int, ...], kernel_size: int) -> list[nn.Module]:
    """Stride-2 Conv1d blocks (BatchNorm, LeakyReLU): (B, in, L) -> (B, channels[-1], L / 2^len(channels))."""
    blocks, c_in = [], in_channels
    for c_out in channels:
        blocks += [nn.Conv1d(c_in, c_out, kernel_size, 2, kernel_size // 2), nn.BatchNorm1d(c_out), nn.LeakyReLU(0.2)]
        c_in = c_out
    return blocks


def padded_length(length: int, channels: tuple[int, ...]) -> int:
    """``length`` rounded up to a multiple of ``2 ** len(channels)`` (what the conv blocks halve)."""
    factor = 2 ** len(channels)
    return -(-length // factor) * factor


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()


class CVAE(nn.Module):
    """Conditional VAE q(z | w, c), p(w | z, c) over (B, D) flat LoRA vectors.

    Args:
        input_dim: D, the flat LoRA length.
        cond_dim: C, the condition length.
        latent_dim: size of z.
        channels: channels of the encoder's conv blocks (the decoder mirrors them).
        kernel_size: conv kernel size (odd).
        dense_rank: rank of the dense head added to the conv decoder's output (0: none, the paper's).
    """

    def __init__(self, input_dim: int, cond_dim: int, latent_dim: int = 256,
                 channels: tuple[int, ...] = PAPER_CHANNELS, kernel_size: int = 7, dense_rank: int = 0) -> None:
        super().__init__()
        if dense_rank < 0:
            raise ValueError(f"dense_rank must be >= 0, got {dense_rank}")
        self.input_dim, self.cond_dim, self.latent_dim = input_dim, cond_dim, latent_dim
        factor = 2 ** len(channels)
        self.padded_dim = padded_length(input_dim, channels)
        self.feature_shape = (channels[-1], self.padded_dim // factor)
        feature_dim = channels[-1] * self.padded_dim // factor
        pad = kernel_size // 2

        self.encoder = nn.Sequential(*conv_encoder(1, channels, kernel_size), nn.Flatten(),
                                     nn.Linear(feature_dim, latent_dim), nn.LeakyReLU(0.2))
        self.to_mu = nn.Linear(latent_dim + cond_dim, latent_dim)
        self.to_logvar = nn.Linear(latent_dim + cond_dim, latent_dim)

        self.from_latent = nn.Linear(latent_dim + cond_dim, feature_dim)
        dec, rev = [], list(reversed(channels))
        for c_in, c_out in zip(rev, rev[1:] + [rev[-1]]):
            dec += [nn.ConvTranspose1d(c_in, c_out, kernel_size, 2, pad, output_padding=1),
                    nn.BatchNorm1d(c_out), nn.ELU()]
        self.decoder = nn.Sequential(*dec, ToOneChannel(rev[-1], kernel_size))  # an nn.Conv1d(C, 1, K), faster on CPU
        self.dense = None
        if dense_rank:
            self.dense = nn.Sequential(nn.Linear(latent_dim + cond_dim, dense_rank), nn.SiLU(),
                                       nn.Linear(dense_rank, input_dim))

    def encode(self, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D), (B, C) -> mu, logvar, each (B, latent)."""
        x = F.pad(w, (0, self.padded_dim - self.input_dim)).unsqueeze(1)  # (B, 1, D')
        h = torch.cat([self.encoder(x), c], dim=-1)  # (B, latent + C)
        return self.to_mu(h), self.to_logvar(h).clamp(-30.0, 20.0)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def decode(self, z: Tensor, c: Tensor) -> Tensor:
        """(B, latent), (B, C) -> (B, D)."""
        zc = torch.cat([z, c], dim=-1)  # (B, latent + C)
        h = self.from_latent(zc).view(-1, *self.feature_shape)  # (B, C_last, D'/2^k)
        out = self.decoder(h)[:, 0, : self.input_dim]  # (B, D)
        return out if self.dense is None else out + self.dense(zc)

    def forward(self, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(w, c)
        return self.decode(self.reparameterize(mu, logvar), c), mu, logvar

    def loss(self, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction MSE (mean over entries) and KL to N(0, I) (sum over latents, batch mean)."""
        recon, mu, logvar = self(w, c)
        return F.mse_loss(recon.float(), w.float()), kl_standard_normal(mu.float(), logvar.float())

    @torch.no_grad()
    def generate(self, c: Tensor, num_samples: int = 1, mean: bool = False) -> Tensor:
        """(B, C) conditions -> (B, num_samples, D) decoded vectors; ``mean`` decodes z = 0."""
        c = c.repeat_interleave(num_samples, 0)  # (B * S, C)
        z = torch.zeros(len(c), self.latent_dim, device=c.device, dtype=c.dtype)
        if not mean:
            z.normal_()
        return self.decode(z, c).view(-1, num_samples, self.input_dim)
