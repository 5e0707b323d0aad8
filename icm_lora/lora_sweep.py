"""Choose the zoo's LoRA structure and training budget on validation text.

    python -m icm_lora.lora_sweep --config experiments/openworld.yaml

For each setting of the YAML's ``lora_sweep`` section (changes to ``data.lora`` and
``data.training``), trains the swept tasks' LoRAs into a zoo of their own under
``<zoo_dir>/lora_sweep/<setting>`` (resumable, like any zoo) and scores, on each task's
*validation* text, the base model, the task's own LoRA and the soup of the swept tasks' LoRAs.
Writes ``<output>.md`` and ``<output>.csv``: per setting, the LoRA's size, its training cost, the
mean and worst gain of the own LoRA over the base model, and how often it beats the soup, so the
zoo's settings are chosen on validation and never on the test text the benchmark reports.
"""

from __future__ import annotations

import csv
import io
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from icm_lora import base, files, hardware
from icm_lora.evaluate import LiveAdapter, TextScorer
from icm_lora.tasks import slug, split_task
from icm_lora.zoo import METADATA, LoRASpec, Zoo, ZooTraining, lora_layout
from icm_lora.zoo_build import build


class SweepError(ValueError):
    """A sweep that cannot be run (an unknown task or setting field, no settings)."""


@dataclass
class Setting:
    """One point of the sweep.

    Args:
        name: the setting's name (its zoo folder and its row in the table).
        lora: ``data.lora`` fields to change, e.g. ``{r: 8, layers_to_transform: [24, 25, 26, 27, 28, 29]}``.
        training: ``data.training`` fields to change, e.g. ``{steps: 128, lr: 0.002}``.
    """

    name: str
    lora: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoRASweep:
    """Zoo settings compared on the swept tasks' validation text.

    Args:
        tasks: zoo tasks to sweep on (empty: every task of ``data.tasks``).
        settings: the settings to compare.
        output: path stem of the table and CSV.
    """

    tasks: list[str] = field(default_factory=list)
    settings: list[Setting] = field(default_factory=list)
    output: str = "results/lora_sweep"


def resolve(setting: Setting, lora: LoRASpec, training: ZooTraining) -> tuple[LoRASpec, ZooTraining]:
    """``lora`` and ``training`` with the setting's changes; unknown fields are named."""
    for section, obj, changes in (("lora", lora, setting.lora), ("training", training, setting.training)):
        unknown = sorted(set(changes) - {f.name for f in fields(obj)})
        if unknown:
            raise SweepError(f"lora_sweep setting {setting.name!r}: {section} has no field(s) {unknown}")
    try:
        return replace(lora, **setting.lora), replace(training, **setting.training)
    except ValueError as err:
        raise SweepError(f"lora_sweep setting {setting.name!r}: {err}") from None


def check(spec: LoRASweep, names: list[str]) -> list[str]:
    """The swept task names (validated)."""
    if not spec.settings:
        raise SweepError("lora_sweep.settings is empty: nothing to compare")
    if len({slug(s.name) for s in spec.settings}) != len(spec.settings):
        raise SweepError("lora_sweep setting names must be unique (as file names)")
    unknown = sorted(set(spec.tasks) - set(names))
    if unknown:
        raise SweepError(f"lora_sweep.tasks names tasks not in data.tasks: {unknown}")
    swept = [n for n in names if n in spec.tasks] if spec.tasks else list(names)
    if len(swept) < 2:
        raise SweepError("lora_sweep needs at least 2 tasks (the soup of one task is its own LoRA)")
    return swept


class Sweep:
    """Runs a ``LoRASweep`` over a parsed CLI's DataModule (``run=False``)."""

    def __init__(self, cli) -> None:
        self.dm, self.spec = cli.datamodule, cli.config_init["lora_sweep"]
        self.eval = cli.config.eval
        self.names = check(self.spec, [t.name for t in self.dm.task_specs])
        for setting in self.spec.settings:
            resolve(setting, self.dm.lora, self.dm.training)  # fail before any training

    def run(self) -> list[dict]:
        start = time.time()
        specs = [s for s in self.dm.task_specs if s.name in self.names]
        tasks = [split_task(s, self.dm.text) for s in specs]
        sources = self.dm.sources()
        model, tokenizer = base.load(self.dm.base_model, self.dm.cache_dir)
        model.to(self.dm.device)
        rows = []
        for setting in self.spec.settings:
            lora, training = resolve(setting, self.dm.lora, self.dm.training)
            root = self.dm.zoo_dir / "lora_sweep" / slug(setting.name)
            build(root, model, tokenizer, self.dm.base_model, tasks, [sources[t.name] for t in tasks], lora, training,
                  eval_block_size=self.eval.block_size)
            rows.append(self.score(setting, root, model, tokenizer, tasks, lora, training))
            print(summary_line(rows[-1]))
        self.write(rows, time.time() - start)
        return rows

    def score(self, setting: Setting, root: Path, model, tokenizer, tasks, lora: LoRASpec,
              training: ZooTraining) -> dict:
        """Per task: validation ppl of the base model, its own LoRA and the soup of the swept tasks."""
        zoo, meta = Zoo(root), files.read_json(root / METADATA)
        names = [t.name for t in tasks]
        live = LiveAdapter(model, lora.peft_config(), lora_layout(model.config, lora))
        scorer = TextScorer(live.model, tokenizer, self.eval.block_size, self.eval.batch_size, self.eval.precision)
        soup = zoo.soup(names)
        per_task = {}
        for task in tasks:
            scores = {}
            for label, flat in (("base", None), ("own", zoo.final(task.name)), ("soup", soup)):
                with live.use(flat):
                    scores[label] = scorer.score(task.val).ppl
            per_task[task.name] = scores | {"seconds": meta["tasks"][task.name]["train_seconds"]}
        live.model.unload()  # the bare base model again, for the next setting's zoo
        return {"setting": setting.name, "r": lora.r, "layers": _layers(lora), "targets": ",".join(lora.target_modules),
                "steps": training.steps, "lr": training.lr, "dim": live.layout.dim,
                "tokens": training.steps * training.batch_size * training.block_size, "tasks": per_task}

    def write(self, rows: list[dict], seconds: float) -> None:
        out = Path(self.spec.output)
        device = self.dm.device
        header = (f"Command: `{' '.join(['python -m icm_lora.lora_sweep'] + sys.argv[1:])}`. Hardware: "
                  f"{hardware.describe(device)}; precision {hardware.resolve_precision(self.dm.training.precision, device)}; "
                  f"torch {torch.__version__}. Total {seconds:.0f} s (settings already trained are reused).")
        markdown, table = report(rows, header)
        files.write_text(out.with_suffix(".md"), markdown)
        files.write_text(out.with_suffix(".csv"), table)
        print(f"\n{markdown}\nwritten to {out.with_suffix('.md')} and .csv")


def _layers(lora: LoRASpec) -> str:
    layers = lora.layers_to_transform
    if not layers:
        return "all"
    return f"{min(layers)}-{max(layers)}" if list(layers) == list(range(min(layers), max(layers) + 1)) else str(layers)


def gains(row: dict) -> dict[str, float]:
    """Per task, the own LoRA's validation perplexity gain over the base model (0.1 = 10% lower)."""
    return {n: 1 - t["own"] / t["base"] for n, t in row["tasks"].items()}


def summary(row: dict) -> dict:
    """The row's averages: gain over base (mean, worst), wins over the soup, seconds per task."""
    g = gains(row)
    tasks = row["tasks"].values()
    return {"mean_gain": statistics.fmean(g.values()), "worst_gain": min(g.values()),
            "beats_soup": sum(t["own"] < t["soup"] for t in tasks), "num_tasks": len(g),
            "soup_gain": statistics.fmean(1 - t["soup"] / t["base"] for t in tasks),
            "seconds": statistics.fmean(t["seconds"] for t in tasks)}


def summary_line(row: dict) -> str:
    s = summary(row)
    return (f"{row['setting']}: own LoRA {100 * s['mean_gain']:.1f}% better than base on validation (worst "
            f"{100 * s['worst_gain']:.1f}%), beats the soup on {s['beats_soup']}/{s['num_tasks']}, "
            f"{s['seconds']:.0f} s per task")


def report(rows: list[dict], header: str) -> tuple[str, str]:
    """Markdown (one line per setting, then per task) and CSV (per setting and task)."""
    lines = ["# LoRA settings on validation text", "", header, "",
             "Gain: 1 - ppl(own LoRA) / ppl(base) on each task's validation text. Soup: the mean of the swept "
             "tasks' LoRAs.", "",
             "| setting | r | layers | targets | steps | lr | values | tokens / task | s / task | mean gain | "
             "worst gain | soup gain | beats soup |", "|" + "---|" * 13]
    for r in rows:
        s = summary(r)
        lines.append(f"| {r['setting']} | {r['r']} | {r['layers']} | {r['targets']} | {r['steps']} | {r['lr']:g} | "
                     f"{r['dim']:,} | {r['tokens']:,} | {s['seconds']:.0f} | {100 * s['mean_gain']:.1f}% | "
                     f"{100 * s['worst_gain']:.1f}% | {100 * s['soup_gain']:.1f}% | {s['beats_soup']}/{s['num_tasks']} |")
    names = list(rows[0]["tasks"])
    lines += ["", "## Per task: validation ppl, base -> own LoRA (soup)", "",
              "| setting | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for r in rows:
        cells = [f"{t['base']:.2f} -> {t['own']:.2f} ({t['soup']:.2f})" for t in r["tasks"].values()]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["setting", "r", "layers", "targets", "steps", "lr", "values", "tokens", "task", "base_ppl",
                     "own_ppl", "soup_ppl", "train_seconds"])
    for r in rows:
        for name, t in r["tasks"].items():
            writer.writerow([r["setting"], r["r"], r["layers"], r["targets"], r["steps"], r["lr"], r["dim"],
                             r["tokens"], name, t["base"], t["own"], t["soup"], t["seconds"]])
    return "\n".join(lines) + "\n", buf.getvalue()


def main(args: list[str] | None = None) -> list[dict]:
    """Parse the config (the openworld YAML, whose CLI has the ``lora_sweep`` section) and sweep."""
    from icm_lora.openworld import run_with_cli  # openworld's CLI imports this module's LoRASweep

    return run_with_cli(Sweep, "icm_lora lora_sweep", (SweepError,), args)


if __name__ == "__main__":
    main()
