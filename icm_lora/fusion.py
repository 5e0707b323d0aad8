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
only thing the generator adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.func import functional_call

from icm_lora.evaluate import autocast
from icm_lora.flat import FlatLayout
from icm_lora.merge import stacked, ties
from icm_lora.prefix import FrozenPrefix
from icm_lora.zoo import LoRASpec

RULES = ("mean", "ties", "pcgrad", "optimize")
LATENTS = ("prior", "posterior")
DECODES = ("once", "each")
ANCHORS = ("decoded", "own")


class FusionError(ValueError):
    """A fusion that cannot be made (unknown rule, a task without what the rule needs, bad weights)."""


@dataclass
class FusionSpec:
    """How the tasks' latent points are fused.

    Args:
        rule: ``mean``, ``ties``, ``pcgrad`` or ``optimize`` (see the module's docstring).
        decode: ``once`` (the fused point decoded into one rank-r LoRA) or ``each`` (each task's
            adjusted point decoded, the updates summed: rank T·r; see the module's docstring).
        anchor: ``decode: each``: ``decoded`` (each task's LoRA is the decoded one) or ``own`` (its own
            LoRA plus the change the latent adjustment makes to the decoded one; zoo tasks only).
        latent: ``prior`` (z_t = 0: fusing one task is generating it) or ``posterior`` (z_t from the
            task's own LoRA; zoo tasks only).
        weights: per task, in the order given (None: equal); normalised to sum to 1.
        scale: factor on the fused (z, c) before decoding (``decode: each``: on the summed update).
        density: ``ties``: share of each task's coordinates kept.
        steps: ``optimize``: Adam steps on (z, c) (``decode: each``: on every task's point and weight).
        lr: ``optimize``: Adam learning rate.
        demo_tokens: ``optimize``: tokens of each task's demonstrations used (from the start).
        block_size: ``optimize``: tokens per block.
        focus: ``optimize``: 0 minimises the weighted mean of the tasks' lags (``DemoLoss``); > 0 their
            smooth maximum at this temperature (the lagging task weighs more).
        precision: ``optimize``: ``auto``, ``bf16`` or ``fp32`` for the base model's forward.
        seed: seed of anything random.
    """

    rule: str = "mean"
    decode: str = "once"
    anchor: str = "decoded"
    latent: str = "prior"
    weights: list[float] | None = None
    scale: float = 1.0
    density: float = 0.5
    steps: int = 20
    lr: float = 0.01
    demo_tokens: int = 256
    block_size: int = 128
    focus: float = 0.0
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
        if self.anchor == "own" and self.decode != "each":
            raise FusionError("fusion.anchor own moves each task's own LoRA: it needs decode each")
        if self.latent not in LATENTS:
            raise FusionError(f"fusion.latent must be one of {LATENTS}, got {self.latent!r}")
        if not 0 < self.density <= 1 or self.steps < 0 or self.focus < 0 or self.demo_tokens < 2:
            raise FusionError(f"need 0 < density <= 1, steps >= 0, focus >= 0 and demo_tokens >= 2, got "
                             f"{self.density}, {self.steps}, {self.focus}, {self.demo_tokens}")

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
        own: per task, its own LoRA (flat, zoo layout) or None (a task outside the zoo).
    """

    def __init__(self, model: PeftModel, tokenizer, layout: FlatLayout, demos: list[list[str]], tokens: int,
                 block_size: int, precision: str, own: list[Tensor | None] | None = None) -> None:
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
        self.blocks = [self._blocks(tokenizer, texts, tokens, block_size) for texts in demos]
        self.wrapper = _Loss(model, self.prefix)
        with torch.no_grad(), model.disable_adapter():
            self.base = torch.stack([self._loss(b, None) for b in self.blocks]).detach()  # (T,)
        own = own or [None] * len(self.blocks)
        with torch.no_grad():
            self.own = torch.stack([self.nll_of(b, o) if o is not None else torch.tensor(float("nan"))
                                    for b, o in zip(self.blocks, own)])  # (T,), NaN: no own LoRA
        self.judged = (self.base - self.own) > 0.01 * self.base  # tasks whose own LoRA clearly helps here (NaN: no)
        self.own = torch.where(self.judged, self.own, self.base - 1.0)  # finite everywhere, so gradients stay finite

    def _blocks(self, tokenizer, texts: list[str], tokens: int, block_size: int) -> list[Tensor]:
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) < 2:
            raise FusionError("a task's demonstrations have fewer than 2 tokens")
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
    """

    def __init__(self, demo: DemoLoss, layout: FlatLayout, lora: LoRASpec, wide: FlatLayout) -> None:
        self.demo, self.layout, self.lora, self.wide = demo, layout, lora, wide

    def __call__(self, flats: Tensor, weights: Tensor) -> Tensor:
        """(T, D) LoRAs and (T,) weights (with grad) -> (T,) each task's lag on its demonstrations."""
        return self.demo(stacked(list(flats), self.layout, self.lora, weights, self.wide))


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
                  own: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
        """``decode: each``: (T, K) points (and, for ``anchor: own``, the (T, D) own LoRAs) -> (T, D) the
        tasks' LoRAs, (T,) the weights their updates are summed with (``scale`` included), and what was
        done (for ``optimize``: the demonstration objective at the start and at the best step)."""
        weights = spec.normalized_weights(len(points))
        start = pcgrad(points) if spec.rule == "pcgrad" else points
        info: dict = {"decode": "each", "anchor": spec.anchor}
        if spec.anchor == "own":
            if own is None:
                raise FusionError("fusion.anchor own needs every task's own LoRA: zoo tasks only")
            with torch.no_grad():
                offset = own.float() - self.decode_all(points)  # (T, D): own LoRA - decoded, at the tasks' points
        else:
            offset = torch.zeros(())
        if spec.rule != "optimize" or spec.steps == 0:
            info["weights"] = (weights * spec.scale).tolist()
            with torch.no_grad():
                return self.decode_all(start) + offset, weights * spec.scale, info
        if loss is None:
            raise FusionError("fusion.rule optimize needs the tasks' demonstrations")
        point = start.clone().requires_grad_(True)
        log_gain = torch.zeros(len(points), requires_grad=True)  # each task's weight, relative to its start
        opt = torch.optim.Adam([point, log_gain], lr=spec.lr)
        best, history = (float("inf"), start.clone(), torch.zeros(len(points))), []
        for _ in range(spec.steps + 1):
            lag = loss(self.decode_all(point) + offset, weights * spec.scale * log_gain.exp())  # (T,)
            value = objective(lag, weights, spec.focus)
            history.append(value.item())
            if value.item() < best[0]:
                best = (value.item(), point.detach().clone(), log_gain.detach().clone())
            if len(history) > spec.steps:
                break
            opt.zero_grad()
            value.backward()
            opt.step()
        fitted = weights * spec.scale * best[2].exp()
        info |= {"weights": fitted.tolist(), "demo_objective_start": history[0], "demo_objective_best": best[0],
                 "steps": spec.steps}
        with torch.no_grad():
            return self.decode_all(best[1]) + offset, fitted, info

    def fuse(self, points: Tensor, spec: FusionSpec, loss: DemoLoss | None = None) -> tuple[Tensor, dict]:
        """(T, K) points -> (D,) fused LoRA and what was done (the weights; for ``optimize``, the demonstration
        objective at the start and at the best step)."""
        weights = spec.normalized_weights(len(points))
        start = combine(points, weights, "mean" if spec.rule == "optimize" else spec.rule, spec.density) * spec.scale
        info: dict = {"weights": weights.tolist()}
        if spec.rule != "optimize" or spec.steps == 0:
            with torch.no_grad():
                return self.decode(start), info
        if loss is None:
            raise FusionError("fusion.rule optimize needs the tasks' demonstrations")
        point = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([point], lr=spec.lr)
        best, history = (float("inf"), start.clone()), []
        for _ in range(spec.steps + 1):
            lag = loss(self.decode(point))  # (T,)
            value = objective(lag, weights, spec.focus)
            history.append(value.item())
            if value.item() < best[0]:
                best = (value.item(), point.detach().clone())
            if len(history) > spec.steps:
                break
            opt.zero_grad()
            value.backward()
            opt.step()
        info |= {"demo_objective_start": history[0], "demo_objective_best": best[0], "steps": spec.steps}
        with torch.no_grad():
            return self.decode(best[1]), info
