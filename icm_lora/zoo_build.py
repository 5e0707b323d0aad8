"""Build the LoRA zoo with PEFT: per task, fine-tune a LoRA and keep checkpoints of its last phase.

Resumable and safe to interrupt: each shard is written atomically and a task is recorded in
``metadata.json`` only once its shard is complete. Under DDP the ranks split the tasks: in each
round every rank trains one task, the entries are gathered, and rank 0 writes the metadata.
A task's LoRA depends only on its text, the LoRA structure and the training settings, not on the
rank that trained it or on the tasks built before it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icm_lora import files, hardware
from icm_lora.evaluate import TextScorer, autocast
from icm_lora.flat import FlatLayout
from icm_lora.prefix import FrozenPrefix
from icm_lora.ranks import Ranks
from icm_lora.tasks import Task, fingerprint, slug
from icm_lora.zoo import METADATA, LoRASpec, ZooTraining, check_header, entry_hash, header, lora_layout, mismatches


def build(root: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_model: str,
          tasks: list[Task], sources: list[dict], lora: LoRASpec, training: ZooTraining,
          eval_block_size: int = 256, ranks: Ranks | None = None) -> None:
    """Train and store every task's LoRA checkpoints that the zoo at ``root`` lacks or holds stale.

    Args:
        sources: per task, what its text comes from (``{"task": ..., "text": ...}``), hashed into its entry.
        ranks: this process among the run's processes (default: from ``torch.distributed``).
    """
    root, ranks = Path(root), ranks or Ranks.current()
    layout = lora_layout(model.config, lora)
    meta = _open_metadata(root, base_model, model.config._name_or_path, lora, layout)
    reasons = ranks.gather(mismatches(root, {t.name: s for t, s in zip(tasks, sources)}, training))[0]
    todo = [(t, s) for t, s in zip(tasks, sources) if t.name in reasons]
    if not todo:
        return
    if ranks.is_main:
        print(f"LoRA zoo {root}: training {len(todo)} of {len(tasks)} tasks"
              + (f" on {ranks.world} ranks" if ranks.world > 1 else "") + ":")
        for task, _ in todo:
            print(f"  {task.name}: {reasons[task.name]}")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # callers' RNG untouched
        trainer = _TaskTrainer(model, tokenizer, lora, training, layout, eval_block_size)
        for first in tqdm(range(0, len(todo), ranks.world), desc="LoRA zoo", unit="round", disable=not ranks.is_main):
            mine = ranks.share(todo[first : first + ranks.world])[:1]
            done = [(task.name, trainer.run(root, task, source)) for task, source in mine]
            for name, entry in (pair for gathered in ranks.gather(done) for pair in gathered):
                meta["tasks"][name] = entry
            if ranks.is_main:
                files.write_json(root / METADATA, meta)
        trainer.peft_model.unload()  # give the caller its bare base model back
    ranks.barrier()  # every rank reads the finished metadata


def _open_metadata(root: Path, base_model: str, base_model_path: str, lora: LoRASpec, layout: FlatLayout) -> dict:
    path = root / METADATA
    new = header(base_model, base_model_path, lora, layout)
    if not path.exists():
        return new | {"tasks": {}}
    meta = files.read_json(path)
    check_header(path, meta, base_model, lora)
    return meta | {"version": new["version"]}


class _TaskTrainer:
    """One live PEFT model that trains each task's LoRA from the same initialisation."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: LoRASpec,
                 training: ZooTraining, layout: FlatLayout, eval_block_size: int) -> None:
        self.tokenizer, self.training, self.layout = tokenizer, training, layout
        torch.manual_seed(lora.init_seed)
        self.peft_model = get_peft_model(model, lora.peft_config())
        self.init = {k: v.clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}
        self.device = next(self.peft_model.parameters()).device
        self.precision = hardware.resolve_precision(training.precision, self.device)
        self.prefix = FrozenPrefix(self.peft_model) if training.cache_frozen else None
        self.scorer = TextScorer(self.peft_model, tokenizer, eval_block_size, precision=self.precision,
                                 reuse_prefix=training.cache_frozen)

    def run(self, root: Path, task: Task, source: dict) -> dict:
        """Train ``task``'s LoRA, write its shard, and return its metadata entry."""
        set_peft_model_state_dict(self.peft_model, self.init)
        torch.manual_seed(int(fingerprint(self.training.seed, task.name), 16))  # dropout: same on any rank
        start = time.time()
        ckpts, cached = train_lora(self.peft_model, self.tokenizer, task, self.training, self.layout,
                                   self.precision, self.prefix)
        seconds = time.time() - start
        shard = f"tasks/{slug(task.name)}.safetensors"
        files.save_tensors(root / shard, {"checkpoints": ckpts, "final": ckpts[-1].clone()})
        with self.peft_model.disable_adapter():
            base_val = self.scorer.score(task.val)
        tuned_val = self.scorer.score(task.val)
        tqdm.write(f"  {task.name}: val ppl {base_val.ppl:.2f} -> {tuned_val.ppl:.2f} ({seconds:.0f} s)")
        return {
            "file": shard, "hash": entry_hash(source, self.training), "source": source,
            "training": self.training.learning(), "description": task.description, "num_checkpoints": len(ckpts),
            "train_seconds": round(seconds, 1),
            "computed": {"precision": self.precision, "device": str(self.device),
                         "hardware": hardware.describe(self.device), "cached_frozen_layers": cached,
                         "torch": torch.__version__},
            "val": {"base_ppl": base_val.ppl, "final_ppl": tuned_val.ppl, "base_bpc": base_val.bpc,
                    "final_bpc": tuned_val.bpc},
        }


def train_lora(model, tokenizer: PreTrainedTokenizerBase, task: Task, cfg: ZooTraining, layout: FlatLayout,
               precision: str, prefix: FrozenPrefix | None = None) -> tuple[Tensor, int]:
    """Fine-tune the live adapter on ``task``; (N, D) kept checkpoints (oldest first) and the number of
    frozen layers skipped by reusing their cached output (0: every step ran the whole model)."""
    blocks = token_blocks(tokenizer, task.train, cfg.block_size)
    rng = random.Random(f"{cfg.seed}:{task.name}")
    draws = [[rng.randrange(len(blocks)) for _ in range(cfg.batch_size)] for _ in range(cfg.steps)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    device = next(model.parameters()).device
    if prefix is not None and not prefix.verify(blocks[0][None].to(device)):
        prefix = None
    states = prefix_states(prefix, blocks, draws, precision, device) if prefix is not None else None
    keep_from = cfg.steps - cfg.num_checkpoints * cfg.checkpoint_every
    kept = []
    model.train()
    bar = tqdm(draws, desc=task.name, leave=False)
    for step, drawn in enumerate(bar):
        batch = torch.stack([blocks[i] for i in drawn]).to(device)  # (B, L)
        with autocast(precision, device):
            if states is None:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            else:
                loss = prefix.loss(torch.stack([states[i] for i in drawn]), batch)  # (B, L, H) in
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
    return torch.stack(kept), prefix.start if prefix is not None else 0  # (N, D), skipped layers


PREFIX_BATCH = 16  # blocks per frozen-prefix pass (a GPU wants large passes; on a 2-core CPU the size barely matters)


def prefix_states(prefix: FrozenPrefix, blocks: list[Tensor], draws: list[list[int]], precision: str,
                  device: torch.device) -> dict[int, Tensor]:
    """(L, H) frozen-prefix output of every block that ``draws`` uses, ``PREFIX_BATCH`` blocks per pass."""
    needed = list(dict.fromkeys(i for drawn in draws for i in drawn))
    states: dict[int, Tensor] = {}
    with autocast(precision, device):
        for k in range(0, len(needed), PREFIX_BATCH):
            part = needed[k : k + PREFIX_BATCH]
            states.update(zip(part, prefix.hidden(torch.stack([blocks[i] for i in part]).to(device))))
    return states


def token_blocks(tokenizer: PreTrainedTokenizerBase, docs: list[str], block_size: int) -> list[Tensor]:
    """Documents joined by EOS and cut into (block_size,) token blocks."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
    blocks = [torch.tensor(stream[i : i + block_size]) for i in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(f"training text has {len(stream)} tokens, fewer than one block of {block_size}")
    return blocks
