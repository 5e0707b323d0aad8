"""The detection LoRA zoo: one PEFT LoRA per task on the frozen base detector, in the language zoo's format.

On disk it is what ``icm_lora.zoo.Zoo`` reads (``metadata.json`` with the layout and per-task entries,
``tasks/<task>.safetensors`` with ``checkpoints`` (N, D) and ``final`` (D,)), so the generator's
DataModule, normalisation and adapter writing are shared with the language domain. Each task is
trained with Lightning; the LoRA is snapshotted every ``checkpoint_every`` steps over the last
``num_checkpoints * checkpoint_every`` steps (the constant-rate phase). An entry is hashed on the
task's data, the learning settings and the base detector's identity, and the metadata is written
after every task, so an interrupted build resumes at the first unfinished task. Under DDP the ranks
split the tasks, as the language zoo's builder does: in each round every rank trains one task on its
own device, and rank 0 records the round's entries.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from peft import get_peft_model, get_peft_model_state_dict

from .. import files
from ..flat import FlatLayout
from ..hardware import describe, trainer_precision
from ..ranks import Ranks
from ..tasks import fingerprint, slug
from ..zoo import METADATA, VERSION, ZooMismatch, _jsonable
from .bases import BaseDetector
from .data import DetectionData
from .system import DetectorLoRA, DetectorSystem
from .tasks import DatasetResolver, DetectionTask


@dataclass
class DetectionTraining:
    """How each task's LoRA is trained and which checkpoints are kept.

    Args:
        steps: optimiser steps per task.
        batch_size: images per step.
        lr: AdamW learning rate (linear warm-up, then constant).
        warmup_steps: warm-up steps.
        weight_decay: AdamW weight decay on the LoRA.
        num_checkpoints: checkpoints kept per task, from the end of training.
        checkpoint_every: steps between kept checkpoints.
        precision: Lightning precision (``auto``: bf16-mixed where native, else 32-true); recorded, not hashed.
        seed: seed of the batch order.
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 3.0e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    num_checkpoints: int = 20
    checkpoint_every: int = 5
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_checkpoints * self.checkpoint_every > self.steps:
            raise ValueError(f"detection zoo: num_checkpoints * checkpoint_every ({self.num_checkpoints} * "
                             f"{self.checkpoint_every}) exceeds steps ({self.steps})")

    def learning(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "precision"}


class Snapshots(Callback):
    """Flat LoRA vectors (D,) taken after each of the last ``count`` steps that are multiples of ``every``."""

    def __init__(self, layout: FlatLayout, steps: int, count: int, every: int) -> None:
        self.layout, self.steps, self.count, self.every = layout, steps, count, every
        self.flats: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (self.steps - step) % self.every == 0 and self.steps - step < self.count * self.every:
            state = get_peft_model_state_dict(pl_module.model)
            self.flats.append(self.layout.flatten({k: v.detach().float().cpu() for k, v in state.items()}))


def lora_layout(model: torch.nn.Module, lora: DetectorLoRA) -> FlatLayout:
    """The flat layout of ``lora`` on the base detector ``model`` (wrapped on a copy: ``model`` stays bare)."""
    return FlatLayout.from_state_dict(get_peft_model_state_dict(get_peft_model(copy.deepcopy(model), lora.peft_config())))


def entry_hash(source: dict, training: DetectionTraining, base: str) -> str:
    return fingerprint(source, training.learning(), base)


def header(base: BaseDetector, lora: DetectorLoRA, layout: FlatLayout) -> dict:
    local = Path(base.name).exists()
    return {"version": VERSION, "domain": "detection", "base_model": base.name,
            "base_model_path": str(Path(base.name).resolve()) if local else base.name, "lora": asdict(lora),
            "peft_config": _jsonable(lora.peft_config(base.name).to_dict()), "layout": layout.to_json(),
            "dim": layout.dim}


def stale_tasks(root: str | Path, tasks: list[DetectionTask], resolver: DatasetResolver, training: DetectionTraining,
                base_key: str) -> dict[str, str]:
    """Tasks whose zoo entry is missing or was trained from other data, settings or base (``base_key``), and why."""
    path = Path(root) / METADATA
    entries = files.read_json(path).get("tasks", {}) if path.exists() else {}
    out = {}
    for task in tasks:
        entry = entries.get(task.name)
        if entry is None or not (Path(root) / entry["file"]).exists():
            out[task.name] = "not in the zoo"
        elif entry["hash"] != entry_hash(resolver.source(task), training, base_key):
            out[task.name] = "trained from other data, settings or base detector"
    return out


def build_zoo(root: str | Path, base: BaseDetector, tasks: list[DetectionTask], resolver: DatasetResolver,
              lora: DetectorLoRA, training: DetectionTraining, device: torch.device | None = None,
              ranks: Ranks | None = None) -> dict:
    """Train and store the LoRA of every task the zoo lacks or holds stale; returns the metadata.

    Args:
        device: where this rank trains (default: CPU).
        ranks: this process among the run's processes (default: from ``torch.distributed``).
    """
    root, ranks = Path(root), ranks or Ranks.current()
    layout = lora_layout(base.model, lora)
    meta = _open_metadata(root, header(base, lora, layout))
    key = base.key()
    stale = ranks.gather(stale_tasks(root, tasks, resolver, training, key))[0]  # rank 0 decides for all
    todo = [t for t in tasks if t.name in stale]
    if todo and ranks.is_main:
        print(f"detection zoo {root}: training {len(todo)} of {len(tasks)} tasks"
              + (f" on {ranks.world} ranks" if ranks.world > 1 else ""))
    for first in range(0, len(todo), ranks.world):
        mine = ranks.share(todo[first : first + ranks.world])[:1]
        done = [(task.name, _train_task(root, base, task, resolver, lora, training, layout, device or torch.device("cpu"))
                 | {"hash": entry_hash(resolver.source(task), training, key)}) for task in mine]
        for name, entry in (pair for part in ranks.gather(done) for pair in part):
            meta["tasks"][name] = entry
        if ranks.is_main:
            files.write_json(root / METADATA, meta)
    ranks.barrier()  # every rank reads the finished metadata
    return meta


def _open_metadata(root: Path, new: dict) -> dict:
    path = root / METADATA
    if not path.exists():
        return new | {"tasks": {}}
    meta = files.read_json(path)
    for k in ("domain", "lora", "layout"):
        if _jsonable(meta.get(k)) != _jsonable(new[k]):
            raise ZooMismatch(f"{path}: this zoo was built with another {k} ({meta.get(k)!r}); point zoo_dir "
                              "elsewhere or delete the folder")
    return meta | {"base_model": new["base_model"], "base_model_path": new["base_model_path"]}


def _train_task(root: Path, base: BaseDetector, task: DetectionTask, resolver: DatasetResolver, lora: DetectorLoRA,
                training: DetectionTraining, layout: FlatLayout, device: torch.device) -> dict:
    data = DetectionData(root=str(resolver.root(task)), categories=task.categories, image_size=base.image_size,
                         batch_size=training.batch_size)
    data.channel_map = base.channel_map
    system = DetectorSystem(base=base.name, lora=lora, lr=training.lr, schedule="constant",
                            weight_decay=training.weight_decay, warmup_steps=training.warmup_steps)
    snaps = Snapshots(layout, training.steps, training.num_checkpoints, training.checkpoint_every)
    quiet = dict(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1, logger=False,
                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                 strategy="auto", precision=trainer_precision(training.precision, device.type))
    trainer = L.Trainer(max_steps=training.steps, callbacks=[snaps], num_sanity_val_steps=0, limit_val_batches=0,
                        **quiet)
    with torch.random.fork_rng():
        torch.manual_seed(int(fingerprint(training.seed, task.name), 16) % 2**63)
        start = time.time()
        trainer.fit(system, data)
        seconds = time.time() - start
    ckpts = torch.stack(snaps.flats)  # (N, D)
    shard = f"tasks/{slug(task.name)}.safetensors"
    files.save_tensors(root / shard, {"checkpoints": ckpts, "final": ckpts[-1].clone()})
    scorer = L.Trainer(**quiet)
    tuned = scorer.validate(system, data, verbose=False)[0]
    with system.model.disable_adapter():
        base = scorer.validate(system, data, verbose=False)[0]
    print(f"  {task.name}: val mAP50 {base['val/map50']:.3f} -> {tuned['val/map50']:.3f} ({seconds:.0f} s)")
    return {"file": shard, "source": resolver.source(task), "training": training.learning(),
            "description": task.description, "num_checkpoints": len(ckpts), "train_seconds": round(seconds, 1),
            "computed": {"precision": str(trainer.precision), "hardware": describe(trainer.strategy.root_device),
                         "torch": torch.__version__},
            "val": {f"base_{k[4:]}": round(base[k], 4) for k in base if "map" in k}
                   | {f"final_{k[4:]}": round(tuned[k], 4) for k in tuned if "map" in k}}
