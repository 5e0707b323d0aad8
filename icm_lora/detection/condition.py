"""Detection task vectors: the base detector's encoder features on a task's demonstration images.

A task is shown by a few annotated images (its in-context examples). Each prompt (a group of
``images_per_prompt`` of them) gives one vector: the mean encoder token at the centre cells of the
task's objects (what the objects look like) beside the mean over every token (what the scenes look
like: noise, texture, scale). ``num_prompts`` such rows are stored per task; the condition is their
mean, as the language domain's task vector is the mean over its prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..evaluate import autocast
from ..hardware import resolve_precision
from .bases import BaseDetector
from .data import CocoImages


@dataclass
class DetectionCondition:
    """How a detection task's vector is made.

    Args:
        num_prompts: groups of demonstration images per task (stored rows; the task vector is their mean).
        images_per_prompt: images in each group (drawn from those holding the task's objects).
        seed: seed of the draw.
        precision: ``auto``, ``bf16`` or ``fp32`` for the forward passes; recorded, not hashed.
    """

    num_prompts: int = 4
    images_per_prompt: int = 8
    seed: int = 0
    precision: str = "auto"

    def hashed(self) -> dict:
        return {"num_prompts": self.num_prompts, "images_per_prompt": self.images_per_prompt, "seed": self.seed}


@torch.no_grad()
def task_vectors(base: BaseDetector, demos: CocoImages, spec: DetectionCondition, name: str) -> Tensor:
    """(P, 2 D) one row per prompt: [mean object-centre token, mean token] of the base detector's encoder."""
    shown = [i for i in range(len(demos)) if len(demos.labels[i])]
    if not shown:
        raise ValueError(f"task {name!r}: no demonstration image holds one of its objects ({demos.category_ids})")
    rng = np.random.default_rng(spec.seed)
    device = next(base.model.parameters()).device
    precision = resolve_precision(spec.precision, device)
    rows = []
    for _ in range(spec.num_prompts):
        pick = rng.choice(shown, size=min(spec.images_per_prompt, len(shown)), replace=False)
        images = torch.stack([demos[i][0] for i in pick]).to(device)
        with autocast(precision, device):
            grid = base.tokens(images).float()  # (K, Gh, Gw, D)
        gh, gw = grid.shape[1:3]
        cells = []
        for k, i in enumerate(pick):
            centre = demos.boxes[i][:, :2] + demos.boxes[i][:, 2:] / 2  # (n, 2) pixels
            col = (centre[:, 0] * gw / images.shape[-1]).long().clamp(0, gw - 1)
            row = (centre[:, 1] * gh / images.shape[-2]).long().clamp(0, gh - 1)
            cells.append(grid[k, row, col])  # (n, D)
        rows.append(torch.cat([torch.cat(cells).mean(0), grid.mean((0, 1, 2))]).cpu())
    return torch.stack(rows)
