"""The LightningModule that trains the CVAE: reconstruction + beta * KL with KL annealing."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from icm_lora.cvae import CVAE, PAPER_CHANNELS
from icm_lora.sg_cvae import SemanticCVAE

# ICMLoRA arguments read at generation only: a trained generator serves every value of them, so they stay out of
# its key and a checkpoint is loaded with the config's value
DECODING_ARGS = ("correction_scale",)

KL_SCHEDULES = ("constant", "linear", "cyclical")
GENERATORS = ("icm_lora", "sg_lora")


def kl_beta(step: int, weight: float, schedule: str, warmup_steps: int, cycle_steps: int) -> float:
    """beta at ``step``: constant; linear warm-up from 0; or cyclical (warm-up over the first half
    of each cycle, then flat), as in Fu et al. 2019."""
    if schedule == "constant" or (schedule == "linear" and warmup_steps <= 0):
        return weight
    if schedule == "linear":
        return weight * min(1.0, step / warmup_steps)
    if schedule == "cyclical":
        phase = (step % max(1, cycle_steps)) / max(1, cycle_steps)
        return weight * min(1.0, 2.0 * phase)
    raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {schedule!r}")


def mixup(weights: Tensor, condition: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Each row mixed with a random other row of the batch, weights and condition alike:
    lam * row + (1 - lam) * other, lam ~ Beta(alpha, alpha) per row (Zhang et al. 2018).

    A generator trained only on its tasks' own (condition, LoRA) pairs learns nothing about the
    conditions between them, where an unseen task's lands; mixed pairs teach it that a condition
    between tasks decodes to the matching blend of their LoRAs. Both are normalised affinely, so a
    blend of normalised rows is the normalised blend of the raw ones.
    """
    lam = torch.distributions.Beta(alpha, alpha).sample((len(weights), 1)).to(weights)  # (B, 1)
    other = torch.randperm(len(weights), device=weights.device)
    return lam * weights + (1 - lam) * weights[other], lam * condition + (1 - lam) * condition[other]


class ICMLoRA(L.LightningModule):
    """One conditional generator of LoRA weights for all tasks: ICM-LoRA's CVAE, or SG-LoRA's CVAE
    with a learned conditional prior (``generator: sg_lora``, with ``data.condition.kind: semantic``).

    Args:
        lora_dim: flat LoRA length D (linked from the data module).
        cond_dim: condition length C (linked from the data module).
        latent_dim: size of the latent z.
        channels: encoder conv channels (the decoder mirrors them); the paper uses 12 blocks.
        kernel_size: conv kernel size.
        dense_rank: rank of a dense head beside the conv decoder, so every LoRA entry gets a basis of
            its own (0: none, the paper's decoder); for ``sg_lora``, the rank of the decoder's last
            layer (0: 64).
        kl_weight: final beta on the KL term (ICM-LoRA's paper: 0.005; SG-LoRA's lambda: 1).
        kl_schedule: ``constant``, ``linear`` warm-up, or ``cyclical`` annealing.
        kl_warmup_steps: steps of linear warm-up.
        kl_cycle_steps: steps per cycle for ``cyclical``.
        lr: AdamW learning rate (cosine decay to ``min_lr_ratio * lr`` over training).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        num_samples: adapters decoded per task by ``predict`` (z ~ N(0, I), or z ~ p(z | c) for
            ``sg_lora``); 0 decodes the prior's mean once.
        generator: ``icm_lora`` (the CVAE with a N(0, I) prior, any condition) or ``sg_lora`` (the
            learned-prior CVAE over SG-LoRA's semantic condition [mu*, var*]).
        hidden: ``sg_lora`` only: width of its MLPs.
        mixup: Beta(mixup, mixup) mixing of training pairs (see ``mixup``); 0: train on the zoo's
            own pairs only, as the papers do.
        correction_scale: ``sg_lora`` only, at generation: the decoded LoRA is mu* plus this times the
            decoder's correction (1: the paper's decode; 0: mu*, the top-K weighted mean); ``icm_lora``
            has no mu* and ignores it. Training does not read it, so a trained generator decodes with
            the config's value.
    """

    def __init__(self, lora_dim: int = 0, cond_dim: int = 0, latent_dim: int = 256,
                 channels: tuple[int, ...] = PAPER_CHANNELS, kernel_size: int = 7, dense_rank: int = 0,
                 kl_weight: float = 0.005,
                 kl_schedule: str = "linear", kl_warmup_steps: int = 500, kl_cycle_steps: int = 1000,
                 lr: float = 2.0e-4, min_lr_ratio: float = 0.01, weight_decay: float = 0.0,
                 num_samples: int = 1, generator: str = "icm_lora", hidden: int = 512,
                 mixup: float = 0.0, correction_scale: float = 1.0) -> None:
        super().__init__()
        if lora_dim <= 0 or cond_dim <= 0:
            raise ValueError("lora_dim and cond_dim must be positive (the CLI links them from the data module)")
        if kl_schedule not in KL_SCHEDULES:
            raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {kl_schedule!r}")
        if generator not in GENERATORS:
            raise ValueError(f"model.generator must be one of {GENERATORS}, got {generator!r}")
        if mixup < 0:
            raise ValueError(f"model.mixup must be >= 0, got {mixup}")
        self.save_hyperparameters()
        if generator == "icm_lora":
            self.cvae = CVAE(lora_dim, cond_dim, latent_dim, tuple(channels), kernel_size, dense_rank)
        elif cond_dim != 2 * lora_dim:
            raise ValueError(f"model.generator sg_lora reads the semantic condition [mu*, var*] of 2 x {lora_dim} "
                             f"values, got cond_dim {cond_dim}: set data.condition.kind: semantic")
        else:
            self.cvae = SemanticCVAE(lora_dim, latent_dim, tuple(channels), kernel_size, hidden, dense_rank or 64)

    @property
    def beta(self) -> float:
        h = self.hparams
        return kl_beta(self.global_step, h.kl_weight, h.kl_schedule, h.kl_warmup_steps, h.kl_cycle_steps)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        weights, condition = batch["weights"], batch["condition"]  # (B, D), (B, C)
        if stage == "train" and self.hparams.mixup > 0:
            weights, condition = mixup(weights, condition, self.hparams.mixup)
        recon, kl = self.cvae.loss(weights, condition)
        beta = self.beta if stage == "train" else self.hparams.kl_weight
        loss = recon + beta * kl
        self.log_dict({f"{stage}/loss": loss, f"{stage}/recon": recon, f"{stage}/kl": kl, f"{stage}/beta": beta},
                      batch_size=len(batch["weights"]), prog_bar=stage == "train")
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def generate(self, condition: Tensor, num_samples: int = 1, mean: bool = False) -> Tensor:
        """(B, C) scaled conditions -> (B, S, D) normalised LoRA vectors, in eval mode, fp32."""
        was_training = self.training
        self.eval()
        scale = {"correction_scale": self.hparams.correction_scale} if isinstance(self.cvae, SemanticCVAE) else {}
        out = self.cvae.generate(condition.to(self.device, torch.float32), num_samples, mean, **scale).float()
        self.train(was_training)
        return out

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        n = self.hparams.num_samples
        return {"name": batch["name"], "weights": self.generate(batch["condition"], max(1, n), mean=n == 0)}

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        floor = self.hparams.min_lr_ratio

        def cosine(step: int) -> float:
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
