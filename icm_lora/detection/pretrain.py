"""Pretrain the base detector on the base categories only, once: ``python -m icm_lora.detection.pretrain``.

The detector is trained from scratch with Lightning; the checkpoint with the best validation mAP50
is kept, scored on test, and written to ``base_dir`` (``config.json``, ``model.safetensors``,
``pretrain.json``) atomically. A later run with the same settings finds it there and trains nothing,
as the converted base language model is built once; other settings train a new one.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from ..files import read_json
from ..hardware import describe, trainer_precision
from ..tasks import fingerprint
from .data import DetectionData
from .detector import load_detector, save_detector
from .system import DetectorSystem


@dataclass
class PretrainBudget:
    """How long and on what the base detector trains.

    Args:
        max_steps: optimiser steps.
        val_every: steps between validations (each may become the kept checkpoint).
        precision: Lightning precision; ``auto`` is bf16-mixed where native, else 32-true.
        accelerator: Lightning accelerator.
        seed: seed of the initialisation and the batch order.
    """

    max_steps: int = 1500
    val_every: int = 250
    precision: str = "auto"
    accelerator: str = "auto"
    seed: int = 0


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m icm_lora.detection.pretrain", default_meta=False,
                       description="--config FILE reads base_dir and the pretrain section of an experiment's YAML "
                                   "(its other sections are the generator's); later arguments override it.")
    p.add_argument("--config", action="config")
    p.add_argument("--base_dir", type=str, default="zoo/detection/base", help="where the pretrained detector is kept")
    p.add_class_arguments(DetectionData, "pretrain.data")
    p.add_class_arguments(DetectorSystem, "pretrain.model", skip={"base", "lora"})
    p.add_class_arguments(PretrainBudget, "pretrain.budget")
    return p


def settings_key(cfg: Namespace) -> str:
    """What decides the pretrained weights (not where they are written)."""
    return fingerprint(cfg.pretrain.as_dict(), "detector-pretrain-v1")


def pretrain(cfg: Namespace, init: Namespace) -> Path:
    """The base detector for ``cfg`` (``init``: its instantiated classes): reused from ``base_dir`` when
    its settings match, else trained there."""
    out, key = Path(cfg.base_dir), settings_key(cfg)
    if (out / "pretrain.json").exists() and read_json(out / "pretrain.json").get("key") == key:
        load_detector(out)  # a cached detector must still be whole
        print(f"base detector: {out} (cached, settings {key})")
        return out
    budget, data, system = init.pretrain.budget, init.pretrain.data, init.pretrain.model
    runs = out.parent / f"{out.name}_runs"
    best = ModelCheckpoint(dirpath=runs / "checkpoints", monitor="val/map50", mode="max", filename="best",
                           enable_version_counter=False)
    trainer = L.Trainer(max_steps=budget.max_steps, val_check_interval=budget.val_every, check_val_every_n_epoch=None,
                        accelerator=budget.accelerator, devices=1, num_sanity_val_steps=0,
                        precision=trainer_precision(budget.precision, budget.accelerator), callbacks=[best],
                        logger=TensorBoardLogger(runs, name="", version="pretrain"), default_root_dir=runs)
    print(f"base detector: pretraining on {describe(trainer.strategy.root_device)}, precision {trainer.precision}")
    start = time.perf_counter()
    trainer.fit(system, data)
    seconds = time.perf_counter() - start
    system = DetectorSystem.load_from_checkpoint(best.best_model_path, weights_only=False)  # written just now
    val = trainer.validate(system, data, verbose=False)[0]
    test = trainer.test(system, data, verbose=False)[0]
    record = {"key": key, "settings": cfg.pretrain.as_dict(), "seconds": round(seconds, 1),
              "hardware": describe(trainer.strategy.root_device), "precision": str(trainer.precision),
              "val": {k: round(v, 4) for k, v in val.items() if "map" in k},
              "test": {k: round(v, 4) for k, v in test.items() if "map" in k}}
    save_detector(out, system.model, extra={"categories": data.categories}, sidecars={"pretrain": record})
    print(f"base detector: {out} in {seconds:.0f} s; test {record['test']}")
    return out


def config_sections(path: str) -> dict:
    """``base_dir`` and ``pretrain`` of an experiment's YAML."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"icm_lora.detection.pretrain: {path}: not a readable YAML file ({err})") from None
    return {k: raw[k] for k in ("base_dir", "pretrain") if k in raw}


def main(args: list[str] | None = None) -> Path:
    p = parser()
    argv = list(sys.argv[1:] if args is None else args)
    with tempfile.TemporaryDirectory() as tmp:
        if "--config" in argv:  # hand the parser only the sections it knows
            i = argv.index("--config")
            own = Path(tmp) / "pretrain.yaml"
            own.write_text(yaml.safe_dump(config_sections(argv[i + 1])), encoding="utf-8")
            argv[i + 1] = str(own)
        cfg = p.parse_args(argv)
    L.seed_everything(cfg.pretrain.budget.seed, verbose=False)  # before the detector is initialised
    try:
        return pretrain(cfg, p.instantiate(cfg))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"icm_lora.detection.pretrain: {err}") from None


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
