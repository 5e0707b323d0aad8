"""How the own LoRAs' quality depends on the training text per task (the frozen-prefix cache pays
only when blocks are drawn again, i.e. with less text per task: this measures what that costs).

    python benchmarks/text_budget.py --chars 200000 60000 --tasks mathematics history arts legal python

Prints, per budget and task: blocks, distinct blocks drawn, validation and test perplexity of the base
model and of the LoRA trained with the config's settings (zoo builder, frozen prefix cached), seconds.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from icm_lora import base, hardware
from icm_lora.cli import ICMLoRACLI, Trainer
from icm_lora.data import ZooDataModule
from icm_lora.evaluate import TextScorer
from icm_lora.prefix import FrozenPrefix
from icm_lora.system import ICMLoRA
from icm_lora.tasks import split_task
from icm_lora.zoo_build import token_blocks, train_lora

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "domains.yaml"))
    parser.add_argument("--chars", type=int, nargs="+", default=[200_000, 60_000])
    parser.add_argument("--tasks", nargs="+", default=["mathematics", "history", "arts", "legal", "python"])
    args = parser.parse_args()
    cli = ICMLoRACLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False,
                     args=["--config", args.config, "--trainer.logger", "false"])
    dm = cli.datamodule
    model, tokenizer = base.load(dm.base_model, dm.cache_dir)
    torch.manual_seed(dm.lora.init_seed)
    peft_model = get_peft_model(model, dm.lora.peft_config())
    init = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    precision = hardware.resolve_precision(dm.training.precision, "cpu")
    prefix, scorer = FrozenPrefix(peft_model), TextScorer(peft_model, tokenizer, precision=precision)
    cfg = dm.training
    print(f"{hardware.describe('cpu')}, {precision}\n\n| train chars | task | blocks | distinct drawn | "
          "val ppl base -> LoRA | test ppl base -> LoRA | seconds |\n|---|---|---|---|---|---|---|")
    for chars in args.chars:
        for spec in (s for s in dm.task_specs if s.name in args.tasks):
            task = split_task(spec, replace(dm.text, train_chars=chars))
            blocks = len(token_blocks(tokenizer, task.train, cfg.block_size))
            rng = random.Random(f"{cfg.seed}:{task.name}")
            distinct = len({rng.randrange(blocks) for _ in range(cfg.steps * cfg.batch_size)})
            set_peft_model_state_dict(peft_model, init)
            start = time.time()
            train_lora(peft_model, tokenizer, task, cfg, dm.layout, precision, prefix)
            seconds = time.time() - start
            with peft_model.disable_adapter():
                base_val, base_test = scorer.score(task.val).ppl, scorer.score(task.test).ppl
            val, test = scorer.score(task.val).ppl, scorer.score(task.test).ppl
            print(f"| {chars:,} | {task.name} | {blocks} | {distinct} | {base_val:.2f} -> {val:.2f} | "
                  f"{base_test:.2f} -> {test:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
