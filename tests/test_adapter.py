import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import LORA
from icm_lora import files
from icm_lora.adapter import load_adapter, save_adapter
from icm_lora.zoo import lora_layout


@pytest.fixture
def adapter(tmp_path, tiny_base):
    model, _, path = tiny_base
    layout = lora_layout(model.config, LORA)
    flat = torch.randn(layout.dim, generator=torch.Generator().manual_seed(0)) * 0.3
    folder = save_adapter(tmp_path / "adapter", flat, layout, LORA.peft_config(), path, {"task": "demo"})
    return folder, flat, layout, path


def test_generated_adapter_loads_in_plain_peft_and_changes_logits(adapter):
    folder, flat, layout, path = adapter
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    assert files.read_json(folder / "adapter_config.json")["base_model_name_or_path"] == path
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    base = AutoModelForCausalLM.from_pretrained(path).eval()  # the folder named in the adapter
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, folder).eval()
        tuned = peft_model(input_ids=ids).logits
    assert not torch.allclose(bare, tuned)
    q_a = [s for s in layout.segments if "q_proj.lora_A" in s.name][0]
    loaded = dict(peft_model.named_parameters())[q_a.name.replace(".weight", ".default.weight")]
    assert torch.equal(loaded.detach(), flat[q_a.offset : q_a.offset + q_a.numel].view(q_a.shape))
    assert torch.equal(load_adapter(folder, layout, path), flat)


def test_adapter_for_another_base_model_is_refused(adapter):
    folder, _, layout, _ = adapter
    with pytest.raises(ValueError, match="adapter_config.json.*another|adapter_config.json.*base model"):
        load_adapter(folder, layout, "/some/other/model")


def test_adapter_with_other_shapes_is_refused(adapter, tiny_base):
    folder, _, _, path = adapter
    other = lora_layout(tiny_base[0].config, type(LORA)(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="adapter_model.safetensors.*shape"):
        load_adapter(folder, other, path)


def test_truncated_or_nan_adapter_names_the_file(adapter):
    folder, flat, layout, path = adapter
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors.*corrupt or truncated"):
        load_adapter(folder, layout, path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(folder.parent / "nowhere", layout, path)


def test_nan_adapter_is_never_written(tmp_path, adapter):
    _, flat, layout, path = adapter
    bad = flat.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_adapter(tmp_path / "bad", bad, layout, LORA.peft_config(), path)
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]
