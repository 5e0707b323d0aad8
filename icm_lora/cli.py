"""``python -m icm_lora fit|validate|test|predict|fuse --config experiments/X.yaml``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from icm_lora import files, hardware
from icm_lora.base import Unreachable
from icm_lora.callbacks import AdapterWriter, DownstreamEval
from icm_lora.data import PredictInputError, ZooDataModule
from icm_lora.ranks import close_process_group
from icm_lora.semantic import FarDescription
from icm_lora.system import ICMLoRA
from icm_lora.zoo import ZooMismatch


class Trainer(L.Trainer):
    """Lightning's Trainer with two defaults of this project.

    Args:
        precision: ``auto`` (``bf16-mixed`` where the device has native bf16, else ``32-true``) or any
            of Lightning's precisions.
        use_distributed_sampler: keep False: the meta-batch sampler splits meta-batches across ranks
            itself (Lightning cannot inject a DistributedSampler into it).
    """

    def __init__(self, *args, precision: str | int | None = "auto", use_distributed_sampler: bool = False,
                 **kwargs) -> None:
        precision = hardware.trainer_precision(precision, kwargs.get("accelerator", "auto"))
        super().__init__(*args, precision=precision, use_distributed_sampler=use_distributed_sampler, **kwargs)


class ICMLoRACLI(LightningCLI):
    """LightningCLI with shapes linked from the zoo, always-on callbacks, and test after fit.

    A domain's CLI (``icm_lora.detection.cli``) sets its evaluation callback and the validation
    metric that chooses the checkpoint; everything else is shared.
    """

    evaluation_class: type = DownstreamEval
    selection: tuple[str, str] = ("val/gen_ppl_ratio", "min")  # generated over own-LoRA perplexity

    def add_arguments_to_parser(self, parser) -> None:
        self.add_shared_arguments(parser)
        parser.add_argument("--description", type=str | None, default=None,
                            help="predict: an adapter for the task this sentence describes (a description-"
                                 "conditioned generator: data.condition.kind semantic or description)")
        parser.link_arguments("description", "data.predict_description")
        parser.add_argument("--allow_far", type=bool, default=False,
                            help="predict: generate even for a description far from every expert (with a warning)")
        parser.link_arguments("allow_far", "data.allow_far")

    def add_shared_arguments(self, parser) -> None:
        """Shape links, ``--num_samples``, the evaluation and writer callbacks, and the two checkpoints."""
        parser.link_arguments("data.lora_dim", "model.lora_dim", apply_on="instantiate")
        parser.link_arguments("data.cond_dim", "model.cond_dim", apply_on="instantiate")
        parser.add_argument("--num_samples", type=int, default=1,
                            help="adapters decoded per task by predict (0: only the mean decode, z = 0)")
        parser.link_arguments("num_samples", "model.num_samples")
        parser.add_lightning_class_args(self.evaluation_class, "eval")
        parser.add_lightning_class_args(AdapterWriter, "writer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        monitor, mode = self.selection  # the checkpoint chosen on validation
        parser.set_defaults({"checkpoint.monitor": monitor, "checkpoint.mode": mode,
                             "checkpoint.filename": f"{{epoch}}-{{{monitor}:.4f}}",
                             "checkpoint.auto_insert_metric_name": False})
        # Resumption: the state after the latest epoch, overwritten in place (`fit --ckpt_path .../resume.ckpt`),
        # saved at the end of every training epoch, validated or not.
        parser.add_lightning_class_args(ModelCheckpoint, "resume_checkpoint")
        parser.set_defaults({"resume_checkpoint.filename": "resume", "resume_checkpoint.save_top_k": 1,
                             "resume_checkpoint.enable_version_counter": False,
                             "resume_checkpoint.save_on_train_epoch_end": True})

    def hardware_line(self) -> str:
        """The machine, and the precision each phase runs in on it (``auto`` resolved)."""
        device = self.trainer.strategy.root_device
        evaluation = next(c for c in self.trainer.callbacks if isinstance(c, self.evaluation_class))
        precisions = self.datamodule.precisions() | {
            "scoring": hardware.resolve_precision(evaluation.precision, device),
            "CVAE": self.trainer.precision}
        ranks = f", {self.trainer.world_size} ranks" if self.trainer.world_size > 1 else ""
        return (f"Hardware: {hardware.describe(device)}{ranks}, torch {torch.__version__}"
                f"{hardware.bf16_note(device)}. Precision: " + ", ".join(f"{phase} {p}" for phase, p in precisions.items()))

    def _announce(self) -> None:
        if self.trainer.is_global_zero:
            print(self.hardware_line())

    before_validate = before_test = before_predict = _announce

    def before_fit(self) -> None:
        self._announce()
        self._fit_start = time.time()

    def after_fit(self) -> None:
        """Report on test with the checkpoint chosen on validation (never a test-picked one)."""
        if self.trainer.interrupted:
            return
        fit_seconds = time.time() - self._fit_start
        selectors = [c for c in self.trainer.checkpoint_callbacks if c.monitor]
        best = selectors[0].best_model_path if selectors else ""
        if best and self.trainer.is_global_zero:  # a stable name for `predict`: the checkpoint chosen on validation
            link = Path(best).with_name("best.ckpt")
            link.unlink(missing_ok=True)
            link.symlink_to(Path(best).name)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        out = Path(self.trainer.log_dir or ".")  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            self._report_phases(fit_seconds, best, out)

    def _report_phases(self, fit_seconds: float, best: str, out: Path) -> None:
        """Wall time of each phase of this run, printed and written to ``out/phases.md``."""
        built = self.datamodule.phase_seconds
        evaluation = self.trainer.callbacks
        spent = next((c.seconds for c in evaluation if isinstance(c, self.evaluation_class)), {})
        phases = {self.datamodule.init_phase: self.datamodule.init_seconds} | built
        phases["CVAE training (fit, without its validation evaluations)"] = (
            fit_seconds - sum(built.values()) - spent.get("validation", 0.0))
        phases["downstream validation (every check_val_every_n_epoch)"] = spent.get("validation", 0.0)
        phases["downstream test table"] = spent.get("test", 0.0)
        lines = ["| phase | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in phases.items()]
        lines.append(f"| total | {sum(phases.values()):.0f} |")
        text = (f"{self.hardware_line()}\n\n" + "\n".join(lines)
                + f"\n\nCheckpoint chosen on validation: {best or '(last)'}\n")
        files.write_text(out / "phases.md", text)
        print(f"\nPhase wall times:\n{text}")


def main(args: list[str] | None = None) -> ICMLoRACLI:
    """Run the CLI (``fuse`` goes to ``icm_lora.fuse``); an unreachable hub model or dataset, a zoo that does not match the config, or a
    description no expert covers, or a predict task the generator cannot condition on ends with a
    one-line message, not a traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["fuse"]:  # one adapter for several tasks (not a Trainer method, so not a LightningCLI subcommand)
        from icm_lora.fuse import main as fuse

        if args is None:  # LightningCLI reads sys.argv itself: show it the fuse arguments only
            sys.argv = [f"{sys.argv[0]} fuse", *argv[1:]]
            return fuse()
        return fuse(argv[1:])
    try:
        cli = ICMLoRACLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, args=args,
                         save_config_kwargs={"overwrite": True})
    except (Unreachable, ZooMismatch, FarDescription, PredictInputError) as err:
        raise SystemExit(f"icm_lora: {err}") from None
    close_process_group()  # a DDP run on CPUs (gloo) ends here, not in interpreter shutdown
    return cli
