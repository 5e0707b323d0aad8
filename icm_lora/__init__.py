"""icm_lora: generate LoRA adapters from task vectors with a conditional VAE (ICM-LoRA)."""

__version__ = "0.1.0"
