import math

import torch

from conftest import LORA
from icm_lora import base
from icm_lora.evaluate import LiveAdapter, Score, TextScorer
from icm_lora.zoo import lora_layout


def test_score_definitions():
    s = Score(nll=10.0, tokens=5, chars=20)
    assert s.ppl == math.exp(2.0) and s.bpc == 10.0 / math.log(2) / 20


def test_scorer_matches_one_forward_pass_when_the_text_fits(tiny_base):
    model, tokenizer, _ = tiny_base
    text = "the cat sat on the mat " * 3
    score = TextScorer(model, tokenizer, block_size=512, precision="fp32").score(text)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert score.tokens == ids.shape[1] - 1
    assert math.isclose(score.nll / score.tokens, loss, rel_tol=1e-5)


def test_blocks_predict_every_token_once(tiny_base):
    model, tokenizer, _ = tiny_base
    text = "abcdefghij" * 20
    small = TextScorer(model, tokenizer, block_size=16, batch_size=3, precision="fp32")
    assert small.score(text).tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


def test_live_adapter_swaps_weights_and_never_touches_the_base(cache_dir):
    model, tokenizer = base.load(base.TINY_LLAMA, cache_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = lora_layout(model.config, LORA)
    live = LiveAdapter(model, LORA.peft_config(), layout)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with live.use(None) as m:
            bare = m(input_ids=ids).logits
        with live.use(torch.randn(layout.dim) * 0.5) as m:
            adapted = m(input_ids=ids).logits
        with live.use(torch.zeros(layout.dim)) as m:
            zero = m(input_ids=ids).logits
        with live.use(None) as m:
            again = m(input_ids=ids).logits
    assert not torch.allclose(bare, adapted)
    assert torch.allclose(bare, zero, atol=1e-6) and torch.equal(bare, again)
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in live.model.state_dict().items() if "lora_" not in k}
    for k, v in before.items():
        assert torch.equal(after[k], v), k
