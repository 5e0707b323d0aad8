"""Python API: generated adapters without the command line.

    from icm_lora.generate import generate_adapters, load_generated

    folders = generate_adapters("experiments/sg_lora.yaml", "lightning_logs/version_0/checkpoints/best.ckpt",
                                description="Legal contracts for software licences")
    model = load_generated(folders["Legal_contracts_for_software_licences"][0])  # a PeftModel

It runs the same ``predict`` as ``python -m icm_lora predict --config ... --ckpt_path ...
--description ...`` and writes the same PEFT folders; errors (a description no expert covers, a zoo
that does not match the config) are raised as exceptions instead of ending the process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from icm_lora import files
from icm_lora.adapter import CONFIG
from icm_lora.callbacks import AdapterWriter
from icm_lora.cli import ICMLoRACLI, Trainer
from icm_lora.data import ZooDataModule
from icm_lora.system import ICMLoRA


def generate_adapters(config: str | Path, ckpt_path: str | Path, description: str | None = None,
                      tasks: list[str] | None = None, output_dir: str | Path = "generated_adapters",
                      num_samples: int = 1, allow_far: bool = False,
                      overrides: list[str] | None = None) -> dict[str, list[Path]]:
    """Write adapters for a description and/or ``tasks`` (zoo task names or task files) from a trained
    generator; returns task name -> its sample folders.

    Args:
        config: the experiment YAML the generator was trained with.
        ckpt_path: the generator's checkpoint (e.g. ``.../checkpoints/best.ckpt``).
        description: one sentence describing a new task (a description-conditioned generator).
        tasks: zoo task names and/or task files, as ``data.predict_tasks``.
        output_dir: where the adapter folders go.
        num_samples: adapters per task (0: the prior's mean decode only).
        allow_far: generate for a description far from every expert (with a warning) instead of raising.
        overrides: more command-line arguments, e.g. ``["--data.zoo_dir", "zoo/mine"]``.
    """
    if description is None and not tasks:
        raise ValueError("generate_adapters needs a description or tasks")
    args = ["--config", str(config), "--num_samples", str(num_samples), "--writer.output_dir", str(output_dir),
            "--data.predict_tasks", f"[{', '.join(tasks or [])}]", "--allow_far", str(allow_far).lower(),
            "--trainer.logger", "false", *(overrides or [])]
    if description is not None:
        args += ["--description", description]
    cli = ICMLoRACLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False, args=args, save_config_callback=None)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt_path), return_predictions=False)
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, AdapterWriter))
    return writer.written


def load_generated(folder: str | Path, dtype: torch.dtype = torch.float32) -> PeftModel:
    """The base model named in a generated adapter folder, with the adapter loaded (plain PEFT)."""
    base_path = files.read_json(Path(folder) / CONFIG)["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=dtype)
    return PeftModel.from_pretrained(model, str(folder))
