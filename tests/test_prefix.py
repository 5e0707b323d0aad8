"""The frozen prefix: the split forward is the full forward, and training or scoring on it changes nothing."""

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import BUDGET, LORA, LORA_TOP, TRAINING
from icm_lora import base
from icm_lora.evaluate import LiveAdapter, TextScorer
from icm_lora.prefix import FrozenPrefix
from icm_lora.tasks import split_task
from icm_lora.zoo import lora_layout
from icm_lora.zoo_build import train_lora


def peft_tiny(cache_dir, lora=LORA_TOP):
    model, tokenizer = base.load(base.TINY_LLAMA, cache_dir)
    torch.manual_seed(0)
    return get_peft_model(model, lora.peft_config()), tokenizer


def test_split_forward_is_the_full_forward(cache_dir):
    model, _ = peft_tiny(cache_dir)
    layout = lora_layout(model.config, LORA_TOP)
    set_peft_model_state_dict(model, layout.unflatten(torch.randn(layout.dim) * 0.3))  # an active adapter
    prefix = FrozenPrefix(model)
    assert prefix.start == 1
    ids = torch.randint(0, 200, (3, 20))
    assert prefix.verify(ids)
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids)
        split = prefix.forward(prefix.hidden(ids), labels=ids)
    assert torch.allclose(full.logits, split.logits, atol=1e-6) and torch.isclose(full.loss, split.loss)
    assert len(prefix.layers) == 2  # the layer list is restored after each split forward


def test_no_prefix_when_the_bottom_layer_or_nothing_is_adapted(cache_dir):
    model, _ = peft_tiny(cache_dir, LORA)  # all layers adapted
    assert FrozenPrefix(model).start == 0 and not FrozenPrefix(model).useful
    bare, _ = base.load(base.TINY_LLAMA, cache_dir)
    assert FrozenPrefix(bare).start == 0


def test_training_on_the_cached_prefix_gives_the_same_lora(cache_dir, task_specs):
    task = split_task(task_specs[0], BUDGET)
    runs = []
    for cached in (False, True):
        model, tokenizer = peft_tiny(cache_dir)
        layout = lora_layout(model.config, LORA_TOP)
        torch.manual_seed(1)
        prefix = FrozenPrefix(model) if cached else None
        ckpts, skipped = train_lora(model, tokenizer, task, TRAINING, layout, "fp32", prefix)
        runs.append(ckpts)
        assert skipped == (1 if cached else 0)
        assert not cached or prefix._fused_head  # the cached run also took the fused head loss
    plain, cached = runs
    assert not torch.equal(plain[0], plain[-1])  # it trained
    assert torch.allclose(plain, cached, rtol=1e-5, atol=1e-6)


def test_scores_with_the_cached_prefix_equal_full_forward_scores(cache_dir):
    model, tokenizer = base.load(base.TINY_LLAMA, cache_dir)
    layout = lora_layout(model.config, LORA_TOP)
    live = LiveAdapter(model, LORA_TOP.peft_config(), layout)
    text = "the quick brown fox jumps over the lazy dog. " * 12
    reuse = TextScorer(live.model, tokenizer, block_size=32, batch_size=2, precision="fp32")
    plain = TextScorer(live.model, tokenizer, block_size=32, batch_size=2, precision="fp32", reuse_prefix=False)
    for flat in (None, torch.randn(layout.dim) * 0.3, torch.randn(layout.dim) * 0.3):
        with live.use(flat):
            a, b = reuse.score(text), plain.score(text)
        assert a.tokens == b.tokens and a.nll == pytest.approx(b.nll, rel=1e-6)
    assert reuse.prefix.useful and len(reuse._states) == 1  # one prefix pass served all three adapters


def test_a_model_whose_split_differs_falls_back_to_the_full_forward(tiny_base):
    # GPT-2 adds position embeddings to inputs_embeds, so the cached split would be wrong: verify says so.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    torch.manual_seed(0)
    model = get_peft_model(GPT2LMHeadModel(config).eval(), LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h",
        fan_in_fan_out=True))
    prefix = FrozenPrefix(model)
    ids = torch.randint(0, 300, (2, 16))
    assert prefix.start == 1 and not prefix.verify(ids) and not prefix.useful
    tokenizer = tiny_base[1]  # byte-level, 258 ids: fits GPT-2's 300
    text = "the quick brown fox jumps over the lazy dog. " * 3
    reuse = TextScorer(model, tokenizer, block_size=16, precision="fp32")
    plain = TextScorer(model, tokenizer, block_size=16, precision="fp32", reuse_prefix=False)
    assert reuse.score(text).nll == pytest.approx(plain.score(text).nll, rel=1e-6)
