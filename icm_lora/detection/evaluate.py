"""COCO mAP of a flat LoRA (or of the bare base detector) on one task's images, for either kind of base."""

from __future__ import annotations

import torch
from torch import Tensor

from ..evaluate import LiveAdapter, autocast
from ..flat import FlatLayout
from .bases import BaseDetector
from .data import CocoImages
from .metrics import coco_map
from .system import DetectorLoRA


class DetectionScorer:
    """One base detector wrapped once in PEFT; each flat LoRA is swapped in and scored.

    Args:
        base: the frozen base detector.
        lora: the zoo's LoRA structure.
        layout: the zoo's flat layout.
        precision: ``bf16`` or ``fp32`` (``auto`` resolved) for the forward passes.
        batch_size: images per forward pass.
        top_k: detections kept per image.
    """

    def __init__(self, base: BaseDetector, lora: DetectorLoRA, layout: FlatLayout, precision: str = "fp32",
                 batch_size: int = 64, top_k: int = 100) -> None:
        self.base = base
        self.live = LiveAdapter(base.model, lora.peft_config(base.name), layout)
        self.precision, self.batch_size, self.top_k = precision, batch_size, top_k

    @torch.no_grad()
    def detections(self, flat: Tensor | None, split: CocoImages, indices: list[int] | None = None) -> list[dict]:
        """COCO result dicts of the task's categories on the images ``indices`` of ``split`` (default all)."""
        device, out = self.live.device, []
        indices = list(range(len(split))) if indices is None else indices
        with self.live.use(flat) as model:
            for start in range(0, len(indices), self.batch_size):
                index = indices[start : start + self.batch_size]
                images = torch.stack([split[i][0] for i in index]).to(device)
                with autocast(self.precision, device):
                    dets = self.base.detect(model, images, split.channels, self.top_k)
                out += split.results(index, dets)
        return out

    def score(self, flat: Tensor | None, split: CocoImages) -> dict[str, float]:
        """``{map, map50, map75}`` of ``flat`` (None: the base detector) on ``split``."""
        return coco_map(split.coco, self.detections(flat, split), split.category_ids)
