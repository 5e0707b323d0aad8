"""The LoRA zoo: per task, fine-tune a LoRA with PEFT and keep many checkpoints of its last phase.

On disk (``zoo_dir``)::

    metadata.json            base model, PEFT config, flat layout, per-task entries, conditions
    tasks/<task>.safetensors "checkpoints" (N, D) and "final" (D,) flat LoRA vectors, float32
    conditions.safetensors   task vectors and description embeddings (see condition.py)

Every file is written atomically, and a task is only recorded in ``metadata.json`` after its shard
is complete, so an interrupted build resumes at the first unfinished task.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from icm_lora import files
from icm_lora.evaluate import TextScorer, autocast
from icm_lora.flat import FlatLayout, Normalizer
from icm_lora.tasks import Task, fingerprint, slug

METADATA = "metadata.json"


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

    Args:
        steps: optimiser steps per task.
        batch_size: blocks per step.
        block_size: tokens per block.
        lr: AdamW learning rate (linear warm-up, then constant so the last phase samples one
            stationary distribution of adapters).
        warmup_steps: warm-up steps.
        num_checkpoints: checkpoints kept per task, from the end of training.
        checkpoint_every: steps between kept checkpoints.
        precision: ``bf16`` autocast or ``fp32``.
        seed: seed of the batch order.
    """

    steps: int = 200
    batch_size: int = 4
    block_size: int = 128
    lr: float = 1.0e-3
    warmup_steps: int = 10
    num_checkpoints: int = 50
    checkpoint_every: int = 1
    precision: str = "bf16"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_checkpoints * self.checkpoint_every > self.steps:
            raise ValueError(f"num_checkpoints * checkpoint_every ({self.num_checkpoints} * "
                             f"{self.checkpoint_every}) exceeds steps ({self.steps})")


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
            raise FileNotFoundError(f"{path}: no zoo here; `fit` builds it in prepare_data")
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


def build(root: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_model: str,
          tasks: list[Task], task_hashes: list[str], lora: LoRASpec, training: ZooTraining,
          eval_block_size: int = 256) -> None:
    """Train and store every task's LoRA checkpoints that are not already in the zoo at ``root``."""
    root = Path(root)
    layout = lora_layout(model.config, lora)
    meta = _open_metadata(root, base_model, model, lora, layout)
    todo = [(t, h) for t, h in zip(tasks, task_hashes) if _stale(root, meta, t.name, _entry_hash(h, training))]
    if not todo:
        return
    torch.manual_seed(lora.init_seed)
    peft_model = get_peft_model(model, lora.peft_config())
    init = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    scorer = TextScorer(tokenizer, eval_block_size, precision=training.precision)
    for task, task_hash in tqdm(todo, desc="LoRA zoo", unit="task"):
        set_peft_model_state_dict(peft_model, init)
        start = time.time()
        ckpts = _train(peft_model, tokenizer, task, training, layout)
        seconds = time.time() - start
        shard = f"tasks/{slug(task.name)}.safetensors"
        files.save_tensors(root / shard, {"checkpoints": ckpts, "final": ckpts[-1].clone()})
        with peft_model.disable_adapter():
            base_val = scorer.score(peft_model, task.val)
        tuned_val = scorer.score(peft_model, task.val)
        meta["tasks"][task.name] = {
            "file": shard, "hash": _entry_hash(task_hash, training), "description": task.description,
            "num_checkpoints": len(ckpts), "train_seconds": round(seconds, 1),
            "val": {"base_ppl": base_val.ppl, "final_ppl": tuned_val.ppl, "base_bpc": base_val.bpc,
                    "final_bpc": tuned_val.bpc},
        }
        files.write_json(root / METADATA, meta)
        tqdm.write(f"  {task.name}: val ppl {base_val.ppl:.2f} -> {tuned_val.ppl:.2f} ({seconds:.0f} s)")
    peft_model.unload()  # give the caller its bare base model back


def _open_metadata(root: Path, base_model: str, model: PreTrainedModel, lora: LoRASpec, layout: FlatLayout) -> dict:
    path = root / METADATA
    header = {
        "version": 1, "base_model": base_model, "base_model_path": model.config._name_or_path,
        "lora": asdict(lora), "peft_config": _jsonable(lora.peft_config().to_dict()), "layout": layout.to_json(),
        "dim": layout.dim,
    }
    if not path.exists():
        return header | {"tasks": {}}
    meta = files.read_json(path)
    for key in ("base_model", "lora", "dim"):
        if _jsonable(meta.get(key)) != _jsonable(header[key]):
            raise ValueError(
                f"{path}: this zoo was built with {key}={meta.get(key)!r}, the config asks for "
                f"{header[key]!r}; point zoo_dir elsewhere or delete the folder"
            )
    return meta


def _jsonable(value: object) -> object:
    """``value`` as JSON would store it (PEFT configs hold sets)."""
    return json.loads(json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def stale_tasks(root: str | Path, names: list[str], task_hashes: list[str], training: ZooTraining) -> list[str]:
    """Tasks whose shard is missing or was built from other text or training settings (no model needed)."""
    path = Path(root) / METADATA
    meta = files.read_json(path) if path.exists() else {"tasks": {}}
    return [n for n, h in zip(names, task_hashes) if _stale(Path(root), meta, n, _entry_hash(h, training))]


def _entry_hash(task_hash: str, training: ZooTraining) -> str:
    """What a zoo entry records: the task's text and the settings its LoRA was trained with."""
    return fingerprint(task_hash, training)


def _stale(root: Path, meta: dict, name: str, entry_hash: str) -> bool:
    entry = meta["tasks"].get(name)
    return entry is None or entry["hash"] != entry_hash or not (root / entry["file"]).exists()


def _train(model, tokenizer: PreTrainedTokenizerBase, task: Task, cfg: ZooTraining, layout: FlatLayout) -> Tensor:
    """Fine-tune the live adapter on ``task`` and return (N, D) kept checkpoints, oldest first."""
    blocks = _token_blocks(tokenizer, task.train, cfg.block_size)
    rng = random.Random(f"{cfg.seed}:{task.name}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    device = next(model.parameters()).device
    keep_from = cfg.steps - cfg.num_checkpoints * cfg.checkpoint_every
    kept = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=task.name, leave=False)
    for step in bar:
        batch = torch.stack([blocks[rng.randrange(len(blocks))] for _ in range(cfg.batch_size)]).to(device)
        with autocast(cfg.precision, device):
            loss = model(input_ids=batch, labels=batch).loss  # (B, L) -> scalar
        if not torch.isfinite(loss):
            raise FloatingPointError(f"task {task.name!r}: LoRA training loss is {loss.item()} at step {step}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        warmup.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step >= keep_from and (step - keep_from + 1) % cfg.checkpoint_every == 0:
            kept.append(layout.flatten(get_peft_model_state_dict(model)))
    model.eval()
    return torch.stack(kept)  # (N, D)


def _token_blocks(tokenizer: PreTrainedTokenizerBase, docs: list[str], block_size: int) -> list[Tensor]:
    """Documents joined by EOS and cut into (block_size,) token blocks."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
    blocks = [torch.tensor(stream[i : i + block_size]) for i in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(f"training text has {len(stream)} tokens, fewer than one block of {block_size}")
    return blocks
