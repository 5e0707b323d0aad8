"""Perplexity and bits per character of the base model with any flat LoRA swapped in.

One live PEFT model per process: weights are copied into its LoRA tensors (never merged), and the
bare base is scored with the adapter disabled, so the base weights are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icm_lora import hardware
from icm_lora.flat import FlatLayout
from icm_lora.prefix import FrozenPrefix


@dataclass
class Score:
    """Summed token negative log-likelihood (nats) over a text."""

    nll: float
    tokens: int
    chars: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpc(self) -> float:
        return self.nll / math.log(2) / self.chars


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast on ``device`` for ``precision == "bf16"``, else nothing (resolve ``auto`` first)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    return nullcontext()


class LiveAdapter:
    """A base model wrapped once in PEFT; flat LoRA vectors are swapped in and out of it."""

    def __init__(self, model: PreTrainedModel, peft_config: LoraConfig, layout: FlatLayout) -> None:
        self.model: PeftModel = get_peft_model(model, peft_config)
        self.model.eval()
        self.layout = layout

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load(self, flat: Tensor, source: str = "flat LoRA") -> None:
        """Copy a (D,) vector into the adapter's LoRA tensors."""
        if not torch.isfinite(flat).all():
            raise ValueError(f"{source}: LoRA weights contain NaN or infinite values")
        state = {k: v.to(self.device) for k, v in self.layout.unflatten(flat.float().cpu()).items()}
        result = set_peft_model_state_dict(self.model, state)
        if result.unexpected_keys:
            raise ValueError(f"{source}: keys not in the live adapter: {result.unexpected_keys[:3]}")

    @contextmanager
    def use(self, flat: Tensor | None) -> Iterator[PeftModel]:
        """Run the block with ``flat`` loaded, or with the bare base model when ``flat`` is None."""
        if flat is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.load(flat)
            yield self.model


class TextScorer:
    """Scores texts block by block with whatever adapter ``model`` holds; each text is tokenised once.

    When every adapted layer sits above a frozen prefix of the decoder (a LoRA on the top layers),
    the prefix's output for each text is computed once and reused for every adapter scored on it:
    the bare base model, the task's own LoRA, the soup and every generated sample see the same
    frozen layers below the adapted ones.

    Args:
        model: the model to score (a ``PeftModel`` whose adapter is swapped in and out, or a plain one).
        tokenizer: the base model's tokenizer.
        block_size: tokens of context per block; consecutive blocks share one token so every
            token after the first is predicted exactly once.
        batch_size: blocks per forward pass.
        precision: ``auto`` (bf16 where the hardware has it natively, else fp32), ``bf16`` or ``fp32``.
        reuse_prefix: cache the frozen prefix's output per text (exact; checked once against the full forward).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, block_size: int = 256,
                 batch_size: int = 4, precision: str = "auto", reuse_prefix: bool = True) -> None:
        self.model, self.tokenizer, self.block_size, self.batch_size = model, tokenizer, block_size, batch_size
        self.device = next(model.parameters()).device
        self.precision = hardware.resolve_precision(precision, self.device)
        self.prefix = FrozenPrefix(model) if reuse_prefix else None
        self._blocks: dict[str, tuple[list[Tensor], int]] = {}
        self._states: dict[str, list[Tensor]] = {}  # text -> per batch, (B, L, H) frozen-prefix outputs

    def blocks(self, text: str) -> tuple[list[Tensor], int]:
        """Token blocks of ``text`` (each (L+1,) at most) and the number of characters scored."""
        if text not in self._blocks:
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) < 2:
                raise ValueError("text to score has fewer than 2 tokens")
            starts = range(0, len(ids) - 1, self.block_size)
            blocks = [ids[s : s + self.block_size + 1] for s in starts]
            first = self.tokenizer.decode(ids[:1])  # the first token is context, never predicted
            self._blocks[text] = (blocks, max(1, len(text) - len(first)))
        return self._blocks[text]

    @torch.no_grad()
    def score(self, text: str) -> Score:
        blocks, chars = self.blocks(text)
        batches = [torch.stack(group).to(self.device) for group in _same_length_batches(blocks, self.batch_size)]
        prefix = self.prefix if self.prefix is not None and self.prefix.verify(batches[0][:1, :-1]) else None
        nll, count = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        with autocast(self.precision, self.device):
            if prefix is not None and text not in self._states:
                self._states[text] = [prefix.hidden(ids[:, :-1]) for ids in batches]
            for k, ids in enumerate(batches):  # (B, L+1)
                out = prefix.forward(self._states[text][k]) if prefix is not None else self.model(input_ids=ids[:, :-1])
                nll += F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
                count += ids[:, 1:].numel()
        self.model.train(was_training)
        return Score(nll, count, chars)


def _same_length_batches(blocks: list[Tensor], batch_size: int) -> Iterator[list[Tensor]]:
    full = [b for b in blocks if len(b) == len(blocks[0])]
    for i in range(0, len(full), batch_size):
        yield full[i : i + batch_size]
    rest = [b for b in blocks if len(b) != len(blocks[0])]
    if rest:
        yield rest
