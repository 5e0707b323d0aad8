"""The fusion table: ICM-Fusion against the merges users pick today, on sets of zoo tasks.

    python -m icm_lora.fusion_bench --config experiments/fusion.yaml --ckpt_path .../best.ckpt

For each set of tasks (``fusion_bench.sets``: pairs, sets of 4 across families and within one, 8,
all), every method fuses the tasks' adapters into one, which is scored on each task's text:

- ICM-Fusion's latent rules (``fusion_bench.fusions``: label -> grid of ``fusion.*`` settings);
- the data-free merges of the tasks' own LoRAs (``fusion_bench.merges``: method -> grid of ``merge.*``
  settings), PEFT's ``add_weighted_adapter`` types among them;
- LoraHub (``fusion_bench.lorahub``: grid of ``lorahub.*`` settings): their weighted sum, the weights
  fitted gradient-free on the tasks' demonstrations;
- a LoRA trained on the union of the set's training text (``union_steps`` per task, capped at
  ``union_max_steps``), the reference a data-free method tries to approach;
- each task's own LoRA (the per-task ceiling) and the base model.

A set with a ``tail`` is the long-tail case: in a copy of the zoo, that task's LoRA is trained on
``tail_share`` of its training text (about 1%), and every method, ICM-Fusion's generator (fit on that
zoo) included, works from that LoRA; retention is still measured against the LoRA it would have with
all its text, and the table shows the tail task apart from the others.

Retention of a task is the share of its own LoRA's gain over the base model, in NLL per token, that
the fused adapter keeps (1: all of it, 0: none, negative: worse than the base model); pooled
retention is the set's summed gain over its own LoRAs' summed gain, which stays stable where one
task's own LoRA gains little on a short text. Every method's settings are chosen by pooled
retention on the tasks' validation text (the first setting of a grid is the method's default; each
grid is the same size for every method, ICM-Fusion's included), and reported on their test text, at
its defaults and tuned. Without ICM-Fusion rows no generator is needed. Sets resume method by
method: each method's rows are kept in ``<output>_runs/<set>.json`` under its grid, so a method added
or changed in the config is the only one scored again. Writes ``<output>.md`` and ``<output>.csv``.
"""

from __future__ import annotations

import copy
import csv
import io
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from icm_lora import base, files, hardware
from icm_lora.baselines import gap_closed
from icm_lora.cli import Trainer
from icm_lora.data import ZooDataModule
from icm_lora.evaluate import LiveAdapter, Score, TextScorer
from icm_lora.fuse import FuseCLI, FusionSet, load_generator, merge_flats, run_icm_fusion, run_lorahub
from icm_lora.fusion import FusionError, FusionSpec
from icm_lora.lorahub import LoraHubSpec
from icm_lora.merge import MergeSpec, delta_weights, factorize, module_names, pad_into
from icm_lora.openworld import forget_other_settings, generator_key
from icm_lora.system import ICMLoRA
from icm_lora.tasks import Task, slug
from icm_lora.zoo import LoRASpec, Zoo, copy_zoo, lora_layout
from icm_lora.zoo_build import build

LORAHUB = "LoraHub (weights fitted on demonstrations)"


def resolve_scale(value: Any, size: int) -> float:
    """A number, or ``T^p`` for (set size) ** p."""
    if isinstance(value, str) and value.startswith("T^"):
        return float(size) ** float(value[2:])
    return float(value)


def with_scale(settings: dict, size: int) -> dict:
    """A method's settings with their ``scale`` (a number or ``T^p``; default 1) resolved for ``size`` tasks."""
    return settings | {"scale": resolve_scale(settings.get("scale", 1.0), size)}


def retention(score: Score, base_score: Score, own: Score) -> float:
    return gap_closed(score.nll / score.tokens, base_score.nll / base_score.tokens, own.nll / own.tokens)


def per_token(score: Score) -> float:
    return score.nll / score.tokens


def pooled(per_task: dict) -> float:
    """The set's gain over the base model as a share of its own LoRAs' gain (NLL per token summed over
    tasks): stable where one task's own LoRA gains little, which makes its own retention ratio explode."""
    return sum(v["gain"] for v in per_task.values()) / sum(v["own_gain"] for v in per_task.values())


class Bench:
    """Runs the benchmark from a parsed ``FuseCLI`` (``run=False``); without ``--ckpt_path`` it first fits the
    config's generator on every zoo task (under ``<output>_runs/generator``).

    Args:
        ceiling: the zoo whose LoRAs are each task's own (retention's 1); default: the config's zoo.
    """

    def __init__(self, cli: FuseCLI, ceiling: Zoo | None = None) -> None:
        self.cli, self.spec = cli, cli.config_init["fusion_bench"]
        self.out = Path(self.spec.output)
        self.runs = self.out.parent / f"{self.out.name}_runs"
        # A generator is fit for ICM-Fusion's rows of the sets run here (a long-tail set's bench fits its own).
        wanted = self.spec.fusions and (ceiling is not None or any(not s.tail for s in self.spec.sets))
        self.ckpt_path = cli.config.ckpt_path or (self.train_generator() if wanted else None)
        self.dm: ZooDataModule = cli.datamodule
        self.dm.setup("predict")
        self.tasks = {t.name: t for t in self.dm.tasks}
        self.system = load_generator(cli.model, self.ckpt_path) if self.ckpt_path else None
        shapes = {seg.name: seg.shape for seg in self.dm.layout.segments}
        # Full rank of the widest module: exact for any merged update (TIES on ΔW is full rank).
        self.rank = max(min(shapes[m + ".lora_B.weight"][0], shapes[m + ".lora_A.weight"][1])
                        for m in module_names(self.dm.layout))
        ev = cli.config.eval
        config = base.load_config(self.dm.base_model, self.dm.cache_dir)
        scoring, self.tokenizer = base.load(self.dm.base_model, self.dm.cache_dir)
        wide = LoRASpec(r=self.rank, lora_alpha=self.rank, target_modules=list(self.dm.lora.target_modules),
                        layers_to_transform=self.dm.lora.layers_to_transform)
        self.wide_layout = lora_layout(config, wide)  # every adapter is scored as rank-`rank` factors, scaling 1
        self.live = LiveAdapter(scoring.to(self.dm.device), wide.peft_config(), self.wide_layout)
        self.scorer = TextScorer(self.live.model, self.tokenizer, ev.block_size, ev.batch_size, ev.precision)
        zoo_model, _ = base.load(self.dm.base_model, self.dm.cache_dir)  # the zoo's structure: PEFT merges, demos
        self.zoo_model = zoo_model.to(self.dm.device)
        self.zoo_live = LiveAdapter(self.zoo_model, self.dm.lora.peft_config(), self.dm.layout)
        self.precision = hardware.resolve_precision(ev.precision, self.dm.device)
        self._scores: dict[str, dict] = {}  # task -> split -> base / own -> Score
        self._bare = None  # the base model the union LoRAs are trained on, loaded at the first union
        self.ceiling = ceiling or self.dm.zoo
        self._tails: dict[str, Bench] = {}

    def train_generator(self) -> str:
        """The F-VAE: the config's generator fit on every zoo task (reused when trained with the same
        settings, resumed when interrupted); returns its checkpoint chosen on validation."""
        folder = self.runs / "generator" / "fit"  # the logger's run folder: checkpoints/ under it
        cfg = copy.deepcopy(self.cli.config)
        cfg.trainer.default_root_dir = str(folder)
        cfg.trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                              "init_args": {"save_dir": str(self.runs), "name": "generator", "version": "fit"}}
        key = generator_key(cfg)
        forget_other_settings(folder, key)
        done = folder / "done.json"
        best = files.read_json(done)["best"] if done.exists() else None
        if best and Path(best).exists():  # else never fit, or its checkpoint was removed: fit again
            return best
        self.cli.config = cfg
        self.cli.__dict__.pop("config_dump", None)
        L.seed_everything(int(cfg.seed_everything or 0))
        self.cli.instantiate_classes()
        files.write_json(folder / "generator.json", {"key": key})
        resume = folder / "checkpoints" / "resume.ckpt"
        trainer = self.cli.trainer
        trainer.fit(self.cli.model, datamodule=self.cli.datamodule, ckpt_path=str(resume) if resume.exists() else None)
        if trainer.interrupted:
            raise KeyboardInterrupt
        selector = next(c for c in trainer.checkpoint_callbacks if c.monitor)
        best = selector.best_model_path or selector.last_model_path
        if not best:
            raise FusionError("the generator saved no checkpoint; check trainer.max_epochs and check_val_every_n_epoch")
        files.write_json(done, {"best": best, "key": key})
        return best

    def members(self, s: FusionSet) -> list[str]:
        names = self.dm.task_names if s.tasks == ["all"] else s.tasks
        unknown = [n for n in names if n not in self.dm.task_names]
        if unknown:
            raise FusionError(f"fusion_bench set {s.name!r}: {unknown} are not zoo tasks")
        if s.tail is not None and s.tail not in names:
            raise FusionError(f"fusion_bench set {s.name!r}: its tail {s.tail!r} is not one of its tasks")
        return list(names)

    def tail_bench(self, task: str) -> Bench:
        """This benchmark on a copy of the zoo where ``task``'s LoRA is trained on ``tail_share`` of its
        training text (built here), its generator fit on that zoo; retention against this zoo's LoRAs."""
        if task not in self._tails:
            chars = max(1, round(self.spec.tail_share * self.dm.text.train_chars))
            folder = self.runs / f"tail-{slug(task)}-{chars}chars"
            cfg = copy.deepcopy(self.cli.config)
            for spec in cfg.data.tasks:
                if spec.name == task:
                    spec.train_chars = chars
            cfg.data.zoo_dir, cfg.ckpt_path = str(folder / "zoo"), None
            cfg.fusion_bench.output, cfg.fusion_bench.sets = str(folder / "fusion"), []
            copy_zoo(self.dm.zoo_dir, folder / "zoo")
            cli = FuseCLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False, args=cfg,
                          save_config_callback=None, parser_kwargs={"prog": "python -m icm_lora.fusion_bench"})
            print(f"long-tail case: {task}'s LoRA on {chars:,} characters of its text, in {folder / 'zoo'}", flush=True)
            cli.datamodule.build()  # the tail's LoRA and condition; the other tasks' are the copied ones
            self._tails[task] = Bench(cli, ceiling=self.dm.zoo)
        return self._tails[task]

    # ---- adapters -> scores ---------------------------------------------------------------------
    def widen(self, adapter: Tensor | dict[str, Tensor]) -> Tensor:
        """A zoo-layout flat LoRA or a per-module ΔW -> the scorer's rank-``rank`` flat vector (exact)."""
        deltas = delta_weights(adapter, self.dm.layout, self.dm.lora) if isinstance(adapter, Tensor) else adapter
        state, rank = factorize(deltas)
        if rank > self.rank:
            raise FusionError(f"a fused update of rank {rank} exceeds the scorer's rank {self.rank}")
        return pad_into(state, self.wide_layout)

    def score(self, wide: Tensor | None, name: str, split: str) -> Score:
        """One task's score on its ``split`` text with a widened adapter (None: the base model)."""
        task = self.tasks[name]
        with self.live.use(wide):
            return self.scorer.score(task.val if split == "val" else task.test)

    def reference(self, names: list[str]) -> dict:
        """split -> base / own -> task -> Score (each computed once per process)."""
        for n in names:
            if n not in self._scores:
                own = self.widen(self.ceiling.final(n))
                self._scores[n] = {split: {"base": self.score(None, n, split), "own": self.score(own, n, split)}
                                   for split in ("val", "test")}
        return {split: {who: {n: self._scores[n][split][who] for n in names} for who in ("base", "own")}
                for split in ("val", "test")}

    def evaluate(self, adapter, names: list[str], split: str, reference: dict) -> dict:
        """Per task retention, ppl and bpc of one fused adapter on ``split`` text."""
        wide = self.widen(adapter)
        per_task = {}
        for n in names:
            s = self.score(wide, n, split)
            per_task[n] = self.entry(s, reference[split]["base"][n], reference[split]["own"][n])
        return per_task

    @staticmethod
    def entry(s: Score, base_score: Score, own: Score) -> dict:
        return {"retention": retention(s, base_score, own), "ppl": s.ppl, "bpc": s.bpc,
                "gain": per_token(base_score) - per_token(s), "own_gain": per_token(base_score) - per_token(own)}

    # ---- methods ---------------------------------------------------------------------------------
    def fused(self, names: list[str], settings: dict) -> Tensor:
        settings = with_scale(settings, len(names))
        if "anchor_merge" in settings:  # the anchor's lambda may be T^p too
            settings["anchor_merge"] = with_scale(settings["anchor_merge"], len(names))
        spec = FusionSpec(**settings)
        return run_icm_fusion(self.dm, self.system, names, spec, self.zoo_live, self.tokenizer, self.live)[1]

    def merged(self, names: list[str], method: str, settings: dict) -> dict[str, Tensor]:
        spec = MergeSpec(method=method, **with_scale(settings, len(names)))
        return merge_flats(self.dm, [self.dm.zoo.final(n) for n in names], spec, self.zoo_live.model)

    def lorahubbed(self, names: list[str], settings: dict) -> dict[str, Tensor]:
        """LoraHub's ΔW, its weights fitted on the demonstrations through the scorer's wide adapter."""
        return run_lorahub(self.dm, names, LoraHubSpec(**settings), self.live, self.tokenizer)[1]

    def union(self, s: FusionSet, names: list[str]) -> Tensor:
        """A LoRA trained on the union of the set's training text (built once, kept under the zoo)."""
        steps = min(self.spec.union_steps * len(names), self.spec.union_max_steps)
        task = Task(f"union-{slug(s.name)}-{steps}steps", "", [d for n in names for d in self.tasks[n].train],
                    "\n\n".join(self.tasks[n].val for n in names), "", [])
        sources = self.dm.sources()
        source = {"task": {"union_of": {n: sources[n]["task"] for n in names}}, "text": asdict(self.dm.text)}
        root = self.dm.zoo_dir / "union"
        if self._bare is None:  # a bare copy (the scorers' copies are wrapped in PEFT); build hands it back bare
            self._bare = base.load(self.dm.base_model, self.dm.cache_dir)[0].to(self.dm.device)
        build(root, self._bare, self.tokenizer, self.dm.base_model, [task], [source], self.dm.lora,
              replace(self.dm.training, steps=steps, num_checkpoints=1, checkpoint_every=1),
              eval_block_size=self.cli.config.eval.block_size)
        return Zoo(root).final(task.name)

    # ---- one set -----------------------------------------------------------------------------------
    def candidates(self, names: list[str]) -> list[tuple[str, str, list[dict], Any]]:
        """(label, family, grid of settings, settings -> adapter) of every method the config lists."""
        out: list[tuple[str, str, list[dict], Any]] = []
        for label, grid in self.spec.fusions.items():
            out.append((label, "ICM-Fusion", grid, lambda st, n=names: self.fused(n, st)))
        for method, grid in self.spec.merges.items():
            out.append((method, "merge", grid, lambda st, m=method, n=names: self.merged(n, m, st)))
        if self.spec.lorahub:
            out.append((LORAHUB, "merge", self.spec.lorahub, lambda st, n=names: self.lorahubbed(n, st)))
        return out

    def run_set(self, s: FusionSet, saved: dict | None = None, save=lambda saved: None) -> list[dict]:
        """The set's rows. ``saved`` holds rows already scored: each method's under its grid (kept while
        the grid is unchanged) and the references (kept while the union LoRA's settings are). ``save``
        is called after each method, so an interrupted set resumes at the method it stopped in, and a
        method added to the config is the only one scored."""
        saved = saved if saved is not None else {}
        methods = saved.setdefault("methods", {})
        names = self.members(s)
        reference = self.reference(names)
        rows = []
        for label, family, grid, make in self.candidates(names):
            if methods.get(label, {}).get("grid") == grid:
                rows += methods[label]["rows"]
                continue
            start = time.time()
            adapters = [make(st) for st in grid or [{}]]  # each setting's adapter, made once for val and test
            val = [self.evaluate(a, names, "val", reference) for a in adapters]
            means = [pooled(v) for v in val]  # selection: pooled retention on validation text
            best = max(range(len(val)), key=lambda i: means[i])
            chosen = {"defaults": 0, "tuned": best}
            tests = {i: self.evaluate(adapters[i], names, "test", reference) for i in set(chosen.values())}
            mine = [self.row(s, names, label, family, which, (grid or [{}])[i], tests[i], means[i], time.time() - start)
                    for which, i in chosen.items()]
            print(f"  {label}: validation pooled retention {', '.join(f'{m:.3f}' for m in means)}; test "
                  f"{mine[-1]['mean_retention']:.3f} (tuned) ({time.time() - start:.0f} s)", flush=True)
            methods[label] = {"grid": grid, "rows": mine}
            save(saved)
            rows += mine
        union = {"union_steps": self.spec.union_steps, "union_max_steps": self.spec.union_max_steps}
        if "references" not in saved or saved.get("union") != union:
            saved["references"], saved["union"] = self.references(s, names, reference), union
            save(saved)
        return rows + saved["references"]

    def references(self, s: FusionSet, names: list[str], reference: dict) -> list[dict]:
        """The union LoRA's row (when ``union_steps``), each task's own LoRA's, and the base model's."""
        rows = []
        if self.spec.union_steps:
            start = time.time()
            flat = self.union(s, names)
            rows.append(self.row(s, names, "union LoRA (trained on the set's text)", "reference", "-", {},
                                 self.evaluate(flat, names, "test", reference), float("nan"),
                                 time.time() - start))
        test = reference["test"]
        own_test = {n: self.entry(test["own"][n], test["base"][n], test["own"][n]) for n in names}
        base_test = {n: self.entry(test["base"][n], test["base"][n], test["own"][n]) for n in names}
        rows.append(self.row(s, names, "own LoRA per task (ceiling)", "reference", "-", {}, own_test, 1.0, 0.0))
        if self.ceiling is not self.dm.zoo:  # the long-tail case: each task's LoRA as the methods got it
            got = {n: self.entry(self.score(self.widen(self.dm.zoo.final(n)), n, "test"), test["base"][n], test["own"][n])
                   for n in names}
            rows.append(self.row(s, names, "own LoRA per task, as fused (the tail's on little text)", "reference", "-",
                                 {}, got, float("nan"), 0.0))
        rows.append(self.row(s, names, "base model", "reference", "-", {}, base_test, 0.0, 0.0))
        return rows

    @staticmethod
    def row(s: FusionSet, names: list[str], label: str, family: str, which: str, settings: dict, per_task: dict,
            val_pooled: float, seconds: float) -> dict:
        ret = [per_task[n]["retention"] for n in names]
        worst = min(range(len(names)), key=lambda i: ret[i])
        return {"set": s.name, "kind": s.kind, "size": len(names), "method": label, "family": family,
                "chosen": which, "settings": settings, "val_pooled_retention": val_pooled,
                "mean_retention": statistics.fmean(ret), "pooled_retention": pooled(per_task), "worst_retention": ret[worst], "worst_task": names[worst],
                "mean_ppl": statistics.fmean(per_task[n]["ppl"] for n in names),
                "mean_bpc": statistics.fmean(per_task[n]["bpc"] for n in names),
                "per_task": {n: per_task[n]["retention"] for n in names}, "seconds": seconds, "tail": s.tail or ""}

    # ---- the whole benchmark ------------------------------------------------------------------------
    def run(self) -> list[dict]:
        rows = []
        for s in self.spec.sets:
            path = self.runs / f"{slug(s.name)}.json"
            names = self.members(s)
            bench = self.tail_bench(s.tail) if s.tail else self
            key = {"tasks": names, "selection": "pooled", "checkpoint": str(bench.ckpt_path)}
            if s.tail:
                key |= {"tail": s.tail, "tail_share": self.spec.tail_share, "ceiling": self.contents(names)}
            key["contents"] = bench.contents(names)
            saved = upgrade(files.read_json(path)) if path.exists() else {}
            if saved.get("key") != key:
                saved = {"key": key}
            print(f"fusion set {s.name} ({len(names)} tasks{f', tail {s.tail}' if s.tail else ''}) ...", flush=True)
            rows += bench.run_set(s, saved, lambda done, p=path: files.write_json(p, done))
            self.write(rows)
        return rows

    def contents(self, tasks: list[str]) -> dict[str, str]:
        """Hashes of the bytes a set's rows come from: its tasks' zoo shards and the generator's checkpoint.
        A set's saved rows are reused only when these are unchanged, so a rebuilt zoo or a newly trained
        generator (a fresh clone's, at the same path) is scored again instead of showing older rows."""
        if not hasattr(self, "_hashes"):
            self._hashes = {"checkpoint": files.file_hash(self.ckpt_path) if self.ckpt_path else None}
        for t in tasks:
            if t not in self._hashes:
                self._hashes[t] = files.file_hash(self.dm.zoo.shard_path(t))
        return {k: self._hashes[k] for k in ("checkpoint", *tasks)}

    def write(self, rows: list[dict]) -> None:
        markdown, table = format_tables(rows, self.hardware())
        files.write_text(self.out.with_suffix(".md"), markdown)
        files.write_text(self.out.with_suffix(".csv"), table)
        print(markdown)

    def hardware(self) -> str:
        tails = "".join(f"; long-tail case `{t}`: generator {b.ckpt_path or 'none'}" for t, b in self._tails.items())
        return (f"Hardware: {hardware.describe(self.dm.device)}, scoring {self.precision}; generator "
                f"{self.ckpt_path or ('none' if tails else 'none (no ICM-Fusion rows)')}{tails}")


def upgrade(saved: dict) -> dict:
    """A set's saved rows in an older format -> the current one, so a grid that is unchanged is not
    scored again: the union LoRA's settings once sat in the key, and before that one key covered every
    method's grid over one list of rows."""
    if "union_steps" not in saved.get("key", {}):
        return saved
    key = dict(saved["key"])
    union = {k: key.pop(k, None) for k in ("union_steps", "union_max_steps")}
    if "rows" in saved:
        grids = key.pop("fusions", {}) | key.pop("merges", {}) | ({LORAHUB: key.pop("lorahub")} if "lorahub" in key else {})
        saved = {"methods": {label: {"grid": grid, "rows": [r for r in saved["rows"] if r["method"] == label]}
                             for label, grid in grids.items()},
                 "references": [r for r in saved["rows"] if r["family"] == "reference"]}
    return saved | {"key": key, "union": union}


def format_tables(rows: list[dict], header: str) -> tuple[str, str]:
    """Markdown (a summary by set size, then every set) and CSV (one row per set, method and choice)."""
    lines = [f"# Fusion: one adapter for several tasks\n\n{header}\n",
             "Retention: the share of each task's own-LoRA gain over the base model (NLL per token, test text) "
             "that the fused adapter keeps; pooled: the set's summed gain over its own LoRAs' summed gain. "
             "Settings chosen by pooled retention on validation text (`tuned`, 3 settings per method) or the "
             "method's defaults (the first setting).\n"]
    whole = [r for r in rows if not r.get("tail")]  # the long-tail sets have a section of their own
    sizes = sorted({r["size"] for r in whole})
    methods = list(dict.fromkeys(r["method"] for r in whole))
    if whole:
        lines += ["## Mean retention by set size (tuned; mean over sets, worst task in brackets)\n",
                  "| method | " + " | ".join(f"{k} tasks" for k in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m in methods:
        cells = []
        for k in sizes:
            picked = [r for r in whole if r["method"] == m and r["size"] == k and r["chosen"] in ("tuned", "-")]
            cells.append(f"{statistics.fmean(r['mean_retention'] for r in picked):.2f} "
                         f"({statistics.fmean(r['worst_retention'] for r in picked):.2f})" if picked else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += long_tail_lines([r for r in rows if r.get("tail")])
    for name in dict.fromkeys(r["set"] for r in rows):
        part = [r for r in rows if r["set"] == name]
        lines += [f"\n## {name} ({part[0]['kind']}, {part[0]['size']} tasks)\n",
                  "| method | chosen | settings | val pooled ret. | mean ret. | worst ret. (task) | pooled ret. | "
                  "mean ppl | mean bpc |", "|---|---|---|---|---|---|---|---|---|"]
        for r in part:
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
            lines.append(f"| {r['method']} | {r['chosen']} | {settings} | {r['val_pooled_retention']:.2f} | "
                         f"{r['mean_retention']:.2f} | {r['worst_retention']:.2f} ({r['worst_task']}) | "
                         f"{r['pooled_retention']:.2f} | "
                         f"{r['mean_ppl']:.2f} | {r['mean_bpc']:.3f} |")
    buf = io.StringIO()
    fields = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "per_task"] + ["per_task"]  # older rows lack some
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow(r | {"settings": repr(r["settings"]), "per_task": repr(r["per_task"])})
    return "\n".join(lines) + "\n", buf.getvalue()


def long_tail_lines(rows: list[dict]) -> list[str]:
    """Markdown, per long-tail set: each method's retention of the tail task and of the others (tuned)."""
    lines = []
    for name in dict.fromkeys(r["set"] for r in rows):
        part = [r for r in rows if r["set"] == name and r["chosen"] in ("tuned", "-")]
        tail = part[0]["tail"]
        lines += [f"\n## Long-tail case: {name} (the LoRA of `{tail}` trained on little of its text; retention "
                  "against its LoRA on all of it; tuned)\n",
                  f"| method | {tail} (tail) | others, mean | others, worst |", "|---|---|---|---|"]
        for r in part:
            others = [v for k, v in r["per_task"].items() if k != tail]
            lines.append(f"| {r['method']} | {r['per_task'][tail]:.2f} | {statistics.fmean(others):.2f} | "
                         f"{min(others):.2f} |")
    return lines


def main(args: list[str] | None = None) -> list[dict]:
    cli = FuseCLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False, args=args,
                         save_config_callback=None, parser_kwargs={"prog": "python -m icm_lora.fusion_bench"})
    try:
        return Bench(cli).run()
    except FusionError as err:
        raise SystemExit(f"icm_lora.fusion_bench: {err}") from None


if __name__ == "__main__":
    main()
