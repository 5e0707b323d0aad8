"""Data-free LoRA merges on ΔW = s·B·A, and PEFT's add_weighted_adapter as it is installed."""

import math

import pytest
import torch

from icm_lora import base
from icm_lora.merge import (
    MERGERS,
    MergeError,
    MergeSpec,
    check_same_modules,
    delta_weights,
    factorize,
    merge,
    merge_module,
    peft_merge,
    skeleton,
)
from icm_lora.zoo import LoRASpec, lora_layout

IDENTITY = {"density": 1.0, "keep": 1.0, "common": 1.0, "isotropy": 0.0}  # knobs at which every rule is the identity


def adapters(cache_dir, rslora: bool = False, count: int = 3, seed: int = 0):
    spec = LoRASpec(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=rslora)
    layout = lora_layout(base.load_config(base.TINY_LLAMA, cache_dir), spec)
    g = torch.Generator().manual_seed(seed)
    return spec, layout, [torch.randn(layout.dim, generator=g) for _ in range(count)]


def max_error(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


@pytest.mark.parametrize("method", MERGERS)
def test_merging_one_adapter_with_weight_one_gives_back_its_delta_w(cache_dir, method):
    spec, layout, flats = adapters(cache_dir, count=1)
    delta = delta_weights(flats[0], layout, spec)
    merged = merge([delta], torch.tensor([1.0]), MergeSpec(method, **IDENTITY))
    assert max_error(merged, delta) < 1e-10


def test_delta_w_applies_the_scaling_once_with_and_without_rslora(cache_dir):
    for rslora, scale in ((False, 4 / 2), (True, 4 / math.sqrt(2))):
        spec, layout, flats = adapters(cache_dir, rslora=rslora, count=1)
        state = layout.unflatten(flats[0])
        name = next(k for k in state if k.endswith("q_proj.lora_A.weight")).removesuffix(".lora_A.weight")
        expected = scale * state[name + ".lora_B.weight"].double() @ state[name + ".lora_A.weight"].double()
        assert torch.allclose(delta_weights(flats[0], layout, spec)[name], expected)


def test_peft_cat_is_exactly_the_weighted_sum_of_delta_w(cache_dir):
    spec, layout, flats = adapters(cache_dir)
    weights = torch.tensor([1.0, 0.5, -2.0])
    deltas = [delta_weights(f, layout, spec) for f in flats]
    summed = {m: sum(w * d[m] for w, d in zip(weights.tolist(), deltas)) for m in deltas[0]}
    model = skeleton(base.load_config(base.TINY_LLAMA, cache_dir), spec)
    assert max_error(peft_merge(model, flats, layout, spec, weights, MergeSpec("peft_cat")), summed) < 1e-5
    assert max_error(merge(deltas, weights, MergeSpec("task_arithmetic")), summed) < 1e-10
    assert set(model.peft_config) == {"default"}  # the merge's adapters are gone again


@pytest.mark.parametrize("rslora", [False, True])
def test_installed_peft_svd_merge_of_one_adapter_is_its_delta_w(cache_dir, rslora):
    """PEFT's svd path once applied the LoRA scaling twice; with rsLoRA sources its merged config
    (r = lora_alpha = new rank, rsLoRA kept) scales by sqrt(new rank) instead of 1. ``peft_merge``
    reads the merged factors with scaling 1, which is what the merge computed."""
    spec, layout, flats = adapters(cache_dir, rslora=rslora, count=1)
    model = skeleton(base.load_config(base.TINY_LLAMA, cache_dir), spec)
    delta = delta_weights(flats[0], layout, spec)
    merged = peft_merge(model, flats, layout, spec, torch.tensor([1.0]), MergeSpec("peft_svd"))
    assert max_error(merged, delta) < 1e-5  # no double scaling in the svd path

    model.add_adapter("one", spec.peft_config())
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(model, layout.unflatten(flats[0]), adapter_name="one")
    model.add_weighted_adapter(["one"], [1.0], "merged", combination_type="svd", svd_rank=spec.r)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    # What PEFT itself would apply to the merged adapter: overscaled by sqrt(r) with rsLoRA (the known bug).
    assert layer.scaling["merged"] == pytest.approx(math.sqrt(spec.r) if rslora else 1.0)


def test_ties_elects_signs_and_averages_the_agreeing_entries():
    a = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    b = torch.tensor([[1.0, 2.0], [-4.0, 2.0]])
    merged = merge_module([a, b], torch.tensor([1.0, 1.0]), MergeSpec("ties", density=1.0))
    # entry (0, 1): the sum 1 > 0 elects +, only b agrees -> 2; entry (1, 0): sum -3.5 elects -, only b -> -4
    assert merged.tolist() == [[2.0, 2.0], [-4.0, 2.0]]


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    e = torch.eye(6, dtype=torch.float64)
    a = 3.0 * e[:, :1] @ e[:1] + 1.0 * e[:, 1:2] @ e[1:2]
    b = 2.0 * e[:, 2:3] @ e[3:4]
    merged = merge_module([a, b], torch.tensor([1.0, 1.0]), MergeSpec("tsv_m", keep=1.0))
    assert torch.allclose(merged, a + b)
    half = merge_module([a, b], torch.tensor([1.0, 1.0]), MergeSpec("tsv_m"))  # keep 1 / T: a's top direction only
    assert torch.allclose(half, 3.0 * e[:, :1] @ e[:1] + b)


def test_iso_cts_flattens_the_spectrum_of_the_summed_update():
    torch.manual_seed(0)
    a, b = torch.randn(8, 2).double() @ torch.randn(2, 6).double(), torch.randn(8, 2).double() @ torch.randn(2, 6).double()
    merged = merge_module([a, b], torch.tensor([1.0, 1.0]), MergeSpec("iso_cts", common=0.5))
    singular = torch.linalg.svdvals(merged)
    kept = singular[singular > 1e-8]
    assert len(kept) == 4 and torch.allclose(kept, kept.mean().expand_as(kept))


def test_knots_with_full_density_and_one_task_signs_is_the_task_sum_in_its_basis():
    torch.manual_seed(0)
    a = torch.randn(5, 4).double()
    merged = merge_module([a, 2 * a], torch.tensor([1.0, 1.0]), MergeSpec("knots", density=1.0))
    # Same direction, same signs: TIES averages the two V_i, so the result is the mean update 1.5 a.
    assert torch.allclose(merged, 1.5 * a)


def test_factorize_round_trips_and_pads_to_one_rank():
    torch.manual_seed(0)
    deltas = {"m1": torch.randn(6, 3).double() @ torch.randn(3, 5).double(),
              "m2": torch.randn(4, 1).double() @ torch.randn(1, 5).double()}
    state, rank = factorize(deltas)
    assert rank == 3 and state["m2.lora_A.weight"].shape == (3, 5) and state["m2.lora_B.weight"].shape == (4, 3)
    for m, d in deltas.items():
        assert torch.allclose(state[m + ".lora_B.weight"].double() @ state[m + ".lora_A.weight"].double(), d, atol=1e-5)


def test_adapters_of_other_modules_or_shapes_are_refused(cache_dir):
    spec, layout, flats = adapters(cache_dir, count=1)
    delta = delta_weights(flats[0], layout, spec)
    other = {k: v[:, :-1] for k, v in delta.items()}
    with pytest.raises(MergeError, match="python adapts other modules or shapes than legal"):
        check_same_modules([delta, other], ["legal", "python"])
    with pytest.raises(MergeError, match="merge method must be one of"):
        MergeSpec("average_everything")
