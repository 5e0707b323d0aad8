"""The LoRA zoo on disk: what it was built from, read access to its checkpoints, and whether it
still matches a config.

On disk (``zoo_dir``)::

    metadata.json            base model, PEFT config, flat layout, per-task entries, conditions
    tasks/<task>.safetensors "checkpoints" (N, D) and "final" (D,) flat LoRA vectors, float32
    conditions.safetensors   task vectors and description embeddings (see condition.py)

Each task's entry records what its LoRA learnt from (the task's text and the training settings,
hashed) and how it was computed (precision, device, threads: recorded only). ``zoo_build.py``
builds the zoo; ``mismatches`` says which entries a config would retrain, and why.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import Tensor
from transformers import AutoModelForCausalLM, PretrainedConfig

from icm_lora import files
from icm_lora.flat import FlatLayout, Normalizer
from icm_lora.tasks import fingerprint

METADATA = "metadata.json"
VERSION = 2


class ZooMismatch(ValueError):
    """The zoo on disk does not match the config (another base model or LoRA, or, for commands that
    only read it, other text or training settings)."""


@dataclass
class LoRASpec:
    """The PEFT LoRA every zoo adapter (and every generated one) uses.

    Args:
        r: LoRA rank.
        lora_alpha: PEFT's ``lora_alpha`` (scaling = lora_alpha / r, or / sqrt(r) with rsLoRA).
        target_modules: module names to adapt.
        layers_to_transform: decoder layer indices to adapt (None: all). Adapting only the top
            layers keeps the flat vector short and stops backward early.
        lora_dropout: dropout on the LoRA input while training the zoo.
        use_rslora: rank-stabilised scaling, as in the authors' config.
        init_seed: every task's LoRA starts from this same initialisation, so the zoo is one
            distribution rather than one per random start.
    """

    r: int = 8
    lora_alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers_to_transform: list[int] | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_seed: int = 0

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, target_modules=list(self.target_modules),
            layers_to_transform=self.layers_to_transform, lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora, bias="none", task_type="CAUSAL_LM",
        )


@dataclass
class ZooTraining:
    """How each task's LoRA is trained and which checkpoints are kept.

    ``precision`` and ``cache_frozen`` say how the arithmetic is done, not what is learnt: they are
    recorded in each zoo entry but do not make it stale, so a zoo moves between machines as it is.

    Args:
        steps: optimiser steps per task.
        batch_size: blocks per step.
        block_size: tokens per block.
        lr: AdamW learning rate (linear warm-up, then constant so the last phase samples one
            stationary distribution of adapters).
        warmup_steps: warm-up steps.
        num_checkpoints: checkpoints kept per task, from the end of training.
        checkpoint_every: steps between kept checkpoints.
        precision: ``auto`` (bf16 where the hardware has it natively, else fp32), ``bf16`` autocast
            or ``fp32``.
        cache_frozen: run the frozen layers below the lowest adapted one once per training block
            and reuse their output whenever the block is drawn again (same LoRA, less compute).
        seed: seed of the batch order.
    """

    steps: int = 200
    batch_size: int = 4
    block_size: int = 128
    lr: float = 1.0e-3
    warmup_steps: int = 10
    num_checkpoints: int = 50
    checkpoint_every: int = 1
    precision: str = "auto"
    cache_frozen: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_checkpoints * self.checkpoint_every > self.steps:
            raise ValueError(f"num_checkpoints * checkpoint_every ({self.num_checkpoints} * "
                             f"{self.checkpoint_every}) exceeds steps ({self.steps})")

    def learning(self) -> dict:
        """The settings that change what the LoRA learns (those a zoo entry is hashed on)."""
        return {k: v for k, v in asdict(self).items() if k not in HOW_COMPUTED}


HOW_COMPUTED = ("precision", "cache_frozen")


def lora_layout(config: PretrainedConfig, lora: LoRASpec) -> FlatLayout:
    """The flat layout of ``lora`` on a model of ``config``, computed on the meta device (no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, lora.peft_config())
    return FlatLayout.from_state_dict(get_peft_model_state_dict(peft_model))


class Zoo:
    """Read access to a built zoo; shards are opened lazily and rows read on demand."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / METADATA
        if not path.exists():
            raise FileNotFoundError(f"{path}: no zoo here; `fit` builds it")
        self.meta = files.read_json(path)
        self.layout = FlatLayout.from_json(self.meta["layout"])
        self.task_names: list[str] = list(self.meta["tasks"])
        if not self.task_names:
            raise ValueError(f"{path}: the zoo has no tasks")
        self._handles: dict[str, object] = {}

    def __getstate__(self) -> dict:
        """Open shard handles stay behind when a DataLoader worker receives the zoo; it reopens them."""
        return {k: v for k, v in self.__dict__.items() if k != "_handles"} | {"_handles": {}}

    def shard_path(self, task: str) -> Path:
        return self.root / self.meta["tasks"][task]["file"]

    def _open(self, task: str):
        if task not in self._handles:
            path = self.shard_path(task)
            handle = files.open_tensors(path)
            shape = handle.get_slice("checkpoints").get_shape()
            if len(shape) != 2 or shape[1] != self.layout.dim:
                raise ValueError(f"{path}: checkpoints have shape {shape}, the zoo's layout has D={self.layout.dim}")
            self._handles[task] = handle
        return self._handles[task]

    def num_checkpoints(self, task: str) -> int:
        return self._open(task).get_slice("checkpoints").get_shape()[0]

    def _read(self, task: str, key: str, index: int | None = None) -> Tensor:
        """``key`` of a task's shard (one row of it when ``index`` is given), checked whole and finite."""
        path = self.shard_path(task)
        try:
            tensor = self._open(task).get_slice(key)[index : index + 1][0] if index is not None \
                else self._open(task).get_tensor(key)
        except Exception as err:  # safetensors raises several types for truncated files
            raise ValueError(f"{path}: corrupt or truncated shard ({err})") from err
        if not torch.isfinite(tensor).all():
            what = f"checkpoint {index}" if index is not None else f"tensor {key!r}"
            raise ValueError(f"{path}: {what} has NaN or infinite values")
        return tensor

    def checkpoint(self, task: str, index: int) -> Tensor:
        """(D,) one kept checkpoint, read from disk without loading the shard."""
        return self._read(task, "checkpoints", index)

    def checkpoints(self, task: str) -> Tensor:
        """(N, D) all of a task's kept checkpoints."""
        return self._read(task, "checkpoints")

    def final(self, task: str) -> Tensor:
        """(D,) the task's final adapter (its own LoRA, the baseline the generator must match)."""
        return self._read(task, "final")

    def soup(self, tasks: list[str] | None = None) -> Tensor:
        """(D,) the uniform mean of the final adapters of ``tasks`` (default: all; the model-soup baseline)."""
        return torch.stack([self.final(t) for t in tasks or self.task_names]).mean(0)

    def normalizer(self, scheme: str, tasks: list[str] | None = None) -> Normalizer:
        """Zoo-wide statistics over every kept checkpoint of ``tasks`` (default: all)."""
        total = torch.zeros(self.layout.dim, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        count = 0
        for task in tasks or self.task_names:
            ckpts = self.checkpoints(task).double()  # (N, D)
            total += ckpts.sum(0)
            total_sq += (ckpts**2).sum(0)
            count += len(ckpts)
        return Normalizer.from_sums(self.layout, total, total_sq, count, scheme)


COPIED_FROM = "copied_from.json"


def copy_zoo(src: str | Path, dst: str | Path) -> None:
    """Start a zoo at ``dst`` as a copy of the one at ``src`` (every task's shard and the conditions,
    hard-linked where the filesystem allows), so a variant of a config retrains only what it changes.
    The metadata is written last: an interrupted copy is finished by the next call. Writes into the copy
    replace its files (temp file + rename) and never touch ``src``'s. A copy is kept while ``src`` is
    unchanged, and made again (its variant retrained) once ``src`` is rebuilt."""
    src, dst = Path(src), Path(dst)
    origin = {"metadata": files.file_hash(src / METADATA)}
    if (dst / METADATA).exists() and (dst / COPIED_FROM).exists() and files.read_json(dst / COPIED_FROM) == origin:
        return
    meta = files.read_json(src / METADATA)
    names = [e["file"] for e in meta["tasks"].values()] + ([meta["conditions"]["file"]] if "conditions" in meta else [])
    for name in names:
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(src / name, target)
        except OSError:  # another filesystem, or no hard links
            shutil.copyfile(src / name, target)
    files.write_json(dst / METADATA, meta)
    files.write_json(dst / COPIED_FROM, origin)


def header(base_model: str, base_model_path: str, lora: LoRASpec, layout: FlatLayout) -> dict:
    """What every entry of a zoo shares: the base model and the LoRA structure."""
    return {
        "version": VERSION, "base_model": base_model, "base_model_path": base_model_path, "lora": asdict(lora),
        "peft_config": _jsonable(lora.peft_config().to_dict()), "layout": layout.to_json(), "dim": layout.dim,
    }


def check_header(path: Path, meta: dict, base_model: str, lora: LoRASpec) -> None:
    """Refuse a zoo built on another base model or with another LoRA structure."""
    for key, wanted in (("base_model", base_model), ("lora", asdict(lora))):
        if _jsonable(meta.get(key)) != _jsonable(wanted):
            raise ZooMismatch(f"{path}: this zoo was built with {key}={meta.get(key)!r}, the config asks for "
                             f"{wanted!r}; point zoo_dir elsewhere or delete the folder")


def _jsonable(value: object) -> object:
    """``value`` as JSON would store it (PEFT configs hold sets)."""
    return json.loads(json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def entry_hash(source: dict, training: ZooTraining) -> str:
    """Hash of what a task's LoRA learns from: its text (``source``) and the learning settings."""
    return fingerprint(_source_hash(source), training.learning())


def _source_hash(source: dict) -> str:
    return fingerprint(source["task"], source["text"])


def _accepted_hashes(source: dict, training: ZooTraining) -> set[str]:
    """The current hash, and the version-1 hashes of the same settings (they also hashed the precision)."""
    legacy = {fingerprint(_source_hash(source), training.learning() | {"precision": p}) for p in ("bf16", "fp32")}
    return {entry_hash(source, training)} | legacy


def mismatches(root: str | Path, sources: dict[str, dict], training: ZooTraining) -> dict[str, str]:
    """Tasks of ``sources`` (name -> {"task": ..., "text": ...}) whose zoo entry is missing or was
    built from other text or learning settings, each with the reason (no model needed)."""
    root = Path(root)
    path = root / METADATA
    entries = files.read_json(path)["tasks"] if path.exists() else {}
    reasons = {}
    for name, source in sources.items():
        reason = _mismatch(root, entries.get(name), source, training)
        if reason:
            reasons[name] = reason
    return reasons


def _mismatch(root: Path, entry: dict | None, source: dict, training: ZooTraining) -> str | None:
    if entry is None:
        return "not in the zoo yet"
    if not (root / entry["file"]).exists():
        return f"its shard {entry['file']} is missing"
    if entry["hash"] in _accepted_hashes(source, training):
        return None
    built = entry.get("source", {})
    changes = (_diff("task", built.get("task"), source["task"]) + _diff("text", built.get("text"), source["text"])
               + _diff("training", entry.get("training"), training.learning()))
    return "; ".join(changes) or "built from other text or training settings (an older entry that did not record them)"


def _diff(section: str, old: dict | None, new: dict) -> list[str]:
    if old is None:
        return []
    keys = sorted(set(old) | set(new))
    return [f"{section}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if _jsonable(old.get(k)) != _jsonable(new.get(k))]


def check_current(root: str | Path, base_model: str, lora: LoRASpec, sources: dict[str, dict],
                  training: ZooTraining) -> None:
    """For ``predict`` / ``validate`` / ``test``: the zoo must match the config; nothing is ever built here."""
    root = Path(root)
    path = root / METADATA
    if not path.exists():
        raise FileNotFoundError(f"{path}: no zoo here; `fit` builds it")
    check_header(path, files.read_json(path), base_model, lora)
    reasons = mismatches(root, sources, training)
    if reasons:
        listed = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        raise ZooMismatch(f"{root}: the zoo does not match the config ({listed}). Only `fit` trains LoRAs: run "
                         "it with this config, or point data.zoo_dir at the zoo this config was built with")
