"""``python -m icm_lora fit|validate|test|predict --config experiments/X.yaml``."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from icm_lora.base import Unreachable
from icm_lora.callbacks import AdapterWriter, DownstreamEval
from icm_lora.data import ZooDataModule
from icm_lora.system import ICMLoRA


class ICMLoRACLI(LightningCLI):
    """LightningCLI with shapes linked from the zoo, always-on callbacks, and test after fit."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.lora_dim", "model.lora_dim", apply_on="instantiate")
        parser.link_arguments("data.cond_dim", "model.cond_dim", apply_on="instantiate")
        parser.add_argument("--num_samples", type=int, default=1,
                            help="adapters decoded per task by predict (0: only the mean decode, z = 0)")
        parser.link_arguments("num_samples", "model.num_samples")
        parser.add_lightning_class_args(DownstreamEval, "eval")
        parser.add_lightning_class_args(AdapterWriter, "writer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/gen_ppl_ratio", "checkpoint.mode": "min",
                             "checkpoint.save_last": True, "checkpoint.filename": "{epoch}-{val/gen_ppl_ratio:.4f}",
                             "checkpoint.auto_insert_metric_name": False})

    def after_fit(self) -> None:
        """Report on test with the checkpoint chosen on validation (never a test-picked one)."""
        if self.trainer.interrupted:
            return
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def main(args: list[str] | None = None) -> ICMLoRACLI:
    """Run the CLI; an unreachable hub model or dataset ends with a message, not a traceback."""
    try:
        return ICMLoRACLI(ICMLoRA, ZooDataModule, args=args, save_config_kwargs={"overwrite": True})
    except Unreachable as err:
        raise SystemExit(f"icm_lora: {err}") from None
