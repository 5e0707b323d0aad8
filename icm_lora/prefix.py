"""The frozen layers below the first adapted one, run once per block of tokens and reused.

A LoRA on a decoder's top layers leaves every layer below them frozen, so what those layers output
for a block of tokens never changes while the adapter trains or is swapped for another. On a
small model the frozen prefix is half of a training step (SmolLM2-135M with the top 4 of 30 layers
adapted, fp32 on an AVX2 CPU: 0.88 s of 1.86 s). ``FrozenPrefix`` computes it once per block (no
grad) and runs only the adapted layers and the LM head from it; the result is the same
computation as the full forward, in the same order.

Training from the cached states also takes the LM head and its cross-entropy in one pass
(``head_loss``) when the head is a frozen, bias-free projection the model applies as is.

The split hands the cached states to the model as ``inputs_embeds`` with the lower layers taken
out of its layer list, which is exact for decoders that feed ``inputs_embeds`` straight into their
first layer (Llama, Qwen2, Mistral, ...). ``verify`` compares the split forward with the full one on
real tokens; where they differ (a model that scales ``inputs_embeds`` or adds position embeddings
to them), callers use the full forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from icm_lora.head_loss import causal_lm_loss


class _Stop(Exception):
    """Raised by the hook on the first adapted layer: the frozen prefix has been computed."""


class FrozenPrefix:
    """Split ``model`` at its lowest adapted decoder layer.

    Args:
        model: a causal LM (a ``PeftModel`` or a transformers model) whose trainable or LoRA modules
            all sit in decoder layers; ``start`` is the lowest such layer.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder, self.attr = _decoder(model)
        self.layers: nn.ModuleList = getattr(self.decoder, self.attr)
        self.start = _first_adapted_layer(self.decoder, self.attr, self.layers)
        self._verified: bool | None = None
        self._fused_head = False  # set by verify: the fused head loss equals the model's own loss

    @property
    def useful(self) -> bool:
        """Whether there is a frozen prefix to skip and the split forward matches the full one."""
        return self.start > 0 and self._verified is not False

    @torch.no_grad()
    def hidden(self, ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, H) the input of layer ``start``, without grad."""
        captured: list[Tensor] = []

        def stop(module, args, kwargs):
            captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            raise _Stop

        handle = self.layers[self.start].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.decoder(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0].detach()

    def forward(self, hidden: Tensor, labels: Tensor | None = None):
        """(B, L, H) cached prefix output -> the model's output (``logits``, ``loss`` when ``labels``)."""
        with self._upper_layers_only():
            return self.model(inputs_embeds=hidden, labels=labels, use_cache=False)

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """(B, L, H) cached prefix output, (B, L) labels -> the model's causal LM loss.

        After ``verify`` has found the fused head exact, the head and its softmax run in one pass
        (``head_loss``); otherwise this is the model's own loss."""
        if not self._fused_head:
            return self.forward(hidden, labels=labels).loss
        with self._upper_layers_only():
            final = self.decoder(inputs_embeds=hidden, use_cache=False)[0]  # (B, L, H) after the last norm
        return causal_lm_loss(final, self.model.get_output_embeddings().weight, labels)

    @torch.no_grad()
    def verify(self, ids: Tensor) -> bool:
        """Compare split and full logits and losses on ``ids`` (B, L) once; later calls return the first answer."""
        if self._verified is None and self.start > 0:
            was_training = self.model.training
            self.model.eval()
            full = self.model(input_ids=ids, labels=ids, use_cache=False)
            hidden = self.hidden(ids)
            split = self.forward(hidden).logits.float()
            logits = full.logits.float()
            self._verified = bool(torch.allclose(logits, split, rtol=1e-4, atol=1e-4 * logits.abs().max().item()))
            self._fused_head = self._verified and self._head_is_plain() and bool(
                torch.isclose(self._fused_loss(hidden, ids), full.loss.float(), rtol=1e-4))
            self.model.train(was_training)
        return self.useful

    def _head_is_plain(self) -> bool:
        head = self.model.get_output_embeddings()
        return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad

    def _fused_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        self._fused_head = True
        try:
            return self.loss(hidden, labels).float()
        finally:
            self._fused_head = False

    @contextmanager
    def _upper_layers_only(self) -> Iterator[None]:
        setattr(self.decoder, self.attr, self.layers[self.start :])
        try:
            yield
        finally:
            setattr(self.decoder, self.attr, self.layers)


def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder layers, and the attribute name of its layer list."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == config.num_hidden_layers:
                return module, name
    raise ValueError(f"{type(model).__name__}: no list of {config.num_hidden_layers} decoder layers found")


def _first_adapted_layer(decoder: nn.Module, attr: str, layers: nn.ModuleList) -> int:
    """Lowest layer with a LoRA module or a trainable parameter; 0 (nothing to skip) when none has one or
    when a module outside the layers (the embeddings, say) has one."""

    def adapted(module: nn.Module) -> bool:
        return any(isinstance(m, BaseTunerLayer) for m in module.modules()) or any(
            p.requires_grad for p in module.parameters())

    if any(adapted(child) for name, child in decoder.named_children() if name != attr):
        return 0
    return next((i for i, layer in enumerate(layers) if adapted(layer)), 0)
