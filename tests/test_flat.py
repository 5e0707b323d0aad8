import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict

from icm_lora.flat import FlatLayout, Normalizer
from icm_lora.zoo import LoRASpec, lora_layout


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.lora_B.weight": torch.randn(6, 2, generator=g), "a.lora_A.weight": torch.randn(2, 5, generator=g),
            "c.lora_A.weight": torch.randn(3, 4, 2, generator=g)}


def test_flatten_unflatten_round_trips_bit_exactly():
    state = random_state()
    layout = FlatLayout.from_state_dict(state)
    flat = layout.flatten(state)
    assert flat.shape == (12 + 10 + 24,)
    back = layout.unflatten(flat)
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k])
    assert torch.equal(layout.flatten(back), flat)


def test_layout_json_round_trip_and_order_is_sorted():
    layout = FlatLayout.from_state_dict(random_state())
    assert [s.name for s in layout.segments] == sorted(random_state())
    assert FlatLayout.from_json(layout.to_json()) == layout


def test_meta_layout_matches_a_real_peft_state_dict(tiny_base):
    model, _, _ = tiny_base
    lora = LoRASpec(r=2, lora_alpha=4, layers_to_transform=[1])
    layout = lora_layout(model.config, lora)
    copy = type(model)(model.config)
    state = get_peft_model_state_dict(get_peft_model(copy, lora.peft_config()))
    assert layout == FlatLayout.from_state_dict(state)
    assert all(".layers.1." in s.name for s in layout.segments)
    assert torch.equal(layout.unflatten(layout.flatten(state))[layout.segments[0].name], state[layout.segments[0].name])


def test_check_names_the_source_on_mismatch():
    layout = FlatLayout.from_state_dict(random_state())
    wrong_shape = random_state() | {"a.lora_A.weight": torch.zeros(3, 5)}
    with pytest.raises(ValueError, match="adapter.safetensors.*a.lora_A.weight.*shape"):
        layout.check(wrong_shape, "adapter.safetensors")
    missing = {k: v for k, v in random_state().items() if k != "b.lora_B.weight"}
    with pytest.raises(ValueError, match="x.bin.*missing.*b.lora_B.weight"):
        layout.check(missing, "x.bin")
    with pytest.raises(ValueError, match="shape"):
        layout.unflatten(torch.zeros(7))


@pytest.mark.parametrize("scheme", ["tensor", "element"])
def test_normalizer_statistics_and_inverse(scheme):
    layout = FlatLayout.from_state_dict(random_state())
    data = torch.stack([layout.flatten(random_state(s)) * (s + 1) for s in range(6)]).double()  # (N, D)
    norm = Normalizer.from_sums(layout, data.sum(0), (data**2).sum(0), len(data), scheme)
    x = norm.normalize(data.float())
    assert torch.allclose(norm.denormalize(x), data.float(), atol=1e-5)
    for seg in layout.segments:  # every tensor is standardised over the zoo
        block = x[:, seg.offset : seg.offset + seg.numel]
        if scheme == "tensor":
            assert block.mean().abs() < 1e-4
        else:
            assert block.mean(0).abs().max() < 1e-4  # element-wise centred
        assert (block.pow(2).mean() - 1).abs() < 1e-4


def test_normalizer_rejects_unknown_scheme_and_tiny_zoo():
    layout = FlatLayout.from_state_dict(random_state())
    z = torch.zeros(layout.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="normalization"):
        Normalizer.from_sums(layout, z, z, 5, "checkpoint")
    with pytest.raises(ValueError, match="at least 2"):
        Normalizer.from_sums(layout, z, z, 1, "tensor")
