"""The LightningModule that trains a detector: from scratch (pretraining) or as a PEFT LoRA on a frozen base.

The base is either of ``bases.load_base``'s (the project's detector or a transformers one); its loss
and decoding see the task's class channels (``datamodule.channels``), so a LoRA for one category is
trained and scored on that category, as COCOeval scores it. Validation and test log
COCO ``map``, ``map50`` and ``map75`` (pycocotools) of the task's categories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning as L
import torch
from peft import LoraConfig, get_peft_model

from .bases import BaseDetector, load_base
from .detector import LORA_TARGETS, Detector, DetectorConfig, OwnDetector
from .metrics import coco_map


@dataclass
class DetectorLoRA:
    """The LoRA trained on a frozen base detector (PEFT's names).

    Args:
        r: rank.
        lora_alpha: scaling numerator (``scaling = lora_alpha / r``).
        target_modules: module names adapted (the project's detector: the encoder's ``q``, ``k``, ``v``, ``o``
            and the class head; a transformers DETR: e.g. ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).
        lora_dropout: dropout on the LoRA input.
        init_seed: every task's LoRA starts from this same initialisation, so a zoo is one distribution.
    """

    r: int = 4
    lora_alpha: int = 8
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_dropout: float = 0.0
    init_seed: int = 0

    def peft_config(self, base: str | None = None) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=list(self.target_modules),
                          lora_dropout=self.lora_dropout, base_model_name_or_path=base)


class DetectorSystem(L.LightningModule):
    """Detector training with COCO metrics on validation and test.

    Args:
        detector: the shape of a detector trained from scratch (ignored when ``base`` is given).
        base: the frozen base (a detector folder of this project, or a transformers detector's folder or hub
            id); with ``lora`` only the LoRA trains.
        lora: train a PEFT LoRA on ``base`` instead of every weight.
        lr: peak AdamW learning rate (linear warm-up, then ``schedule``).
        schedule: ``cosine`` (decay to 0 over the run) or ``constant`` (a zoo: the last steps then sample
            one stationary distribution of adapters).
        weight_decay: AdamW weight decay.
        warmup_steps: warm-up steps.
        box_weight: weight of the box L1 against the focal loss (the project's detector; a transformers
            detector weighs its loss terms by its config).
        top_k: detections kept per image when scoring.
    """

    def __init__(self, detector: DetectorConfig | None = None, base: str | None = None, lora: DetectorLoRA | None = None,
                 lr: float = 2.0e-3, schedule: str = "cosine", weight_decay: float = 0.05, warmup_steps: int = 100,
                 box_weight: float = 1.0, top_k: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"detector training: schedule must be cosine or constant, got {schedule!r}")
        if lora is not None and base is None:
            raise ValueError("detector LoRA: give the frozen base detector's folder as base")
        self.base: BaseDetector = (load_base(base) if base
                                   else OwnDetector(Detector(detector or DetectorConfig()), box_weight=box_weight))
        if isinstance(self.base, OwnDetector):
            self.base.box_weight = box_weight
        elif box_weight != 1.0:
            raise ValueError(f"{base}: box_weight applies to the project's detector; a transformers detector "
                             "weighs its loss terms by its config")
        model = self.base.model
        if lora is not None:
            with torch.random.fork_rng():
                torch.manual_seed(lora.init_seed)
                model = get_peft_model(model, lora.peft_config(base))
        else:
            model.requires_grad_(True)
        self.model = model
        self._detections: list[dict] = []

    @property
    def channels(self) -> list[int]:
        return self.trainer.datamodule.channels

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, boxes, labels, index = batch
        out = self.base.loss(self.model, images, boxes, labels, self.channels)
        self.log_dict({f"{stage}/{k}": v for k, v in out.items()}, batch_size=len(images), prog_bar=stage == "train")
        if stage != "train":
            split = self.trainer.datamodule.splits[stage]
            was = self.model.training
            self.model.eval()  # set-prediction models add denoising queries in training mode
            self._detections += split.results(index, self.base.detect(self.model, images, self.channels,
                                                                      self.hparams.top_k))
            self.model.train(was)
        return out["loss"]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_map(self, stage: str) -> None:
        split = self.trainer.datamodule.splits[stage]
        scores = coco_map(split.coco, self._detections, split.category_ids)
        self._detections = []
        self.log_dict({f"{stage}/{k}": v for k, v in scores.items()}, prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_map("test")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.hparams.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if self.hparams.schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}
