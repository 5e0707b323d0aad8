"""The SG-LoRA generator: a CVAE with a learned conditional prior p(z | c) (a plain ``nn.Module``).

The condition c = [mu*, var*] is a Gaussian over the flat LoRA (2 D values, see ``semantic``). Too
many values for a dense layer, so c is read by the same structure-aware encoder as the weights:
stride-2 Conv1d blocks over the sequence, here with two channels (mu*, log var*). Then:

- posterior q(z | w, c): a 2-layer ReLU MLP over the weights' and the condition's features;
- prior p(z | c): a 2-layer ReLU MLP over the condition's features;
- decoder p(w | z, c): a 3-layer ReLU MLP whose last layer is low-rank (``rank * D`` weights), and
  whose output is added to mu*. It starts at zero, so an untrained generator returns mu*, the top-K
  weighted mean, and training learns how a task's LoRA differs from its neighbours' mixture.

At generation the decoder's correction can be scaled (``correction_scale``: 1 is the paper's decode,
0 returns mu* itself): a correction learned from a few dozen seen tasks may point the right way for
an unseen one and still overshoot, and the scale is then a setting chosen on validation folds.

Loss: MSE + lambda * KL(q || p), the KL in closed form between diagonal Gaussians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icm_lora.cvae import conv_encoder, padded_length

LOG_VAR_FLOOR = 1e-8  # var* is 0 where every expert's checkpoints agree


def kl_gaussians(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) summed over latent dims, averaged over the batch."""
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1)
    return kl.sum(-1).mean()


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SemanticCVAE(nn.Module):
    """p(w | z, c) with z ~ p(z | c) for (B, D) flat LoRA vectors and (B, 2 D) conditions [mu*, var*].

    Args:
        input_dim: D, the flat LoRA length.
        latent_dim: size of z.
        channels: channels of the conv blocks reading the weights and the condition.
        kernel_size: conv kernel size (odd).
        hidden: width of the MLPs and of the conv features they read.
        rank: rank of the decoder's last layer.
    """

    def __init__(self, input_dim: int, latent_dim: int = 64, channels: tuple[int, ...] = (8, 16, 32, 64),
                 kernel_size: int = 7, hidden: int = 512, rank: int = 64) -> None:
        super().__init__()
        if rank < 1 or hidden < 1:
            raise ValueError(f"rank and hidden must be >= 1, got {rank} and {hidden}")
        self.input_dim, self.cond_dim, self.latent_dim = input_dim, 2 * input_dim, latent_dim
        self.padded_dim = padded_length(input_dim, channels)
        features = channels[-1] * self.padded_dim // 2 ** len(channels)

        def reader(in_channels: int) -> nn.Sequential:
            return nn.Sequential(*conv_encoder(in_channels, channels, kernel_size), nn.Flatten(),
                                 nn.Linear(features, hidden), nn.ReLU())

        self.weight_encoder, self.condition_encoder = reader(1), reader(2)
        self.posterior = _mlp([2 * hidden, hidden, 2 * latent_dim])
        self.prior = _mlp([hidden, hidden, 2 * latent_dim])
        self.decoder = nn.Sequential(_mlp([latent_dim + hidden, hidden, hidden]), nn.ReLU(),
                                     nn.Linear(hidden, rank), nn.Linear(rank, input_dim))
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def _pad(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.padded_dim - self.input_dim))

    def read_condition(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 2 D) -> mu* (B, D) and the condition's features (B, hidden)."""
        mu, var = c[:, : self.input_dim], c[:, self.input_dim :]
        x = torch.stack([mu, var.clamp_min(0).add(LOG_VAR_FLOOR).log()], dim=1)  # (B, 2, D)
        return mu, self.condition_encoder(self._pad(x))

    @staticmethod
    def _split(h: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, mu_star: Tensor, h_c: Tensor, correction_scale: float = 1.0) -> Tensor:
        """(B, latent), (B, D), (B, hidden) -> (B, D): mu* plus ``correction_scale`` times the correction."""
        return mu_star + correction_scale * self.decoder(torch.cat([z, h_c], dim=-1))

    def loss(self, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction MSE (mean over entries) and KL(q(z | w, c) || p(z | c)) (sum over latents, batch mean)."""
        mu_star, h_c = self.read_condition(c)
        h_w = self.weight_encoder(self._pad(w).unsqueeze(1))  # (B, hidden)
        mu_q, logvar_q = self._split(self.posterior(torch.cat([h_w, h_c], dim=-1)))
        mu_p, logvar_p = self._split(self.prior(h_c))
        z = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp()
        recon = self.decode(z, mu_star, h_c)
        kl = kl_gaussians(mu_q.float(), logvar_q.float(), mu_p.float(), logvar_p.float())
        return F.mse_loss(recon.float(), w.float()), kl

    @torch.no_grad()
    def generate(self, c: Tensor, num_samples: int = 1, mean: bool = False, correction_scale: float = 1.0) -> Tensor:
        """(B, 2 D) conditions -> (B, num_samples, D); z ~ p(z | c), or its mean with ``mean``; the
        decoder's correction to mu* scaled by ``correction_scale``."""
        c = c.repeat_interleave(num_samples, 0)  # (B * S, 2 D)
        mu_star, h_c = self.read_condition(c)
        mu_p, logvar_p = self._split(self.prior(h_c))
        z = mu_p if mean else mu_p + torch.randn_like(mu_p) * (0.5 * logvar_p).exp()
        return self.decode(z, mu_star, h_c, correction_scale).view(-1, num_samples, self.input_dim)
