"""The fused LM-head loss is the plain head + cross-entropy, value and gradient; models it does not fit fall back."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import GraniteConfig, GraniteForCausalLM

from icm_lora import base, head_loss
from icm_lora.head_loss import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy
from icm_lora.prefix import FrozenPrefix


@pytest.mark.parametrize("chunk_values", [1 << 26, 3 * 50])  # one chunk; chunks of 3 rows that do not divide N
def test_value_and_gradient_equal_the_plain_head(monkeypatch, chunk_values):
    monkeypatch.setattr(head_loss, "CHUNK_VALUES", chunk_values)
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    labels = torch.randint(0, 50, (11,))
    labels[[2, 7]] = IGNORE_INDEX
    hidden = torch.randn(11, 8, requires_grad=True)
    plain = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX)
    (expected,) = torch.autograd.grad(plain, hidden)
    fused = linear_cross_entropy(hidden, weight, labels)
    (got,) = torch.autograd.grad(fused * 3.0, hidden)  # the upstream gradient is applied
    assert torch.isclose(fused, plain, rtol=1e-6)
    assert torch.allclose(got, 3.0 * expected, atol=1e-7)
    assert got[[2, 7]].abs().max() == 0  # ignored positions get no gradient


def test_causal_shift_matches_transformers(tiny_base):
    model, _, _ = tiny_base
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        final = model.model(input_ids=ids)[0]
        assert torch.isclose(causal_lm_loss(final, model.lm_head.weight, ids), model(input_ids=ids, labels=ids).loss,
                             rtol=1e-5)


def test_a_trainable_head_is_refused():
    with pytest.raises(ValueError, match="requires grad"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3, dtype=torch.long))


def test_frozen_prefix_uses_it_only_where_it_is_exact(cache_dir):
    model, _ = base.load(base.TINY_LLAMA, cache_dir)
    torch.manual_seed(0)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    llama = FrozenPrefix(get_peft_model(model, lora))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    assert llama.verify(ids) and llama._fused_head
    # Granite divides its logits by logits_scaling: the split is exact, the plain head is not the model's head.
    granite = GraniteForCausalLM(GraniteConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, embedding_multiplier=1.0, logits_scaling=4.0))
    prefix = FrozenPrefix(get_peft_model(granite, lora))
    ids = torch.randint(0, 300, (2, 12))
    assert prefix.verify(ids) and not prefix._fused_head
    hidden = prefix.hidden(ids)
    with torch.no_grad():
        assert torch.isclose(prefix.loss(hidden, ids), prefix.model(input_ids=ids, labels=ids).loss, rtol=1e-5)
