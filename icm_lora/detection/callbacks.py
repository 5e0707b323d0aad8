"""Decode -> load into the base detector -> COCO mAP per task, at validation and test.

The detection counterpart of ``icm_lora.callbacks.DownstreamEval``: one row per task with the bare
base detector, the task's own LoRA, the soup, generated LoRAs (mean and std over samples z ~ N(0, I)),
the z = 0 decode and the z = 0 decode with another task's condition (the control). Validation scores
the z = 0 decode on validation images; ``val/gen_map50_gap`` (own LoRA's mAP50 minus the decode's,
averaged over tasks) selects checkpoints. The test table goes to ``detection_test.{md,csv}`` beside
the logs and to TensorBoard. Under DDP each rank scores its share of the tasks with rank 0's decodes,
and rank 0 writes the tables and images.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from .. import files
from ..callbacks import TimedEval, format_rows
from ..hardware import describe, resolve_precision
from ..ranks import Ranks
from .bases import load_base
from .evaluate import DetectionScorer

COLUMNS = [("task", "task", "{}"), ("base_map50", "base", "{:.3f}"), ("lora_map50", "own LoRA", "{:.3f}"),
           ("soup_map50", "soup", "{:.3f}"), ("gen_map50_mean", "generated (mean ± std)", "{:.3f}"),
           ("gen_z0_map50", "gen z=0", "{:.3f}"), ("swapped_map50", "other task's condition", "{:.3f}"),
           ("lora_map75", "own mAP75", "{:.3f}"), ("gen_map75_mean", "gen mAP75", "{:.3f}"),
           ("cosine", "cosine", "{:.3f}")]


class DetectionEval(TimedEval):
    """Scores generated detector LoRAs against the base detector, own LoRAs and the soup (COCO mAP).

    Args:
        num_samples: generated adapters per task at test.
        precision: ``auto``, ``bf16`` or ``fp32`` for scoring forward passes.
        batch_size: images per forward pass.
        swap_shift: the control decodes task i with the condition of task (i + swap_shift) mod T.
        seed: seed for the test samples.
        results_dir: also write the test table as ``{results_dir}/detection.{md,csv}`` (None: only beside the logs).
        images_per_task: test images per task drawn to TensorBoard with the boxes of the base detector, the
            own LoRA and the generated (z = 0) LoRA side by side.
    """

    def __init__(self, num_samples: int = 3, precision: str = "auto", batch_size: int = 64, swap_shift: int = 1,
                 seed: int = 0, results_dir: str | None = None, images_per_task: int = 4) -> None:
        self.num_samples, self.precision, self.batch_size = num_samples, precision, batch_size
        self.swap_shift, self.seed = swap_shift, seed
        self.results_dir, self.images_per_task = results_dir, images_per_task
        self.scorer: DetectionScorer | None = None
        self._fixed: dict[tuple, dict] = {}
        self.seconds: dict[str, float] = {}

    def _setup(self, dm, device: torch.device) -> None:
        if self.scorer is None:
            base = load_base(dm.base_dir, dm.image_size)  # its own copy: the scorer wraps it in PEFT
            base.model.to(device)
            self.scorer = DetectionScorer(base, dm.lora, dm.layout, resolve_precision(self.precision, device),
                                          self.batch_size)

    def _score_fixed(self, kind: str, split: str, name: str, flat: Tensor | None, images) -> dict:
        key = (kind, split, name)
        if key not in self._fixed:  # base, own and soup do not change while the generator trains
            self._fixed[key] = self.scorer.score(flat, images)
        return self._fixed[key]

    def _rows(self, pl_module, dm, split: str, num_samples: int) -> list[dict]:
        """One row per task; under DDP rank 0's decodes are scored, each rank scoring its share of the tasks."""
        ranks = Ranks.current()
        torch.manual_seed(self.seed)
        means = dm.normalizer.denormalize(pl_module.generate(dm.conditions, 1, mean=True).cpu())[:, 0]  # (T, D)
        samples = (dm.normalizer.denormalize(pl_module.generate(dm.conditions, num_samples).cpu())
                   if num_samples else None)  # (T, S, D)
        means, samples = ranks.broadcast((means, samples))
        self._means = means
        swapped = means.roll(-self.swap_shift, dims=0)
        soup = dm.zoo.soup(dm.task_names)
        mine = {}
        for t in ranks.share(list(range(len(dm.task_specs)))):
            task = dm.task_specs[t]
            images = dm.task_split(task, split)
            base = self._score_fixed("base", split, task.name, None, images)
            own = self._score_fixed("own", split, task.name, dm.zoo.final(task.name), images)
            soup_s = self._score_fixed("soup", split, task.name, soup, images)
            z0 = self.scorer.score(means[t], images)
            swap = self.scorer.score(swapped[t], images) if len(dm.task_specs) > 1 else z0
            gens = [self.scorer.score(s, images) for s in samples[t]] if samples is not None else [z0]
            ckpts = dm.zoo.checkpoints(task.name)
            mine[t] = {
                "task": task.name, "base_map50": base["map50"], "lora_map50": own["map50"],
                "soup_map50": soup_s["map50"], "gen_map50_mean": statistics.fmean(g["map50"] for g in gens),
                "gen_map50_std": statistics.pstdev(g["map50"] for g in gens), "gen_z0_map50": z0["map50"],
                "swapped_map50": swap["map50"], "lora_map75": own["map75"],
                "gen_map75_mean": statistics.fmean(g["map75"] for g in gens), "base_map75": base["map75"],
                "lora_map": own["map"], "gen_map_mean": statistics.fmean(g["map"] for g in gens),
                "cosine": F.cosine_similarity(means[t][None], ckpts, dim=-1).mean().item(),
            }
        rows = {t: row for part in ranks.gather(mine) for t, row in part.items()}
        return [rows[t] for t in sorted(rows)]

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, num_samples: int) -> None:
        dm = trainer.datamodule
        self._setup(dm, pl_module.device)
        rows = self._rows(pl_module, dm, split, num_samples)
        mean_row = {"task": "mean"} | {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "task"}
        logged = {f"{split}/mean/{k}": v for k, v in mean_row.items() if k != "task"}
        if split == "val":
            logged["val/gen_map50_gap"] = mean_row["lora_map50"] - mean_row["gen_z0_map50"]
        pl_module.log_dict(logged)  # the same values on every rank
        out = Path(trainer.log_dir or ".")  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"detection/{r['task']}/{split}_{k}": v for r in rows
                                        for k, v in r.items() if k != "task"}, step=trainer.global_step)
        markdown, table_csv = format_rows(rows + [mean_row], COLUMNS, "gen_map50")
        files.write_text(out / f"detection_{split}.md", markdown)
        files.write_text(out / f"detection_{split}.csv", table_csv)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(f"detection/{split}_table", markdown, trainer.global_step)
        if split != "test":
            return
        print(f"\nPer-task detection test table ({out / 'detection_test.md'}):\n{markdown}")
        if self.results_dir is not None:
            header = (f"Detection, per task on test images (COCO mAP50 by pycocotools; generated: mean ± std over "
                      f"{num_samples} samples). {describe(pl_module.device)}. Written by: python -m icm_lora.detection "
                      f"{' '.join(sys.argv[1:])}\n\n")
            files.write_text(Path(self.results_dir) / "detection.md", header + markdown)
            files.write_text(Path(self.results_dir) / "detection.csv", table_csv)
        if hasattr(experiment, "add_image"):
            for t, task in enumerate(dm.task_specs):
                flats = [None, dm.zoo.final(task.name), self._means[t]]
                experiment.add_image(f"detection/{task.name}/base_own_generated",
                                     self._draw(dm.task_split(task, "test"), flats), trainer.global_step,
                                     dataformats="HWC")

    def _draw(self, images, flats: list) -> np.ndarray:
        """(H, W, 3) uint8: rows of test images holding the task's objects, columns base / own / generated,
        boxes scoring >= 0.3."""
        rows = []
        shown = [i for i in range(len(images)) if len(images.labels[i])] or list(range(len(images)))
        for i in shown[: self.images_per_task]:  # images that hold the task's objects
            panels = []
            for flat in flats:
                dets = [d for d in self.scorer.detections(flat, images, [i]) if d["score"] >= 0.3]
                panels.append(draw_boxes(images.original(i), dets))
            rows.append(np.concatenate(panels, axis=1))
        return np.concatenate(rows, axis=0)


def draw_boxes(image: Image.Image, detections: list[dict], scale: int | None = None) -> np.ndarray:
    """The image enlarged ``scale`` times (default: small images to about 256 pixels, large ones as they
    are) with each detection's box and score, as (H, W, 3) uint8."""
    scale = scale or max(1, 256 // max(image.size))
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    pen = ImageDraw.Draw(big)
    for d in detections:
        x, y, w, h = (v * scale for v in d["bbox"])
        pen.rectangle([x, y, x + w, y + h], outline=(255, 255, 0), width=2)
        pen.text((x + 2, y + 1), f"{d['score']:.2f}", fill=(255, 255, 0))
    return np.asarray(big)
