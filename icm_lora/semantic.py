"""SG-LoRA's semantic prior: from a task description to a Gaussian over LoRA parameters.

Each zoo task is an *expert*: the mean mu_e and element-wise variance var_e of its last M kept
checkpoints (in the zoo's normalised space), and the embedding d_e of its description. A new
description is embedded the same way; its top-K experts by cosine similarity get weights
alpha = softmax(sim / tau), and their moments are matched into one Gaussian:

    mu* = sum_k alpha_k mu_k            var* = sum_k alpha_k var_k + sum_k alpha_k (mu_k - mu*)^2

The generator's condition is c = [mu*, var*] (2 D values). A seen task's condition in training is
built the same way from its neighbours with the task itself left out, as a new task's will be. With
``expert_dropout`` each training item's condition is also built without a random share of the other
experts, so the generator sees conditions whose nearest experts are farther away, as they are for a
new task unlike any in the zoo (our addition; the paper's training conditions are fixed).

A description is *covered* when its best expert similarity reaches a threshold calibrated on the
zoo: the lowest leave-one-out nearest-expert similarity among the experts, less a margin, and never
below what random strings reach plus the margin. Below it no adapter is written unless the user
asks for one anyway (``--allow_far``).
"""

from __future__ import annotations

import random
import string
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

NOISE_SEED = 1_000_003  # the random strings that calibrate the threshold: fixed, so a zoo's threshold is too


class FarDescription(ValueError):
    """A description no expert of the zoo covers (or none at all): no adapter is generated for it."""


@dataclass
class SemanticSpec:
    """SG-LoRA's expert mixing and rejection.

    Args:
        top_k: K, the experts mixed into each prior (fewer if the zoo has fewer).
        temperature: tau of the softmax over the top-K cosine similarities.
        checkpoints: M, the last kept checkpoints of each expert whose mean and variance describe it
            (0: all of them).
        margin: how far below the zoo's lowest leave-one-out nearest-expert similarity a description
            may fall and still be covered (and how far above random strings the threshold stays).
        noise_strings: random strings embedded to keep the threshold above what noise reaches (0: none).
        expert_dropout: in training only, each other expert is left out of a seen task's condition with
            this probability, drawn anew for every item (at least one is kept; 0: the fixed leave-self-out
            condition, as in the paper).
    """

    top_k: int = 4
    temperature: float = 0.1
    checkpoints: int = 0
    margin: float = 0.05
    noise_strings: int = 32
    expert_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"semantic.top_k must be >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"semantic.temperature must be > 0, got {self.temperature}")
        if self.checkpoints < 0:
            raise ValueError(f"semantic.checkpoints must be >= 0, got {self.checkpoints}")
        if self.noise_strings < 0:
            raise ValueError(f"semantic.noise_strings must be >= 0, got {self.noise_strings}")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"semantic.expert_dropout must be in [0, 1), got {self.expert_dropout}")


def expert_moments(checkpoints: Tensor, last: int = 0) -> tuple[Tensor, Tensor]:
    """(N, D) one expert's checkpoints, oldest first -> mean (D,) and population variance (D,) of the
    last ``last`` of them (0: all)."""
    if len(checkpoints) == 0:
        raise ValueError("an expert needs at least one checkpoint")
    kept = checkpoints[-last:] if last else checkpoints
    kept = kept.float()
    return kept.mean(0), kept.var(0, unbiased=False)


def expert_weights(query: Tensor, keys: Tensor, top_k: int, temperature: float,
                   exclude: int | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(E,) query and (T, E) expert embeddings -> indices (K,), alpha (K,) and cosine similarities (K,)
    of the top-K experts, best first; ``exclude`` leaves experts out: one index (a seen task's own) or
    a (T,) boolean mask."""
    sims = torch.nn.functional.cosine_similarity(query.float().unsqueeze(0), keys.float(), dim=-1)  # (T,)
    out = torch.zeros(len(keys), dtype=torch.bool)  # (T,) the experts left out
    if exclude is not None:
        out[exclude] = True  # an index or a mask alike
    sims = sims.masked_fill(out, float("-inf"))
    k = min(top_k, len(keys) - int(out.sum()))
    if k < 1:
        raise ValueError("no expert left to mix: the zoo needs at least two tasks to leave one out")
    top = sims.topk(k)
    return top.indices, torch.softmax(top.values / temperature, dim=0), top.values


def moment_match(alpha: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor]:
    """(K,) weights, (K, D) means and variances -> the mixture's mean mu* (D,) and variance var* (D,)."""
    alpha = alpha.float().unsqueeze(1)  # (K, 1)
    mu = (alpha * means).sum(0)  # (D,)
    var = (alpha * variances).sum(0) + (alpha * (means - mu).pow(2)).sum(0)  # (D,)
    return mu, var


def prior_condition(query: Tensor, keys: Tensor, means: Tensor, variances: Tensor, spec: SemanticSpec,
                    exclude: int | Tensor | None = None) -> tuple[Tensor, dict[int, float], float]:
    """The condition c = [mu*, var*] (2 D,) of a description embedding, the experts drawn on
    (index -> alpha) and the best similarity."""
    idx, alpha, sims = expert_weights(query, keys, spec.top_k, spec.temperature, exclude)
    mu, var = moment_match(alpha, means[idx], variances[idx])
    return torch.cat([mu, var]), dict(zip(idx.tolist(), alpha.tolist())), sims[0].item()


def leave_self_out_conditions(keys: Tensor, means: Tensor, variances: Tensor, spec: SemanticSpec) -> Tensor:
    """(T, 2 D): each expert's condition from the others, as a task outside the zoo would get it."""
    return torch.stack([prior_condition(keys[t], keys, means, variances, spec, exclude=t)[0]
                        for t in range(len(keys))])


def dropout_condition(task: int, keys: Tensor, means: Tensor, variances: Tensor, spec: SemanticSpec,
                      generator: torch.Generator | None = None) -> Tensor:
    """(2 D,) a seen task's training condition from the other experts, each left out with probability
    ``spec.expert_dropout`` (the one most similar to the task is kept if none would be)."""
    drop = torch.rand(len(keys), generator=generator) < spec.expert_dropout  # (T,)
    drop[task] = True
    if drop.all():
        sims = torch.nn.functional.cosine_similarity(keys[task].float().unsqueeze(0), keys.float(), dim=-1)
        sims[task] = float("-inf")
        drop[sims.argmax()] = False
    return prior_condition(keys[task], keys, means, variances, spec, exclude=drop)[0]


def threshold(keys: Tensor, margin: float, noise: Tensor | None = None) -> float:
    """The lowest leave-one-out nearest-expert cosine among (T, E) ``keys``, less ``margin``; raised to
    ``margin`` above the best similarity any (N, E) ``noise`` embedding reaches."""
    if len(keys) < 2:
        raise ValueError("calibrating the rejection threshold needs at least two experts")
    keys = torch.nn.functional.normalize(keys.float(), dim=-1)
    sims = keys @ keys.T  # (T, T)
    sims.fill_diagonal_(float("-inf"))
    value = sims.max(1).values.min().item() - margin
    if noise is not None and len(noise):
        noise = torch.nn.functional.normalize(noise.float(), dim=-1)
        value = max(value, (noise @ keys.T).max().item() + margin)
    return value


def noise_strings(count: int, seed: int = NOISE_SEED) -> list[str]:
    """``count`` random strings: letters and digits, punctuation, and words of random letters."""
    rng = random.Random(seed)
    alphabets = (string.ascii_letters + string.digits, string.punctuation + string.digits, string.ascii_lowercase + " ")
    return ["".join(rng.choices(alphabets[i % 3], k=rng.randint(8, 80))) for i in range(count)]


def check_covered(description: str, best: float, limit: float, allow_far: bool) -> None:
    """Raise ``FarDescription`` (or, with ``allow_far``, warn) when the best expert similarity is below ``limit``."""
    if best >= limit:
        return
    message = (f"description {description[:60]!r} is far from every expert of the zoo: best cosine similarity "
               f"{best:.3f} < threshold {limit:.3f} (calibrated on the zoo's own descriptions)")
    if not allow_far:
        raise FarDescription(f"{message}; no adapter written (pass --allow_far to generate one anyway)")
    warnings.warn(f"{message}; generating anyway (--allow_far)", stacklevel=2)


def check_text(description: str | None) -> str:
    """The description stripped; an empty one is rejected before anything is embedded."""
    text = (description or "").strip()
    if not text:
        raise FarDescription("the description is empty: describe the task in a sentence; no adapter written")
    return text
