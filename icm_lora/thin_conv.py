"""A stride-1 Conv1d to one output channel, written as K shifted multiply-adds.

The CVAE decoder ends in ``Conv1d(C, 1, K)`` over the whole flat LoRA (about 94,000 positions for
the openworld zoo, with C = 4). On CPU, oneDNN's kernels for one output channel are slow, its
input gradient above all. With one output channel the convolution is only C x K scaled, shifted
copies of the input summed; its input gradient is K shifted copies of the output gradient mixed by
the (C, K) weights (one small matmul); its weight gradient is K batched dot products. Written so,
a training step of the openworld CVAE takes about a third less time on a 2-core Xeon
(``benchmarks/generator_speed.py``, figures in the README). The module is an ``nn.Conv1d`` with the
same parameters and state dict, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ToOneChannel(nn.Conv1d):
    """``nn.Conv1d(in_channels, 1, kernel_size, padding=kernel_size // 2)``: (B, C, L) -> (B, 1, L).

    Args:
        in_channels: C.
        kernel_size: K (odd, so the output keeps the input's length).
    """

    def __init__(self, in_channels: int, kernel_size: int) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, 1, kernel_size, 1, kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return _ShiftedSum.apply(x, self.weight, self.bias)


class _ShiftedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        (n, c, length), k = x.shape, weight.shape[-1]
        w = weight[0].to(x.dtype)  # (C, K)
        xp = F.pad(x, (k // 2, k // 2))  # (B, C, L + K - 1)
        out = bias.to(x.dtype).expand(n, length).clone()  # (B, L)
        for i in range(c):
            for j in range(k):
                out.addcmul_(xp[:, i, j : j + length], w[i, j])
        ctx.save_for_backward(xp, weight)
        return out.unsqueeze(1)  # (B, 1, L)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        xp, weight = ctx.saved_tensors
        k, length = weight.shape[-1], grad.shape[-1]
        g = grad[:, 0].to(xp.dtype)  # (B, L)
        gp = F.pad(g, (k // 2, k // 2))  # (B, L + K - 1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            shifted = torch.stack([gp[:, j : j + length] for j in range(k)], 1)  # (B, K, L)
            grad_x = torch.matmul(weight[0].to(xp.dtype).flip(-1), shifted)  # (C, K) @ (B, K, L) -> (B, C, L)
        grad_w = torch.stack([torch.matmul(xp[:, :, j : j + length], g.unsqueeze(-1)).sum(0)[:, 0]
                              for j in range(k)], -1)  # (C, K)
        return grad_x, grad_w.unsqueeze(0).to(weight.dtype), g.sum().reshape(1).to(weight.dtype)
