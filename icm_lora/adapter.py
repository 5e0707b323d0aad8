"""Generated adapters as standard PEFT folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Folders are written atomically, and reading one back checks that it belongs to the zoo's base
model and layout, naming the file when it does not.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from torch import Tensor

from icm_lora import files
from icm_lora.flat import FlatLayout

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
GENERATION = "generation.json"  # how a generated adapter was made (task, generator, experts drawn on)


def save_adapter(folder: str | Path, flat: Tensor, layout: FlatLayout, peft_config: LoraConfig,
                 base_model_path: str, metadata: dict[str, str] | None = None,
                 generation: dict | None = None) -> Path:
    """Write ``flat`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads as is;
    ``metadata`` goes into the safetensors header, ``generation`` into ``generation.json`` beside it."""
    folder = Path(folder)
    state = layout.unflatten(flat.float().cpu())
    config = LoraConfig(**{k: v for k, v in peft_config.to_dict().items() if k in LoraConfig.__dataclass_fields__})
    config.base_model_name_or_path = base_model_path
    with files.atomic_dir(folder) as tmp:
        config.save_pretrained(tmp)
        files.save_tensors(tmp / WEIGHTS, state, metadata={"format": "pt", **(metadata or {})})
        if generation is not None:
            files.write_json(tmp / GENERATION, generation)
    return folder


def load_adapter(folder: str | Path, layout: FlatLayout, base_model_path: str | None = None) -> Tensor:
    """Read a PEFT adapter folder into a (D,) flat vector, checking base model, shapes and values."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; not a PEFT adapter folder")
    config = files.read_json(config_path)
    if base_model_path is not None and config.get("base_model_name_or_path") != base_model_path:
        raise ValueError(
            f"{config_path}: adapter is for base model {config.get('base_model_name_or_path')!r}, "
            f"this zoo's base model is {base_model_path!r}"
        )
    state = files.load_tensors(weights_path)
    layout.check(state, weights_path)
    return layout.flatten(state)
