"""ICM-Fusion: one multi-task adapter from several tasks, fused in the generator's latent space.

Each task is a point (z_t, c_t) of the trained CVAE: c_t its scaled condition (task vector or
description embedding), z_t either 0, the prior's mean, so that fusing one task decodes exactly what
``predict`` writes for it (``latent: prior``), or the posterior mean of q(z | own LoRA, c_t) for a zoo
task (``latent: posterior``). The points are combined by a rule, and the result is decoded once into
a LoRA of the zoo's structure:

- ``mean``: the weighted mean of the tasks' (z, c);
- ``ties``: TIES in latent space: each task keeps its top ``density`` coordinates by magnitude, each
  coordinate's sign is elected by the weighted sum, and the agreeing coordinates are averaged;
- ``pcgrad``: each task's vector loses its component along every other task's vector it points
  against (PCGrad's projection), then the weighted mean;
- ``optimize``: start from the weighted mean and take ``steps`` Adam steps on (z, c) through the
  decoder and the base model, against the tasks' in-context demonstrations: each task's loss is the
  share of its own LoRA's gain over the base model that the decoded adapter misses on them (``DemoLoss``),
  so a task with little text counts as much as one with much, and ``focus`` > 0 replaces the weighted
  mean of those losses by their smooth maximum (temperature ``focus``), which up-weights the task
  that lags (the tail task).

``scale`` multiplies the combined (z, c) before decoding (the latent counterpart of task
arithmetic's lambda; a mean of T roughly orthogonal conditions is shorter than any of them).

With ``decode: once`` (the default) the fused point is decoded into one LoRA of the zoo's rank r, the
generator's own structure. That caps the fused update at rank r, while the sum of T tasks' updates
needs up to T·r. ``decode: each`` keeps the latent adjustment and lifts the cap: each task keeps its
own point, adjusted in latent space (``pcgrad``: projected off the points it conflicts with;
``optimize``: all T points, and each task's weight, fitted jointly on the demonstrations through the
decoder), each point is decoded, and the fused update is ``scale`` Σ w_t ΔW_t of the decoded LoRAs, an
adapter of rank T·r. ``mean`` leaves the points as they are (the weighted mean of the decoded
updates: task arithmetic on the generator's LoRAs); ``ties`` has no per-task points and is refused.
``anchor: own`` (zoo tasks) takes the decoder's reconstruction error out: each task's LoRA is its own
LoRA plus what moving its point changes in the decoded LoRA, own + decode(adjusted) - decode(point),
so the unadjusted fusion is exactly task arithmetic of the own LoRAs and the latent adjustment is the
only thing the generator adds. ``anchor: merged`` (zoo tasks) starts from a data-free merge of the own
LoRAs instead (``anchor_merge``, TSV-M by default) and adds what the latent adjustment changes in the
decoded updates, merge + scale Σ w_t (ΔW(adjusted_t) - ΔW(point_t)): the unadjusted fusion is the merge,
and the generator steers it.

``holdout_tokens`` > 0 keeps the tokens of each task's demonstrations that follow the fitted ones out of
the fit: ``optimize`` returns the step whose objective on them is lowest (the step is chosen on text
the steps never saw, so a long or fast descent cannot overfit the few fitted tokens unnoticed). ``guard``
adds a condition: a step is returned only if no task's lag there is above its lag at the start (by
more than ``guard``), so the fit cannot buy the mean with one task (with ``anchor: merged``, no task
ends worse than under the merge it starts from, on the text the step is chosen on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.func import functional_call

from icm_lora.evaluate import autocast
from icm_lora.flat import FlatLayout
from icm_lora.merge import MERGERS, MergeSpec, stacked, ties
from icm_lora.prefix import FrozenPrefix
from icm_lora.zoo import LoRASpec

RULES = ("mean", "ties", "pcgrad", "optimize")
LATENTS = ("prior", "posterior")
DECODES = ("once", "each")
ANCHORS = ("decoded", "own", "merged")


class FusionError(ValueError):
    """A fusion that cannot be made (unknown rule, a task without what the rule needs, bad weights)."""


@dataclass
class FusionSpec:
    """How the tasks' latent points are fused.

    Args:
        rule: ``mean``, ``ties``, ``pcgrad`` or ``optimize`` (see the module's docstring).
        decode: ``once`` (the fused point decoded into one rank-r LoRA) or ``each`` (each task's
            adjusted point decoded, the updates summed: rank T·r; see the module's docstring).
        anchor: ``decode: each``: ``decoded`` (each task's LoRA is the decoded one), ``own`` (its own
            LoRA plus the change the latent adjustment makes to the decoded one; zoo tasks only) or
            ``merged`` (the own LoRAs' merge by ``anchor_merge`` plus the changes the adjustment makes to
            the decoded updates; zoo tasks only).
        anchor_merge: ``anchor: merged``: the merge's settings (``MergeSpec``: a ``method`` of this
            package's merges, its knobs; each task weighs 1, as in the fusion bench's merges).
        latent: ``prior`` (z_t = 0: fusing one task is generating it) or ``posterior`` (z_t from the
            task's own LoRA; zoo tasks only).
        weights: per task, in the order given (None: equal); normalised to sum to 1.
        scale: factor on the fused (z, c) before decoding (``decode: each``: on the summed update).
        density: ``ties``: share of each task's coordinates kept.
        steps: ``optimize``: Adam steps on (z, c) (``decode: each``: on every task's point and weight).
        lr: ``optimize``: Adam learning rate.
        demo_tokens: ``optimize``: tokens of each task's demonstrations fitted on (from the start).
        holdout_tokens: ``optimize``: tokens of each task's demonstrations after the fitted ones on which
            the returned step is chosen (0: chosen on the fitted tokens).
        block_size: ``optimize``: tokens per block.
        focus: ``optimize``: 0 minimises the weighted mean of the tasks' lags (``DemoLoss``); > 0 their
            smooth maximum at this temperature (the lagging task weighs more).
        guard: ``optimize``: None, or the most any task's lag may rise above its lag at the start for a step
            to be returned, measured where the step is chosen (the held-out demonstrations with
            ``holdout_tokens``): 0 returns only steps that leave no task worse than the start there.
        precision: ``optimize``: ``auto``, ``bf16`` or ``fp32`` for the base model's forward.
        seed: seed of anything random.
    """

    rule: str = "mean"
    decode: str = "once"
    anchor: str = "decoded"
    anchor_merge: dict = field(default_factory=lambda: {"method": "tsv_m"})
    latent: str = "prior"
    weights: list[float] | None = None
    scale: float = 1.0
    density: float = 0.5
    steps: int = 20
    lr: float = 0.01
    demo_tokens: int = 256
    holdout_tokens: int = 0
    block_size: int = 128
    focus: float = 0.0
    guard: float | None = None
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise FusionError(f"fusion.rule must be one of {RULES}, got {self.rule!r}")
        if self.decode not in DECODES:
            raise FusionError(f"fusion.decode must be one of {DECODES}, got {self.decode!r}")
        if self.decode == "each" and self.rule == "ties":
            raise FusionError("fusion.decode each keeps one point per task; latent TIES merges them into one "
                              "(use decode once, or rule mean, pcgrad or optimize)")
        if self.anchor not in ANCHORS:
            raise FusionError(f"fusion.anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.anchor != "decoded" and self.decode != "each":
            raise FusionError(f"fusion.anchor {self.anchor} moves the tasks' own LoRAs: it needs decode each")
        if self.anchor == "merged":
            self.merge_spec()
        if self.latent not in LATENTS:
            raise FusionError(f"fusion.latent must be one of {LATENTS}, got {self.latent!r}")
        if not 0 < self.density <= 1 or self.steps < 0 or self.focus < 0 or self.demo_tokens < 2:
            raise FusionError(f"need 0 < density <= 1, steps >= 0, focus >= 0 and demo_tokens >= 2, got "
                             f"{self.density}, {self.steps}, {self.focus}, {self.demo_tokens}")
        if self.guard is not None and not self.guard >= 0:
            raise FusionError(f"fusion.guard must be unset (off) or >= 0, got {self.guard}")
        if self.holdout_tokens != 0 and self.holdout_tokens < 2:
            raise FusionError(f"fusion.holdout_tokens must be 0 (off) or >= 2, got {self.holdout_tokens}")

    def merge_spec(self) -> MergeSpec:
        """``anchor_merge`` as a MergeSpec (one of this package's merges: PEFT's need a model)."""
        settings = dict(self.anchor_merge)
        method = settings.pop("method", "tsv_m")
        if method not in MERGERS:
            raise FusionError(f"fusion.anchor_merge method must be one of {MERGERS}, got {method!r}")
        try:
            return MergeSpec(method=method, **settings)
        except (TypeError, ValueError) as err:
            raise FusionError(f"fusion.anchor_merge: {err}") from err

    def normalized_weights(self, count: int) -> Tensor:
        """(T,) weights summing to 1 (equal when none are given)."""
        if self.weights is None:
            return torch.full((count,), 1.0 / count)
        w = torch.tensor(self.weights, dtype=torch.float32)
        if len(w) != count:
            raise FusionError(f"fusion.weights has {len(w)} values for {count} tasks")
        if (w < 0).any() or w.sum() <= 0 or not torch.isfinite(w).all():
            raise FusionError(f"fusion.weights must be non-negative and not all zero, got {self.weights}")
        return w / w.sum()


def combine(points: Tensor, weights: Tensor, rule: str, density: float = 0.5) -> Tensor:
    """(T, K) task points, (T,) weights summing to 1 -> (K,) by ``mean``, ``ties`` or ``pcgrad``."""
    if rule == "mean":
        return weights @ points
    if rule == "ties":  # PEFT's TIES (trim, elect, disjoint mean) with weights of mean 1
        with torch.no_grad():
            return ties(list(points), weights * len(points), density)
    if rule == "pcgrad":
        return weights @ pcgrad(points)
    raise FusionError(f"combine has no rule {rule!r} (optimize starts from mean)")


def pcgrad(points: Tensor) -> Tensor:
    """(T, K) -> (T, K): each point loses its component along every other point it points against."""
    projected = points.clone()
    for i in range(len(points)):
        for j in range(len(points)):
            dot = projected[i] @ points[j]
            if j != i and dot < 0:
                projected[i] -= dot / points[j].pow(2).sum().clamp_min(1e-20) * points[j]
    return projected


class DemoLoss:
    """Differentiable per-task losses of a flat LoRA on the tasks' demonstrations.

    The LoRA's tensors are swapped into ``model``'s adapter for the call (``torch.func.functional_call``),
    so gradients reach whatever produced them (the generator's latent point). The frozen layers below
    the adapted ones run once per block (``FrozenPrefix``), and each task's base-model loss is computed
    once, with each task's own LoRA's where it is given. ``__call__`` returns each task's *lag*: where
    its own LoRA beats the base model on the demonstrations, (NLL - own) / (base - own), the share of
    the own LoRA's gain that the adapter misses (1 - retention: 0 at the own LoRA, 1 at the base
    model), so every task's loss is on the scale the fusion is judged by; elsewhere NLL / base.

    Args:
        model: a PeftModel with the zoo's LoRA structure (its active adapter is the one swapped).
        tokenizer: the base model's tokenizer.
        layout: the zoo's flat layout.
        demos: per task, its demonstration texts.
        tokens: tokens of each task's demonstrations used.
        block_size: tokens per block.
        precision: ``bf16`` or ``fp32`` (resolved).
        own: per task, its own LoRA (flat, ``layout``) or None (a task outside the zoo).
        start: tokens of each task's demonstrations skipped first (a held-out part follows the fitted one).
    """

    def __init__(self, model: PeftModel, tokenizer, layout: FlatLayout, demos: list[list[str]], tokens: int,
                 block_size: int, precision: str, own: list[Tensor | None] | None = None, start: int = 0) -> None:
        self.model, self.layout, self.precision = model, layout, precision
        self.device = next(model.parameters()).device
        adapter = model.active_adapter
        names = {n for n, _ in model.named_parameters()}
        self.param_names = {}
        for seg in layout.segments:  # PEFT's saved key -> the live parameter (adapter name inserted)
            live = seg.name.replace(".lora_A.weight", f".lora_A.{adapter}.weight").replace(
                ".lora_B.weight", f".lora_B.{adapter}.weight")
            if live not in names:
                raise FusionError(f"the live model has no parameter {live!r} for LoRA tensor {seg.name!r}")
            self.param_names[seg.name] = "model." + live
        self.prefix = FrozenPrefix(model)
        self.blocks = [self._blocks(tokenizer, texts, start, tokens, block_size) for texts in demos]
        self.wrapper = _Loss(model, self.prefix)
        with torch.no_grad(), model.disable_adapter():
            self.base = torch.stack([self._loss(b, None) for b in self.blocks]).detach()  # (T,)
        own = own or [None] * len(self.blocks)
        with torch.no_grad():
            self.own = torch.stack([self.nll_of(b, o) if o is not None else torch.tensor(float("nan"))
                                    for b, o in zip(self.blocks, own)])  # (T,), NaN: no own LoRA
        self.judged = (self.base - self.own) > 0.01 * self.base  # tasks whose own LoRA clearly helps here (NaN: no)
        self.own = torch.where(self.judged, self.own, self.base - 1.0)  # finite everywhere, so gradients stay finite

    def _blocks(self, tokenizer, texts: list[str], start: int, tokens: int, block_size: int) -> list[Tensor]:
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][start : start + tokens]
        if len(ids) < 2:
            raise FusionError(f"a task's demonstrations have fewer than {start + 2} tokens"
                              + (f" ({start} fitted, then the held-out ones)" if start else ""))
        ids = torch.tensor(ids)
        blocks = [ids[s : s + block_size] for s in range(0, len(ids), block_size)]
        blocks = [b for b in blocks if len(b) >= 2]
        cached = []
        for b in blocks:  # (1, L) token ids, and the frozen prefix's output for them
            b = b.unsqueeze(0).to(self.device)
            split = self.prefix.verify(b)  # in full precision, as the scorer checks it
            with autocast(self.precision, self.device):
                hidden = self.prefix.hidden(b) if split else None
            cached.append((b, hidden))
        return cached

    def _loss(self, blocks: list[tuple[Tensor, Tensor | None]], params: dict[str, Tensor] | None) -> Tensor:
        total, count = 0.0, 0
        with autocast(self.precision, self.device):
            for ids, hidden in blocks:
                args = (ids, hidden)
                loss = functional_call(self.wrapper, params, args) if params else self.wrapper(*args)
                n = ids.shape[1] - 1
                total, count = total + loss.float() * n, count + n
        return total / count

    def _params(self, flat: Tensor) -> dict[str, Tensor]:
        state = self.layout.unflatten(flat)
        return {self.param_names[k]: v.to(self.device) for k, v in state.items()}

    def nll_of(self, blocks, flat: Tensor) -> Tensor:
        return self._loss(blocks, self._params(flat))

    def nll(self, flat: Tensor) -> Tensor:
        """(D,) LoRA (with grad) -> (T,) each task's NLL per token on its demonstrations."""
        params = self._params(flat)
        return torch.stack([self._loss(b, params) for b in self.blocks])

    def __call__(self, flat: Tensor) -> Tensor:
        """(D,) LoRA (with grad) -> (T,) each task's lag (see the class docstring; 1 at the base model)."""
        nll = self.nll(flat)
        lag = (nll - self.own) / (self.base - self.own)
        return torch.where(self.judged, lag, nll / self.base)


class StackedLoss:
    """``DemoLoss`` of the weighted sum of T LoRAs of the zoo's layout, run as one wider LoRA (``stacked``).

    Args:
        demo: the DemoLoss, on a live adapter of scaling 1 and rank >= T·r (its layout ``wide``).
        layout: the zoo's flat layout.
        lora: the zoo's LoRA settings (their scaling is applied once, in ``stacked``).
        wide: the live adapter's flat layout.
        anchor: a fixed LoRA state dict of scaling 1 (``merge.factorize``) whose update is added, or None.
    """

    def __init__(self, demo: DemoLoss, layout: FlatLayout, lora: LoRASpec, wide: FlatLayout,
                 anchor: dict[str, Tensor] | None = None) -> None:
        self.demo, self.layout, self.lora, self.wide, self.anchor = demo, layout, lora, wide, anchor

    def __call__(self, flats: Tensor, weights: Tensor) -> Tensor:
        """(T', D) LoRAs and (T',) weights (with grad) -> (T,) each task's lag on its demonstrations."""
        return self.demo(stacked(list(flats), self.layout, self.lora, weights, self.wide, self.anchor))


class _Loss(nn.Module):
    """``model``'s causal LM loss on a block, from the cached frozen prefix when there is one."""

    def __init__(self, model: nn.Module, prefix: FrozenPrefix) -> None:
        super().__init__()
        self.model = model
        self._prefix = prefix

    def forward(self, ids: Tensor, hidden: Tensor | None) -> Tensor:
        if hidden is not None:
            return self._prefix.loss(hidden, ids)
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss


def objective(lag: Tensor, weights: Tensor, focus: float) -> Tensor:
    """(T,) per-task losses, (T,) weights summing to 1 -> the weighted mean (``focus`` 0) or the
    smooth maximum focus * log Σ w exp(lag / focus), which tends to the worst task as focus -> 0."""
    if focus == 0:
        return weights @ lag
    return focus * torch.logsumexp(lag / focus + weights.log(), 0)


def descend(params: list[Tensor], fit: Callable[[], Tensor], check: Callable[[], Tensor] | None, steps: int,
            lr: float, reduce: Callable[[Tensor], Tensor] = torch.sum,
            guard: float | None = None) -> tuple[list[Tensor], dict]:
    """``steps`` Adam steps on ``params`` minimising ``reduce(fit())`` -> their values at the step where
    ``reduce(check())`` (``fit()`` when ``check`` is None) was lowest, the start included, and what was done.

    ``fit`` and ``check`` return the (T,) per-task losses. With ``guard`` set, a step is eligible only if
    no task's ``check`` loss is above its loss at the start by more than ``guard``: the returned step
    never trades one task for the others on the text it is chosen on (the start is always eligible).
    """
    opt = torch.optim.Adam(params, lr=lr)
    best: dict = {}
    refused = 0
    for step in range(steps + 1):
        lags = fit()
        value = reduce(lags)
        with torch.no_grad():
            judged_lags = lags.detach() if check is None else check().detach()
            judged = reduce(judged_lags).item()
        if step == 0:
            start = {"demo_objective_start": value.item()} | ({} if check is None else {"holdout_objective_start": judged})
            start_lags = judged_lags
        eligible = guard is None or bool((judged_lags <= start_lags + guard).all())
        refused += not eligible
        if eligible and (not best or judged < best["judged"]):
            best = {"judged": judged, "fit": value.item(), "step": step, "lags": judged_lags,
                    "params": [p.detach().clone() for p in params]}
        if step == steps:
            break
        opt.zero_grad()
        value.backward()
        opt.step()
    info = start | {"demo_objective_best": best["fit"], "best_step": best["step"], "steps": steps}
    if check is not None:
        info["holdout_objective_best"] = best["judged"]
    if guard is not None:  # each task's loss on the text the step is chosen on, at the start and there
        info |= {"guard": guard, "steps_refused_by_guard": refused, "task_lags_start": start_lags.flatten().tolist(),
                 "task_lags_best": best["lags"].flatten().tolist()}
    return best["params"], info


class LatentFusion:
    """Fuses tasks in a trained CVAE's latent space and decodes the fused point.

    Args:
        cvae: the generator's ``CVAE`` (ICM-LoRA's; eval mode is set here).
        normalizer: the zoo's normaliser (decoded vectors are normalised LoRAs).
    """

    def __init__(self, cvae: nn.Module, normalizer) -> None:
        if not hasattr(cvae, "encode") or not hasattr(cvae, "decode") or not hasattr(cvae, "cond_dim"):
            raise FusionError("latent fusion needs ICM-LoRA's CVAE (model.generator: icm_lora)")
        self.cvae, self.normalizer = cvae.eval(), normalizer

    def points(self, conditions: Tensor, own: Tensor | None, latent: str) -> Tensor:
        """(T, C) scaled conditions and, for ``posterior``, (T, D) own LoRAs -> (T, latent + C) points."""
        conditions = conditions.float()
        if latent == "prior":
            z = torch.zeros(len(conditions), self.cvae.latent_dim)
        elif own is None:
            raise FusionError("fusion.latent posterior needs every task's own LoRA: zoo tasks only")
        else:
            with torch.no_grad():
                z, _ = self.cvae.encode(self.normalizer.normalize(own.float()), conditions)
        return torch.cat([z, conditions], dim=1)

    def decode(self, point: Tensor) -> Tensor:
        """(latent + C,) -> (D,) un-normalised flat LoRA (differentiable)."""
        return self.decode_all(point[None])[0]

    def decode_all(self, points: Tensor) -> Tensor:
        """(T, latent + C) -> (T, D) un-normalised flat LoRAs (differentiable)."""
        z, c = points[:, : self.cvae.latent_dim], points[:, self.cvae.latent_dim :]
        return self.normalizer.denormalize(self.cvae.decode(z, c))

    def fuse_each(self, points: Tensor, spec: FusionSpec, loss: StackedLoss | None = None,
                  own: Tensor | None = None, check: StackedLoss | None = None) -> tuple[Tensor, Tensor, dict]:
        """``decode: each``: (T, K) points (and, for ``anchor: own``, the (T, D) own LoRAs) -> (T', D) LoRAs
        and (T',) weights (``scale`` included) whose weighted sum of updates is the fused update (``anchor:
        merged``: less the merge; T' = 2T, the decoded LoRAs at the adjusted points, then at the start
        points, weighted -w), and what was done (for ``optimize``: the demonstration objective at the start
        and at the chosen step; ``check``: the held-out demonstrations' loss the step is chosen on)."""
        weights = spec.normalized_weights(len(points)) * spec.scale
        start = pcgrad(points) if spec.rule == "pcgrad" else points
        info: dict = {"decode": "each", "anchor": spec.anchor}
        with torch.no_grad():  # (T, D) the decoded LoRAs at the tasks' points: what an anchor is moved from
            at_points = self.decode_all(points) if spec.anchor != "decoded" else None
        if spec.anchor == "own":
            if own is None:
                raise FusionError("fusion.anchor own needs every task's own LoRA: zoo tasks only")
            offset = own.float() - at_points  # (T, D): own LoRA - decoded, at the tasks' points
        else:
            offset = torch.zeros(())

        def loras(point: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
            decoded = self.decode_all(point) + offset
            if spec.anchor == "merged":  # the change the adjustment makes: ΔW(adjusted) - ΔW(start)
                return torch.cat([decoded, at_points]), torch.cat([w, -w])
            return decoded, w

        if spec.rule != "optimize" or spec.steps == 0:
            info["weights"] = weights.tolist()
            with torch.no_grad():
                return *loras(start, weights), info
        if loss is None:
            raise FusionError("fusion.rule optimize needs the tasks' demonstrations")
        base_weights = spec.normalized_weights(len(points))
        point = start.clone().requires_grad_(True)
        log_gain = torch.zeros(len(points), requires_grad=True)  # each task's weight, relative to its start

        def lags(on: StackedLoss) -> Callable[[], Tensor]:
            return lambda: on(*loras(point, weights * log_gain.exp()))

        (best, gain), found = descend([point, log_gain], lags(loss), None if check is None else lags(check),
                                      spec.steps, spec.lr, lambda lag: objective(lag, base_weights, spec.focus),
                                      spec.guard)
        fitted = weights * gain.exp()
        info |= {"weights": fitted.tolist()} | found
        with torch.no_grad():
            return *loras(best, fitted), info

    def fuse(self, points: Tensor, spec: FusionSpec, loss: DemoLoss | None = None,
             check: DemoLoss | None = None) -> tuple[Tensor, dict]:
        """(T, K) points -> (D,) fused LoRA and what was done (the weights; for ``optimize``, the demonstration
        objective at the start and at the chosen step; ``check``: the held-out demonstrations' loss the
        step is chosen on)."""
        weights = spec.normalized_weights(len(points))
        start = combine(points, weights, "mean" if spec.rule == "optimize" else spec.rule, spec.density) * spec.scale
        info: dict = {"weights": weights.tolist()}
        if spec.rule != "optimize" or spec.steps == 0:
            with torch.no_grad():
                return self.decode(start), info
        if loss is None:
            raise FusionError("fusion.rule optimize needs the tasks' demonstrations")
        point = start.clone().requires_grad_(True)

        def lags(on: DemoLoss) -> Callable[[], Tensor]:
            return lambda: on(self.decode(point))

        (best,), found = descend([point], lags(loss), None if check is None else lags(check), spec.steps, spec.lr,
                                 lambda lag: objective(lag, weights, spec.focus), spec.guard)
        with torch.no_grad():
            return self.decode(best), info | found
