"""PEFT LoRA state dicts <-> one flat vector, and the zoo's normalisation statistics.

The layout (parameter names in PEFT's state-dict vocabulary, shapes and offsets) is what lets a
decoded vector become an adapter that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

NORMALIZATIONS = ("tensor", "element")


@dataclass(frozen=True)
class Segment:
    """One LoRA tensor's place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FlatLayout:
    """Flattens a LoRA state dict (keys sorted) into a (D,) vector and back, bit-exactly."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.dim = sum(s.numel for s in segments)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor]) -> FlatLayout:
        segments, offset = [], 0
        for name in sorted(state_dict):
            shape = tuple(state_dict[name].shape)
            segments.append(Segment(name, shape, offset))
            offset += math.prod(shape)
        return cls(segments)

    @classmethod
    def from_json(cls, items: list[dict]) -> FlatLayout:
        return cls([Segment(i["name"], tuple(i["shape"]), i["offset"]) for i in items])

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in self.segments]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlatLayout) and self.segments == other.segments

    def check(self, state_dict: dict[str, Tensor], source: str | Path) -> None:
        """Raise a ValueError naming ``source`` if ``state_dict`` does not fit this layout."""
        expected = {s.name: s.shape for s in self.segments}
        missing = sorted(set(expected) - set(state_dict))
        extra = sorted(set(state_dict) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{source}: LoRA tensors do not match the zoo's layout "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); "
                "is this an adapter for another base model or PEFT config?"
            )
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, "
                    f"the zoo's layout expects {shape} (another base model or rank?)"
                )

    def flatten(self, state_dict: dict[str, Tensor]) -> Tensor:
        """(D,) float32 vector of ``state_dict`` in layout order."""
        self.check(state_dict, "state dict")
        return torch.cat([state_dict[s.name].detach().reshape(-1).float().cpu() for s in self.segments])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`flatten` for a (D,) vector."""
        if flat.shape != (self.dim,):
            raise ValueError(f"flat LoRA vector has shape {tuple(flat.shape)}, layout expects ({self.dim},)")
        return {s.name: flat[s.offset : s.offset + s.numel].reshape(s.shape).clone() for s in self.segments}

    def expand(self, per_segment: Tensor) -> Tensor:
        """(S,) one value per tensor -> (D,) that value repeated over the tensor's entries."""
        sizes = torch.tensor([s.numel for s in self.segments])
        return per_segment.repeat_interleave(sizes)


class Normalizer:
    """Standardises flat LoRA vectors with statistics of the whole zoo (never of one checkpoint).

    ``tensor``: each LoRA tensor by its own mean and std over the zoo (the paper's scheme, with zoo
    statistics so a new task can be decoded). ``element``: subtract the zoo's element-wise mean
    LoRA, then divide each tensor's residual by its std, so the generator models what makes a task
    different from the average adapter.
    """

    def __init__(self, mean: Tensor, std: Tensor, scheme: str) -> None:
        self.mean, self.std, self.scheme = mean, std, scheme  # (D,), (D,)

    @classmethod
    def from_sums(cls, layout: FlatLayout, total: Tensor, total_sq: Tensor, count: int, scheme: str) -> Normalizer:
        """Build from per-element sums of w and w**2 over ``count`` zoo checkpoints (float64)."""
        if scheme not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {scheme!r}")
        if count < 2:
            raise ValueError(f"normalisation statistics need at least 2 zoo checkpoints, got {count}")
        elem_mean = total / count  # (D,)
        elem_sq = total_sq / count
        seg_mean, seg_var = [], []
        for s in layout.segments:
            sl = slice(s.offset, s.offset + s.numel)
            m = elem_mean[sl].mean()
            if scheme == "tensor":
                seg_mean.append(m)
                seg_var.append(elem_sq[sl].mean() - m**2)
            else:
                seg_var.append((elem_sq[sl] - elem_mean[sl] ** 2).mean())
        std = layout.expand(torch.stack(seg_var).clamp_min(1e-20).sqrt())
        mean = layout.expand(torch.stack(seg_mean)) if scheme == "tensor" else elem_mean
        return cls(mean.float(), std.float(), scheme)

    def normalize(self, flat: Tensor) -> Tensor:
        return (flat - self.mean.to(flat)) / self.std.to(flat)

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std.to(x) + self.mean.to(x)
