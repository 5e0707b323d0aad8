"""Data-free merges of LoRA adapters: the baselines ICM-Fusion is measured against.

Every merger works on each adapted module's update ΔW = s·B·A (never on the raw factors A and B,
which are defined only up to an invertible r x r matrix), with the LoRA scaling s (lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA) applied exactly once, when ΔW is formed. The merged ΔW goes back
into a LoRA by SVD (``factorize``) with scaling 1 (``lora_alpha == r``, no rsLoRA), so a merged folder
is a standard PEFT adapter whose rank is what the merge needs (task arithmetic of T rank-r adapters:
T·r).

Rules, module by module (``weights`` w_i per task, ``scale`` lambda on the result):

- ``task_arithmetic``: lambda Σ w_i ΔW_i (what PEFT's ``cat`` computes exactly);
- ``ties``: TIES-Merging on ΔW: keep each task's top ``density`` entries by magnitude, elect each
  entry's sign by the weighted sum, average the entries that agree with it (PEFT's own rule);
- ``tsv_m``: Task Singular Vectors: keep each task's top ``keep`` share of its singular directions,
  orthogonalise the stacked left and right singular vectors (polar factor), sum with the tasks'
  singular values;
- ``iso_cts``: Iso-CTS: the summed update's top ``common`` share of directions, plus each task's top
  directions outside that common subspace, orthogonalised, with the spectrum flattened to its mean
  singular value (``isotropy`` 1; 0 keeps the singular values of the sum);
- ``knots``: KnOTS: one SVD basis of all tasks' updates side by side, [ΔW_1 ... ΔW_T] = U S [V_1 ... V_T]^T,
  then TIES over the task-specific V_i, and ΔW = U S V_merged^T.

PEFT's own ``add_weighted_adapter`` (``cat``, ``svd``, ``ties_svd``, ``dare_ties_svd``, ``linear``,
``ties``) runs on the real adapters through ``peft_merge``; what it writes is read back as factors
with scaling 1, which is what its merged config means (``lora_alpha == r``) and sidesteps its
rsLoRA overscaling (see ``tests/test_merge.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils.merge_utils import ties as peft_ties
from torch import Tensor

from icm_lora.flat import FlatLayout
from icm_lora.zoo import LoRASpec

MERGERS = ("task_arithmetic", "ties", "tsv_m", "iso_cts", "knots")
PEFT_TYPES = ("cat", "svd", "ties_svd", "dare_ties_svd", "linear", "ties")
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
RANK_TOL = 1e-5  # singular values below this share of the largest are float32 round-off, not directions


class MergeError(ValueError):
    """Adapters that cannot be merged (another base model, rank or target modules), or bad settings."""


@dataclass
class MergeSpec:
    """One merge rule and its knobs.

    Args:
        method: one of ``MERGERS`` (ours, on ΔW) or ``peft_<type>`` for PEFT's ``add_weighted_adapter``
            with ``<type>`` in ``PEFT_TYPES``.
        scale: lambda, the factor on the merged update (task arithmetic's usual knob).
        density: share of entries kept per task (``ties``, ``knots``, PEFT's TIES/DARE types).
        keep: ``tsv_m``: share of each task's singular directions kept (None: 1 / T, the paper's).
        common: ``iso_cts``: share of the summed update's directions kept as the common subspace.
        isotropy: ``iso_cts``: 1 flattens the spectrum to its mean singular value, 0 keeps it.
        svd_rank: PEFT's ``svd`` types: rank of the merged adapter (None: PEFT's default, the largest
            input rank; 0: the sum of the input ranks, which is exact for ``svd``).
        seed: seed of DARE's random drops.
    """

    method: str = "task_arithmetic"
    scale: float = 1.0
    density: float = 0.2
    keep: float | None = None
    common: float = 0.8
    isotropy: float = 1.0
    svd_rank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        peft_type = self.method.removeprefix("peft_")
        if self.method not in MERGERS and not (self.method.startswith("peft_") and peft_type in PEFT_TYPES):
            raise MergeError(f"merge method must be one of {list(MERGERS)} or peft_<type> with type in "
                             f"{list(PEFT_TYPES)}, got {self.method!r}")
        if not 0 < self.density <= 1 or not 0 < self.common <= 1 or not 0 <= self.isotropy <= 1:
            raise MergeError(f"density and common must be in (0, 1] and isotropy in [0, 1], got density "
                             f"{self.density}, common {self.common}, isotropy {self.isotropy}")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise MergeError(f"keep must be in (0, 1], got {self.keep}")


# ---- ΔW <-> LoRA ------------------------------------------------------------------------------
def scaling(spec: LoRASpec) -> float:
    """PEFT's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return spec.lora_alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)


def module_names(layout: FlatLayout) -> list[str]:
    """The adapted modules of a layout (each has an ``A`` and a ``B`` tensor)."""
    names = [s.name[: -len(A_SUFFIX)] for s in layout.segments if s.name.endswith(A_SUFFIX)]
    present = {s.name for s in layout.segments}
    missing = [n for n in names if n + B_SUFFIX not in present]
    if not names or missing:
        raise MergeError(f"not a LoRA layout (modules without a lora_B: {missing[:3]})" if missing
                         else "not a LoRA layout (no lora_A tensors)")
    return names


def delta_weights(flat: Tensor, layout: FlatLayout, spec: LoRASpec) -> dict[str, Tensor]:
    """(D,) flat LoRA -> per module, ΔW = s·B·A (out, in), float64 for exact merges."""
    state = layout.unflatten(flat)
    s = scaling(spec)
    return {m: s * state[m + B_SUFFIX].double() @ state[m + A_SUFFIX].double() for m in module_names(layout)}


def factorize(deltas: dict[str, Tensor], rank: int | None = None) -> tuple[dict[str, Tensor], int]:
    """Per-module ΔW -> a PEFT state dict with scaling 1 (B = U sqrt(S), A = sqrt(S) V^T) and its rank.

    ``rank`` None keeps every direction of the largest update above round-off (exact); modules that need
    fewer directions are padded with zeros, so every module has the same rank.
    """
    svds = {m: torch.linalg.svd(d.double(), full_matrices=False) for m, d in deltas.items()}
    if rank is None:
        rank = max(1, max(int((S > S[0] * RANK_TOL).sum()) if S[0] > 0 else 0 for _, S, _ in svds.values()))
    state = {}
    for m, (U, S, Vh) in svds.items():
        k = min(rank, len(S))
        root = S[:k].sqrt()
        B = torch.zeros(U.shape[0], rank, dtype=torch.float64)
        A = torch.zeros(rank, Vh.shape[1], dtype=torch.float64)
        B[:, :k], A[:k] = U[:, :k] * root, root[:, None] * Vh[:k]
        state[m + B_SUFFIX], state[m + A_SUFFIX] = B.float(), A.float()
    return state, rank


def pad_into(state: dict[str, Tensor], into: FlatLayout) -> Tensor:
    """A LoRA state dict of rank k -> the flat vector of ``into`` (rank R >= k), zeros in the extra
    rows of A and columns of B, so the update B·A is unchanged."""
    parts = []
    for seg in into.segments:  # built here rather than by into.flatten, which detaches: gradients pass
        part = state[seg.name].float()
        t = torch.zeros(seg.shape, dtype=part.dtype, device=part.device)
        t[: part.shape[0], : part.shape[1]] = part
        parts.append(t.reshape(-1))
    return torch.cat(parts).cpu()


def stacked(flats: list[Tensor], layout: FlatLayout, lora: LoRASpec, weights: Tensor, into: FlatLayout,
            anchor: dict[str, Tensor] | None = None) -> Tensor:
    """T (D,) LoRAs of ``layout`` and (T,) weights -> one flat LoRA of ``into`` (scaling 1, rank R >= T·r)
    whose update is exactly Σ w_i s·B_i A_i: A = [A_1; ...; A_T; 0], B = [w_1 s B_1, ..., w_T s B_T, 0].
    ``anchor``, a fixed LoRA state dict of scaling 1 (``factorize``), is put first, and its update added.
    Differentiable in the LoRAs and the weights."""
    s, states = scaling(lora), [layout.unflatten(f.float()) for f in flats]
    shapes = {seg.name: seg.shape for seg in into.segments}
    out = {}
    for m in module_names(layout):
        A = torch.cat([st[m + A_SUFFIX] for st in states])  # (T·r, in)
        B = torch.cat([w * s * st[m + B_SUFFIX] for w, st in zip(weights.float(), states)], dim=1)  # (out, T·r)
        if anchor is not None:  # (R_a + T·r, in), (out, R_a + T·r)
            A = torch.cat([anchor[m + A_SUFFIX].to(A), A])
            B = torch.cat([anchor[m + B_SUFFIX].to(B), B], dim=1)
        if m + A_SUFFIX not in shapes or shapes[m + A_SUFFIX][0] < A.shape[0]:
            raise MergeError(f"the live adapter has no module {m!r} of rank >= {A.shape[0]}")
        out[m + A_SUFFIX], out[m + B_SUFFIX] = A, B
    return pad_into(out, into)


def merged_config(spec: LoRASpec, rank: int) -> LoraConfig:
    """The PEFT config of a merged adapter: the zoo's target modules and layers, rank ``rank``, scaling 1."""
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(spec.target_modules),
                      layers_to_transform=spec.layers_to_transform, use_rslora=False, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


# ---- rules on one module's updates ----------------------------------------------------------
def _polar(M: Tensor) -> Tensor:
    """The orthonormal factor P Q^T of M = P S Q^T (the nearest matrix with orthonormal columns)."""
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def _top(delta: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def _rank(delta: Tensor) -> int:
    S = torch.linalg.svdvals(delta)
    return int((S > S[0] * RANK_TOL).sum()) if S[0] > 0 else 0


def task_arithmetic(deltas: list[Tensor], weights: Tensor) -> Tensor:
    return sum(w * d for w, d in zip(weights.tolist(), deltas))


def _ties(tensors: list[Tensor], weights: Tensor, density: float) -> Tensor:
    """PEFT's TIES (trim, elect sign, disjoint mean); density 1 trims nothing, without PEFT's warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        return peft_ties(tensors, weights.to(tensors[0]), density)


def ties(deltas: list[Tensor], weights: Tensor, density: float) -> Tensor:
    return _ties(deltas, weights, density)


def tsv_m(deltas: list[Tensor], weights: Tensor, keep: float | None) -> Tensor:
    share = keep if keep is not None else 1.0 / len(deltas)
    parts = [_top(w * d, max(1, math.ceil(share * max(1, _rank(d))))) for w, d in zip(weights.tolist(), deltas)]
    U = _polar(torch.cat([u for u, _, _ in parts], 1))  # (out, K)
    Vh = _polar(torch.cat([vh for _, _, vh in parts], 0).T).T  # (K, in)
    return U @ torch.diag(torch.cat([s for _, s, _ in parts])) @ Vh


def iso_cts(deltas: list[Tensor], weights: Tensor, common: float, isotropy: float) -> Tensor:
    total = task_arithmetic(deltas, weights)
    rank = max(1, _rank(total))
    k = max(1, math.ceil(common * rank))
    Uc, Sc, Vhc = _top(total, k)
    per_task = max(1, (rank - k) // len(deltas)) if rank > k else 0
    lefts, rights = [Uc], [Vhc]
    for w, d in zip(weights.tolist(), deltas):
        if per_task:
            rest = w * d - Uc @ (Uc.T @ (w * d))  # the task's update outside the common subspace
            u, _, vh = _top(rest, per_task)
            lefts.append(u)
            rights.append(vh)
    U = _polar(torch.cat(lefts, 1))
    Vh = _polar(torch.cat(rights, 0).T).T
    S = torch.diag(U.T @ total @ Vh.T)  # the sum's spectrum on the kept directions
    S = (1 - isotropy) * S + isotropy * Sc.mean()
    return U @ torch.diag(S) @ Vh


def knots(deltas: list[Tensor], weights: Tensor, density: float) -> Tensor:
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, 1), full_matrices=False)  # (out, T*in) = U S [V_1..V_T]^T
    keep = S > S[0] * RANK_TOL
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    inputs = deltas[0].shape[1]
    per_task = [Vh[:, i * inputs : (i + 1) * inputs] for i in range(len(deltas))]  # each (rho, in)
    return U @ torch.diag(S) @ _ties(per_task, weights, density)


def merge_module(deltas: list[Tensor], weights: Tensor, spec: MergeSpec) -> Tensor:
    """One module's (out, in) updates of T tasks -> lambda x the merged update."""
    if spec.method == "task_arithmetic":
        merged = task_arithmetic(deltas, weights)
    elif spec.method == "ties":
        merged = ties(deltas, weights, spec.density)
    elif spec.method == "tsv_m":
        merged = tsv_m(deltas, weights, spec.keep)
    elif spec.method == "iso_cts":
        merged = iso_cts(deltas, weights, spec.common, spec.isotropy)
    elif spec.method == "knots":
        merged = knots(deltas, weights, spec.density)
    else:
        raise MergeError(f"{spec.method!r} is not one of this module's rules {MERGERS}; PEFT's run through peft_merge")
    return spec.scale * merged


def merge(adapters: list[dict[str, Tensor]], weights: Tensor, spec: MergeSpec) -> dict[str, Tensor]:
    """Per task, per module ΔW -> the merged per-module ΔW."""
    check_same_modules(adapters)
    return {m: merge_module([a[m] for a in adapters], weights.double(), spec) for m in adapters[0]}


def check_same_modules(adapters: list[dict[str, Tensor]], names: list[str] | None = None) -> None:
    """Refuse adapters of different target modules or shapes, naming the first that differs."""
    if not adapters:
        raise MergeError("nothing to merge: no adapters given")
    names = names or [f"adapter {i}" for i in range(len(adapters))]
    ref = {m: tuple(d.shape) for m, d in adapters[0].items()}
    for name, adapter in zip(names[1:], adapters[1:]):
        shapes = {m: tuple(d.shape) for m, d in adapter.items()}
        if shapes != ref:
            diff = sorted(set(shapes.items()) ^ set(ref.items()))[:2]
            raise MergeError(f"{name} adapts other modules or shapes than {names[0]} ({diff}); "
                             "adapters of one base model and target modules only")


# ---- PEFT's add_weighted_adapter ----------------------------------------------------------------
def peft_merge(model: PeftModel, flats: list[Tensor], layout: FlatLayout, spec: LoRASpec, weights: Tensor,
               merge_spec: MergeSpec) -> dict[str, Tensor]:
    """Run PEFT's ``add_weighted_adapter`` of type ``merge_spec.method[5:]`` on T zoo adapters loaded into
    ``model`` (any PeftModel of the zoo's base model and LoRA structure; its active adapter is left
    as it was) and return the merged per-module ΔW (its B·A, lambda applied)."""
    combination = merge_spec.method.removeprefix("peft_")
    names = [f"_merge_in_{i}" for i in range(len(flats))]
    active = model.active_adapter
    try:
        for name, flat in zip(names, flats):
            model.add_adapter(name, spec.peft_config())
            state = {k: v.to(next(model.parameters()).device) for k, v in layout.unflatten(flat).items()}
            set_peft_model_state_dict(model, state, adapter_name=name)
        kwargs = {"density": merge_spec.density} if combination not in ("cat", "svd", "linear") else {}
        if combination.endswith("svd") and merge_spec.svd_rank is not None:
            kwargs["svd_rank"] = merge_spec.svd_rank or spec.r * len(flats)
        torch.manual_seed(merge_spec.seed)  # DARE draws from the global generator
        model.add_weighted_adapter(names, weights.tolist(), "_merged", combination_type=combination, **kwargs)
        out = {}
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_A") and "_merged" in module.lora_A:
                key = module_name.removeprefix("base_model.model.")
                out[key] = merge_spec.scale * (module.lora_B["_merged"].weight.double()
                                               @ module.lora_A["_merged"].weight.double()).cpu()
    finally:
        model.set_adapter(active)
        for name in [*names, "_merged"]:
            if name in model.peft_config:
                model.delete_adapter(name)
    return {_zoo_key(k, layout): v for k, v in out.items()}


def _zoo_key(module_name: str, layout: FlatLayout) -> str:
    """A PEFT module name -> the layout's module prefix that ends with it."""
    match = [m for m in module_names(layout) if m.endswith(module_name)]
    if len(match) != 1:
        raise MergeError(f"PEFT's merged module {module_name!r} matches {len(match)} modules of the zoo's layout")
    return match[0]


def skeleton(config, spec: LoRASpec) -> PeftModel:
    """A PeftModel of the base architecture with uninitialised base weights (merging reads only LoRA factors)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    return get_peft_model(model, spec.peft_config())
