"""The LM head and its cross-entropy in one pass, with the gradient computed on the way.

A causal LM's loss projects every position onto the whole vocabulary (SmolLM2: 49,152 logits per
token), takes a log-softmax and picks the label. Done as separate ops, autograd keeps the
(N, V) logits and their softmax for the backward pass and reads them again: on a 2-core AVX2 CPU
that is a quarter of the LoRA's training step once the frozen prefix is cached. The head is
frozen when a LoRA trains, so its only gradient is the one w.r.t. the hidden states,
(softmax - onehot) @ W / n, which ``linear_cross_entropy`` computes chunk by chunk in the forward
pass and hands to backward: the same arithmetic, one exp over the logits, (chunk, V) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label transformers' losses skip
CHUNK_VALUES = 1 << 26  # logits per chunk (256 MiB in fp32): bounds memory for long batches and big vocabularies


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        # hidden (N, H), weight (V, H), labels (N,) -> mean NLL over the labels that are not IGNORE_INDEX
        keep = labels != IGNORE_INDEX
        count = keep.sum().clamp(min=1)
        target = labels.clamp(min=0)
        rows = max(1, CHUNK_VALUES // weight.shape[0])
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            logits = (hidden[part] @ weight.t()).float()  # (c, V)
            picked = logits.gather(1, target[part, None])[:, 0]  # (c,)
            top = logits.amax(-1, keepdim=True)  # (c, 1)
            exps = logits.sub_(top).exp_()  # unnormalised softmax, in place of the logits: exp taken once
            sums = exps.sum(-1)  # (c,)
            total += ((top[:, 0] + sums.log() - picked) * keep[part]).sum()  # logsumexp - picked
            if grad is not None:  # softmax @ W - W[label], the 1/sum applied to (c, H), not to (c, V)
                mixed = (exps.to(weight.dtype) @ weight).float() / sums[:, None]
                grad[part] = ((mixed - weight[target[part]].float()) * keep[part, None]).to(grad.dtype)
        if grad is not None:
            ctx.save_for_backward(grad.div_(count))
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, the head ``weight`` frozen.

    Args:
        hidden: (N, H) final hidden states (after the last norm).
        weight: (V, H) the LM head; it gets no gradient, so it must not require one.
        labels: (N,) the token each position predicts; ``IGNORE_INDEX`` positions are skipped.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy: the LM head requires grad; it computes no gradient for it")
    return _LinearCrossEntropy.apply(hidden, weight, labels)


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """(B, L, H) final hidden states, (B, L) labels -> the causal LM loss: position t predicts label t+1."""
    return linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, labels[:, 1:].reshape(-1))
