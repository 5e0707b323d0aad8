"""Adapters a user would pick for a task nobody trained, without a generator.

Each baseline maps the seen experts' LoRAs (flat, as the zoo stores them) and some notion of how
close the new task is to each expert to one flat LoRA. Similarities are cosines between conditions:
task vectors (the base model's hidden states on a task's demonstrations) or description embeddings.
The soup and weighted means average the flat vectors (A and B factors) the way the zoo's own soup
does; that is what "averaging adapters" means in AdapterSoup and LoraHub.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def similarities(query: Tensor, keys: Tensor) -> Tensor:
    """(C,) query, (E, C) keys -> (E,) cosine similarities."""
    return F.cosine_similarity(query.unsqueeze(0), keys, dim=-1)


def soup(experts: Tensor) -> Tensor:
    """(E, D) -> (D,) the uniform mean of the experts."""
    return experts.mean(0)


def nearest(experts: Tensor, sims: Tensor) -> tuple[Tensor, int]:
    """(E, D), (E,) -> the most similar expert's LoRA and its index."""
    best = int(sims.argmax())
    return experts[best], best


def top_k_weights(sims: Tensor, k: int, temperature: float) -> Tensor:
    """(E,) -> (E,) weights: softmax(sim / temperature) over the ``k`` most similar experts, 0 elsewhere."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"top-K needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, len(sims))
    top = sims.topk(k).indices
    weights = torch.zeros_like(sims, dtype=torch.float32)
    weights[top] = torch.softmax(sims[top].float() / temperature, dim=0)
    return weights


def weighted_mean(experts: Tensor, weights: Tensor) -> Tensor:
    """(E, D), (E,) weights summing to 1 -> (D,)."""
    return (weights.to(experts.dtype).unsqueeze(1) * experts).sum(0)


def gap_closed(nll: float, base_nll: float, oracle_nll: float) -> float:
    """Share of the base -> oracle gap in NLL per token that an adapter closes (1: as good as the
    oracle, 0: no better than the base model, negative: worse). NaN when the oracle does not beat base."""
    gap = base_nll - oracle_nll
    return (base_nll - nll) / gap if gap > 0 else math.nan


def random_description(length: int, seed: int) -> str:
    """A string of random letters, digits and spaces: the control for description conditioning."""
    g = torch.Generator().manual_seed(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      "
    return "".join(alphabet[i] for i in torch.randint(len(alphabet), (length,), generator=g).tolist()).strip() or "x"
