"""Choose the generator's settings on the validation folds of ``make openworld``.

    python -m icm_lora.generator_sweep --config experiments/openworld.yaml
    python -m icm_lora.generator_sweep --config experiments/openworld.yaml --sweep generator_sweep_dense
    python -m icm_lora.generator_sweep --config experiments/openworld.yaml --sweep generator_sweep_mixup
    python -m icm_lora.generator_sweep --config experiments/openworld.yaml --sweep sg_lora_sweep
    python -m icm_lora.generator_sweep --config experiments/openworld.yaml --sweep sg_lora_sweep_mixup
    python -m icm_lora.generator_sweep --config experiments/openworld.yaml --sweep generator_sweep_schedule

Each setting of the YAML's ``generator_sweep`` section (or of ``generator_sweep_dense``: the
condition, normalisation, capacity and zoo size on top of the dense head; or of ``sg_lora_sweep``:
SG-LoRA's K, tau, M and lambda; or of the ``*_mixup`` sections: mixup of training pairs for either
generator) changes the config by dotted keys, as on the
command line (``model.kl_weight``, ``trainer.max_epochs``, ``data.condition.layer``, ...), and may
train on a thinner zoo (``seen_every: 2``: every second seen task only). For each setting and each
validation fold, the fold's generator is trained on the fold's seen tasks exactly as the benchmark
trains it (cached, resumed, retrained when its settings change; under ``<output>_runs/<setting>/``),
and each held-out task is scored on its *validation* text against the baselines of the benchmark.
A setting that changes only how generators decode (``model.correction_scale``) decodes the
generators of the first setting that trains the same ones.

A setting that changes how conditions are computed gets a zoo view of its own under
``<zoo_dir>/views/<setting>``: the zoo's shards hard-linked (no copy, no retraining) and that
setting's conditions built there, so the zoo's own conditions are never touched. Writes
``<output>.md`` and ``<output>.csv``: per setting, the share of the base -> oracle gap the generated
adapters close (mean over tasks of the mean over samples), the z = 0 decode, the wrong-condition
control, and the fit time; the setting with the highest mean is marked as chosen. Test text is
never read.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icm_lora import base, files, hardware
from icm_lora.system import DECODING_ARGS
from icm_lora.tasks import slug
from icm_lora.zoo import METADATA

CONDITION_CHANGES = "data.condition."
DECODING_CHANGES = tuple(f"model.{name}" for name in DECODING_ARGS)  # read at generation only: no generator of its own


class GeneratorSweepError(ValueError):
    """A sweep that cannot be run (no settings, duplicate names, no validation fold...)."""


@dataclass
class GeneratorSetting:
    """One point of the sweep.

    Args:
        name: the setting's name (its folder and its row in the table).
        changes: config changes by dotted key, e.g. ``{model.kl_weight: 0.05, trainer.max_epochs: 12}``.
        seen_every: train each fold's generator on every ``seen_every``-th seen task only (a smaller
            zoo); the baselines keep every seen task.
    """

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    seen_every: int = 1


@dataclass
class GeneratorSweep:
    """Generator settings compared on the benchmark's validation folds.

    Args:
        kind: the condition kind whose generator is swept (``task_vector``: ICM-LoRA from demonstrations).
        settings: the settings to compare; the first is the reference.
        output: path stem of the table and CSV; runs go to ``<output>_runs/``.
    """

    kind: str = "task_vector"
    settings: list[GeneratorSetting] = field(default_factory=list)
    output: str = "results/generator_sweep"


def generated(kind: str) -> str:
    """The benchmark's row of the generated adapters of ``kind``."""
    from icm_lora.openworld import SG_LORA

    return SG_LORA if kind == "semantic" else f"ICM-LoRA ({kind})"


WRONG = {"task_vector": "control: another task's demonstrations",
         "description": "control: random-character description",
         "semantic": "control: SG-LoRA, other task's description"}
REFERENCES = ("soup", "nearest (task vector)", "top-K mean", "nearest (description)",
              "AdapterSoup (top-K by description)", "mu* (top-K weighted by description)")


def check(spec: GeneratorSweep, folds: list) -> list:
    """The validation folds (validated settings)."""
    if not spec.settings:
        raise GeneratorSweepError("generator_sweep.settings is empty: nothing to compare")
    if len({slug(s.name) for s in spec.settings}) != len(spec.settings):
        raise GeneratorSweepError("generator_sweep setting names must be unique (as file names)")
    for s in spec.settings:
        if s.seen_every < 1:
            raise GeneratorSweepError(f"generator_sweep setting {s.name!r}: seen_every must be >= 1")
        bad = [k for k in s.changes if k.split(".")[0] not in ("model", "data", "trainer", "eval", "checkpoint")
               or k in ("data.zoo_dir", "data.tasks", "data.condition.kind")]
        if bad:
            raise GeneratorSweepError(f"generator_sweep setting {s.name!r}: cannot change {bad} (the zoo, its "
                                      "tasks and the swept kind are the benchmark's)")
    val = [f for f in folds if f.role == "validation"]
    if not val:
        raise GeneratorSweepError("openworld.folds has no fold with role 'validation' to sweep on")
    return val


def as_args(changes: dict[str, Any]) -> list[str]:
    """Dotted-key changes -> command-line arguments the project's CLI parses (strings as they are,
    other values as JSON)."""
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in changes.items()]


def zoo_view(zoo_dir: Path, name: str) -> Path:
    """``<zoo_dir>/views/<name>``: the zoo's metadata and hard-linked shards, without its conditions."""
    view = zoo_dir / "views" / slug(name)
    meta = files.read_json(zoo_dir / METADATA)
    view.mkdir(parents=True, exist_ok=True)
    for entry in meta.get("tasks", {}).values():
        src, dst = zoo_dir / entry["file"], view / entry["file"]
        if dst.exists() and os.path.samefile(src, dst):
            continue
        dst.unlink(missing_ok=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system: copy
            shutil.copyfile(src, dst)
    if not (view / METADATA).exists():
        files.write_json(view / METADATA, {k: v for k, v in meta.items() if k != "conditions"})
    return view


class Sweep:
    """Runs a ``GeneratorSweep`` from the arguments of the benchmark's CLI."""

    def __init__(self, cli, args: list[str]) -> None:
        from icm_lora.openworld import check as check_openworld

        self.cli, self.args = cli, args
        self.spec: GeneratorSweep = cli.config_init[cli.config_init["sweep"]]
        self.openworld = cli.config_init["openworld"]
        check_openworld(self.openworld, [t.name for t in cli.datamodule.task_specs])
        self.folds = check(self.spec, self.openworld.folds)
        self.out = Path(self.spec.output)
        self.runs = self.out.parent / f"{self.out.name}_runs"

    def run(self) -> list[dict]:
        start = time.time()
        whole = self.cli.datamodule
        whole.setup("fit")  # the zoo as the benchmark builds it (reused when it is there)
        model, tokenizer = base.load(whole.base_model, whole.cache_dir)
        shared = {"model": model.to(whole.device), "tokenizer": tokenizer}
        results = []
        for setting in self.spec.settings:
            results.append(self.run_setting(setting, shared))
            print(summary_line(results[-1], self.spec.kind))
            self.write(results, time.time() - start)
        return results

    def bench(self, setting: GeneratorSetting):
        """The benchmark, parsed with the setting's changes, its runs under ``<output>_runs/<setting>``."""
        from icm_lora.cli import Trainer
        from icm_lora.data import ZooDataModule
        from icm_lora.openworld import Benchmark, OpenWorldCLI
        from icm_lora.system import ICMLoRA

        extra = as_args(setting.changes) + ["--openworld.output", str(self.runs / self.trained_as(setting) / "openworld"),
                                            # as every sweep so far (their runs stay valid); a schedule's sweep needs it
                                            "--openworld.validate_generators", "true"]
        if any(k.startswith(CONDITION_CHANGES) for k in setting.changes):
            extra += ["--data.zoo_dir", str(zoo_view(self.cli.datamodule.zoo_dir, setting.name))]
        cli = OpenWorldCLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False, args=self.args + extra,
                           save_config_kwargs={"overwrite": True})
        bench = Benchmark(cli)
        bench.overrides = dict(setting.changes)  # over the kind's own changes (openworld.kind_changes) too
        return bench

    def trained_as(self, setting: GeneratorSetting) -> str:
        """The folder of the setting's generators: the first setting's that trains the same ones
        (the same changes apart from how they decode, the same seen tasks), so a decoding setting
        decodes that setting's generators instead of training copies of them."""

        def training(s: GeneratorSetting) -> tuple:
            return s.seen_every, sorted((k, json.dumps(v)) for k, v in s.changes.items() if k not in DECODING_CHANGES)

        return slug(next(s.name for s in self.spec.settings if training(s) == training(setting)))

    def run_setting(self, setting: GeneratorSetting, shared: dict) -> dict:
        from icm_lora.openworld import choose_top_k, finish_row

        bench = self.bench(setting)
        bench.whole.setup("fit")  # a view builds its conditions here; the zoo itself is only read
        bench.model, bench.tokenizer = shared["model"], shared["tokenizer"]
        if "live" in shared:  # one scoring copy of the base model for every setting
            bench._live, bench._scorer = shared["live"], shared["scorer"]
        rows, seconds, names = [], {}, bench.names
        for fold in self.folds:
            seen = [n for n in names if n not in fold.held_out]
            generator = bench.generator(fold, seen[:: setting.seen_every], self.spec.kind)
            done = files.read_json(bench.runs / fold.name / self.spec.kind / "done.json")
            seconds[fold.name] = done.get("fit_seconds")  # None: trained before fits were timed
            rows += [bench.score(fold, seen, name, {self.spec.kind: generator}, {}) for name in fold.held_out]
        shared["live"], shared["scorer"] = bench.scorer()
        chosen = choose_top_k(rows, bench.spec)
        rows = [finish_row(r, chosen) for r in rows]
        return {"setting": setting.name, "changes": setting.changes, "seen_every": setting.seen_every,
                "seconds": seconds, "tasks": {r["task"]: r for r in rows}}

    def write(self, results: list[dict], seconds: float) -> None:
        device = self.cli.datamodule.device
        header = (f"Command: `{' '.join(['python -m icm_lora.generator_sweep'] + sys.argv[1:])}`. Hardware: "
                  f"{hardware.describe(device)}; torch {torch.__version__}. Total {seconds:.0f} s in this run "
                  "(generators already trained are reused).")
        markdown, table = report(results, self.spec.kind, header)
        files.write_text(self.out.with_suffix(".md"), markdown)
        files.write_text(self.out.with_suffix(".csv"), table)
        print(f"\n{markdown}\nwritten to {self.out.with_suffix('.md')} and .csv")


def gaps(result: dict, method: str) -> dict[str, float]:
    """Per held-out task, the share of the base -> oracle gap ``method`` closes (mean over samples)."""
    return {name: row["methods"][method]["gap"] for name, row in result["tasks"].items() if method in row["methods"]}


def summary(result: dict, kind: str) -> dict:
    """Mean gap closed by the generated adapters, their z = 0 decode and the wrong condition, and how
    often the task's own condition beats the wrong one."""
    own = generated(kind)
    mine, z0 = gaps(result, own), gaps(result, f"{own} z=0")
    wrong = gaps(result, WRONG[kind])
    stds = [row["methods"][own]["gap_std"] for row in result["tasks"].values()]
    return {"gap": statistics.fmean(mine.values()), "gap_std": statistics.fmean(stds),
            "z0": statistics.fmean(z0.values()), "wrong": statistics.fmean(wrong.values()),
            "right_beats_wrong": sum(mine[t] > wrong[t] for t in wrong), "num_tasks": len(mine),
            "fit_seconds": None if None in result["seconds"].values() else sum(result["seconds"].values())}


def chosen(results: list[dict], kind: str) -> str:
    """The setting whose generated adapters close the most of the gap on the validation tasks."""
    return max(results, key=lambda r: summary(r, kind)["gap"])["setting"]


def summary_line(result: dict, kind: str) -> str:
    s = summary(result, kind)
    return (f"{result['setting']}: closes {s['gap']:.2f} of the gap on the validation folds' held-out tasks "
            f"(z=0 {s['z0']:.2f}, wrong condition {s['wrong']:.2f}), fit {_seconds(s['fit_seconds'])} s")


def _seconds(value: float | None) -> str:
    return "not timed" if value is None else f"{value:.0f}"


def _changes(result: dict) -> str:
    parts = [f"{k}={json.dumps(v)}" for k, v in result["changes"].items()]
    if result["seen_every"] > 1:
        parts.append(f"1 in {result['seen_every']} seen tasks")
    return ", ".join(parts) or "(the YAML's settings)"


def report(results: list[dict], kind: str, header: str) -> tuple[str, str]:
    """Markdown (one line per setting, then per task) and CSV (per setting, task and method)."""
    best = chosen(results, kind)
    names = list(results[0]["tasks"])
    first = results[0]["tasks"]
    lines = ["# Generator settings on the validation folds", "", header, "",
             f"Gap: the share of the base -> oracle gap in NLL per token that {generated(kind)} closes on each "
             "held-out task's validation text (mean over samples; the mean over tasks here). Wrong: decoded "
             "from another task's condition. Fit: seconds to train the folds' generators.", "",
             "Baselines on the same tasks (they do not depend on the setting): "
             + "; ".join(f"{m} {statistics.fmean(first[t]['methods'][m]['gap'] for t in names):.2f}"
                         for m in REFERENCES if all(m in first[t]["methods"] for t in names)) + ".", "",
             "| setting | changes | gap | ± std over samples | z=0 | wrong | right beats wrong | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = summary(r, kind)
        mark = " (chosen)" if r["setting"] == best else ""
        lines.append(f"| {r['setting']}{mark} | {_changes(r)} | {s['gap']:.3f} | {s['gap_std']:.3f} | "
                     f"{s['z0']:.3f} | {s['wrong']:.3f} | {s['right_beats_wrong']}/{s['num_tasks']} | "
                     f"{_seconds(s['fit_seconds'])} |")
    own = generated(kind)
    lines += ["", "## Per held-out task: gap closed", "", "| setting | " + " | ".join(names) + " |",
              "|" + "---|" * (1 + len(names))]
    for m in REFERENCES:
        if all(m in first[t]["methods"] for t in names):
            lines.append(f"| {m} | " + " | ".join(f"{first[t]['methods'][m]['gap']:.3f}" for t in names) + " |")
    for r in results:
        g = gaps(r, own)
        lines.append(f"| {r['setting']} | " + " | ".join(f"{g[t]:.3f}" for t in names) + " |")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["setting", "changes", "seen_every", "fold", "task", "method", "ppl", "ppl_std", "bpc", "gap",
                     "gap_std"])
    for r in results:
        for name, row in r["tasks"].items():
            for method, m in row["methods"].items():
                writer.writerow([r["setting"], json.dumps(r["changes"]), r["seen_every"], row["fold"], name, method,
                                 m["ppl"], m["ppl_std"], m["bpc"], m["gap"], m["gap_std"]])
    return "\n".join(lines) + "\n", buf.getvalue()


def main(args: list[str] | None = None) -> list[dict]:
    """Parse the config (the openworld YAML, whose CLI has a section for each of ``openworld.SWEEPS``;
    ``--sweep`` picks one) and sweep."""
    from icm_lora.openworld import run_with_cli

    argv = list(sys.argv[1:] if args is None else args)
    return run_with_cli(lambda cli: Sweep(cli, argv), "icm_lora generator_sweep", (GeneratorSweepError,), argv)


if __name__ == "__main__":
    main()
