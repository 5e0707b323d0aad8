"""``python -m icm_lora.detection fit|validate|test|predict --config experiments/shapes.yaml``.

The language CLI (``icm_lora.cli.ICMLoRACLI``) with the detection DataModule and evaluation, and
one step before anything is built: the base detector is pretrained from the config's ``pretrain``
section when ``base_dir`` does not hold it yet (a cached one is reused as it is).
"""

from __future__ import annotations

import time

from ..cli import ICMLoRACLI, Trainer
from ..data import PredictInputError
from ..ranks import close_process_group
from ..system import ICMLoRA
from ..zoo import ZooMismatch
from . import pretrain
from .callbacks import DetectionEval
from .zoo_data import DetectionZooData


class DetectionCLI(ICMLoRACLI):
    """ICM-LoRA's CLI for detector LoRAs; the checkpoint is chosen by the validation mAP50 gap."""

    evaluation_class = DetectionEval
    selection = ("val/gen_map50_gap", "min")

    def add_arguments_to_parser(self, parser) -> None:
        self.add_shared_arguments(parser)
        parser.add_argument("--base_dir", type=str, default="zoo/detection/base",
                            help="the base detector's folder (pretrained there first if missing)")
        parser.link_arguments("base_dir", "data.base_dir")
        parser.add_argument("--pretrain", type=dict | None, default=None,
                            help="how the base detector is pretrained (see python -m icm_lora.detection.pretrain)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        start = time.time()
        if cfg.pretrain is not None:  # DetectionZooData reads the base detector's shape when it is built
            sub = pretrain.parser()
            pcfg = sub.parse_object({"base_dir": cfg.base_dir, "pretrain": cfg.pretrain})
            pretrain.pretrain(pcfg, sub.instantiate(pcfg))
        self.pretrain_seconds = time.time() - start

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.init_seconds += self.pretrain_seconds


def main(args: list[str] | None = None) -> DetectionCLI:
    """Run the detection CLI; a mismatched zoo, a missing dataset or a bad predict task ends with one line."""
    try:
        cli = DetectionCLI(ICMLoRA, DetectionZooData, trainer_class=Trainer, args=args,
                           save_config_kwargs={"overwrite": True},
                           parser_kwargs={"prog": "python -m icm_lora.detection"})
    except (ZooMismatch, PredictInputError, FileNotFoundError, ValueError) as err:  # our errors name the file
        raise SystemExit(f"icm_lora.detection: {err}") from None
    close_process_group()  # a DDP run on CPUs (gloo) ends here, not in interpreter shutdown
    return cli
