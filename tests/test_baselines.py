"""Each no-generator baseline on a case worked out by hand."""

import math

import pytest
import torch

from icm_lora import baselines

EXPERTS = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])  # (E=3, D=2)


def test_soup_is_the_uniform_mean():
    assert torch.equal(baselines.soup(EXPERTS), torch.tensor([5 / 3, 2.0]))


def test_nearest_takes_the_most_similar_expert():
    sims = baselines.similarities(torch.tensor([0.1, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    flat, index = baselines.nearest(EXPERTS, sims)
    assert index == 1 and torch.equal(flat, EXPERTS[1])


def test_top_k_weights_are_a_softmax_over_the_k_nearest():
    sims = torch.tensor([0.9, 0.1, 0.5])
    w = baselines.top_k_weights(sims, k=2, temperature=0.2)
    e = math.exp((0.9 - 0.5) / 0.2)
    assert w[1] == 0 and w.sum().item() == pytest.approx(1.0)
    assert w[0].item() == pytest.approx(e / (1 + e)) and w[2].item() == pytest.approx(1 / (1 + e))
    assert torch.allclose(baselines.weighted_mean(EXPERTS, w), w[0] * EXPERTS[0] + w[2] * EXPERTS[2])
    assert torch.equal(baselines.top_k_weights(sims, k=1, temperature=1.0), torch.tensor([1.0, 0.0, 0.0]))
    assert baselines.top_k_weights(sims, k=10, temperature=1.0).count_nonzero() == 3  # k beyond E: all experts
    with pytest.raises(ValueError, match="k >= 1"):
        baselines.top_k_weights(sims, k=0, temperature=1.0)


def test_gap_closed():
    assert baselines.gap_closed(2.0, base_nll=3.0, oracle_nll=2.0) == 1.0
    assert baselines.gap_closed(2.5, base_nll=3.0, oracle_nll=2.0) == 0.5
    assert baselines.gap_closed(3.5, base_nll=3.0, oracle_nll=2.0) == -0.5
    assert math.isnan(baselines.gap_closed(2.5, base_nll=3.0, oracle_nll=3.1))  # no gap to close


def test_random_descriptions_are_random_and_reproducible():
    a, b = baselines.random_description(60, 0), baselines.random_description(60, 1)
    assert a == baselines.random_description(60, 0) and a != b and 0 < len(a) <= 60
