"""LoraHub (Huang et al., 2023): one weight per task for the tasks' LoRAs, fitted without gradients on
their few-shot demonstrations; the baseline a user picks who has a few examples and no generator.

The original multiplies each task's factors A_i and B_i by its weight and sums the factors, which
leaves cross terms B_i A_j; here, as for every merge of this project, the weights combine the
updates, ΔW = Σ w_i ΔW_i (task arithmetic with fitted weights). That sum is exact as one LoRA of rank
T·r with scaling 1: A stacks the tasks' A_i, B the weighted, scaled B_i (``stacked``), so each
evaluation swaps it into a live model of at least that rank and needs no SVD.

The search is the original's: weights start at ``init``, stay within [-bound, bound], and minimise
the demonstrations' loss plus ``l1`` · mean |w|, within ``budget`` evaluations, of which the best is
kept. The original's optimiser is nevergrad's NGOpt; here it is SciPy's bounded Powell (SciPy is
already a dependency; nevergrad would pull in scikit-learn). ``loss`` is the original's mean NLL per
token over the tasks (``nll``), or each task's lag, the share of its own LoRA's gain it misses on its
demonstrations (``lag``, ICM-Fusion's ``optimize`` objective, on the same tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from icm_lora.evaluate import LiveAdapter
from icm_lora.flat import FlatLayout
from icm_lora.fusion import DemoLoss, FusionError
from icm_lora.hardware import resolve_precision
from icm_lora.merge import stacked
from icm_lora.zoo import LoRASpec

LOSSES = ("nll", "lag")


@dataclass
class LoraHubSpec:
    """How LoraHub's weights are fitted.

    Args:
        budget: evaluations of the loss on the demonstrations (the original's 40 inference steps).
        bound: each weight stays within [-bound, bound].
        init: every weight's starting value (0: the base model, as in the original).
        l1: factor on the mean absolute weight added to the loss.
        loss: ``nll`` (mean NLL per token over the tasks) or ``lag`` (mean share of each task's own
            LoRA's gain missed on its demonstrations).
        demo_tokens: tokens of each task's demonstrations used (from the start).
        block_size: tokens per block.
        precision: ``auto``, ``bf16`` or ``fp32`` for the base model's forward.
    """

    budget: int = 40
    bound: float = 1.5
    init: float = 0.0
    l1: float = 0.05
    loss: str = "nll"
    demo_tokens: int = 256
    block_size: int = 128
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise FusionError(f"lorahub.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.budget < 1 or self.bound <= 0 or abs(self.init) > self.bound or self.l1 < 0 or self.demo_tokens < 2:
            raise FusionError(f"need budget >= 1, bound > 0, |init| <= bound, l1 >= 0 and demo_tokens >= 2, got "
                              f"{self.budget}, {self.bound}, {self.init}, {self.l1}, {self.demo_tokens}")


class _Spent(Exception):
    """The budget is used up (ends SciPy's search)."""


def fit_weights(loss: Callable[[np.ndarray], float], count: int, spec: LoraHubSpec) -> tuple[Tensor, dict]:
    """Minimise ``loss(w) + l1 · mean |w|`` over (count,) weights in [-bound, bound] from ``init``, within
    ``budget`` evaluations; the best weights evaluated, and the search's record."""
    best: dict = {"value": float("inf"), "weights": np.full(count, spec.init)}
    history: list[float] = []

    def objective(w: np.ndarray) -> float:
        if len(history) >= spec.budget:
            raise _Spent
        w = np.clip(w, -spec.bound, spec.bound)
        value = float(loss(w)) + spec.l1 * float(np.abs(w).mean())
        if not np.isfinite(value):
            value = float("inf")  # a weight vector that breaks the model is a bad one, not an error
        history.append(value)
        if value < best["value"]:
            best.update(value=value, weights=w.copy())
        return value

    try:
        minimize(objective, np.full(count, spec.init), method="Powell",
                 bounds=[(-spec.bound, spec.bound)] * count, options={"maxfev": spec.budget, "xtol": 1e-3})
    except _Spent:
        pass
    if not np.isfinite(best["value"]):
        raise FusionError("LoraHub: every weight vector tried gave a non-finite loss on the demonstrations")
    return torch.tensor(best["weights"], dtype=torch.float32), {"evaluations": len(history),
                                                                "objective": best["value"],
                                                                "objective_at_init": history[0]}


def lorahub(flats: list[Tensor], layout: FlatLayout, lora: LoRASpec, live: LiveAdapter, tokenizer,
            demos: list[list[str]], spec: LoraHubSpec) -> tuple[Tensor, dict]:
    """Fit (T,) weights for the tasks' LoRAs (``flats``, of ``layout``) on their demonstrations, scoring
    on ``live`` (a LiveAdapter with scaling 1 and rank >= T·r, e.g. ``merged_config``); weights, record."""
    empty = [i for i, d in enumerate(demos) if not d]
    if empty or len(demos) != len(flats):
        raise FusionError(f"LoraHub fits its weights on each task's demonstrations; tasks {empty} have none")
    eye = torch.eye(len(flats))
    own = [stacked(flats, layout, lora, eye[i], live.layout) for i in range(len(flats))]
    demo = DemoLoss(live.model, tokenizer, live.layout, demos, spec.demo_tokens, spec.block_size,
                    resolve_precision(spec.precision, live.device), own=own if spec.loss == "lag" else None)

    def loss(w: np.ndarray) -> float:
        flat = stacked(flats, layout, lora, torch.from_numpy(w).float(), live.layout)
        with torch.no_grad():
            per_task = demo(flat) if spec.loss == "lag" else demo.nll(flat)  # (T,)
        return float(per_task.mean())

    return fit_weights(loss, len(flats), spec)
