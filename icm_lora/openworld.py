"""``make openworld``: adapters for tasks nobody trained, against every baseline a user would pick.

    python -m icm_lora.openworld --config experiments/openworld.yaml

Leave-tasks-out over the zoo's tasks. The zoo (every task's own LoRA) and the conditions are built
once. Each fold then trains a generator per condition kind on its *seen* tasks only: a DataModule
over the seen tasks, so the LoRAs it reads, the normalisation and the condition scaling are the
seen tasks' alone, and checkpoints are chosen on the seen tasks' validation text. Each held-out task
is then scored on its own text with:

- the base model; the soup of the seen experts; the nearest seen expert by task vector and by
  description embedding; the top-K similarity-weighted mean of the seen experts;
- a multi-task LoRA trained on the union of the seen tasks' training text (its token budget is in
  the table; ``budget_fold`` shows it at every budget of ``multitask_steps``, each a checkpoint of
  one run of the largest);
- the oracle, the held-out task's own LoRA (from the zoo, used for scoring only);
- ICM-LoRA from the task's demonstrations and from its description (mean ± std over samples, and
  the z = 0 decode);
- SG-LoRA from its description (kind ``semantic``: samples z ~ p(z | c) and the prior's mean), and
  what it is built from: mu*, the top-K similarity-weighted mean of the experts' parameter means
  (SG-LoRA without its generator), and AdapterSoup, the uniform mean of the same top-K experts;
- controls: the task decoded from another task's demonstrations, from a random-character
  description, and (SG-LoRA) from another task's description; whether ``predict`` would refuse
  each description as far from every expert is recorded.

Validation folds (``role: validation``) are scored on their held-out tasks' validation text and
choose the top-K baseline's K and temperature; they train no generator and no multi-task LoRA,
which that choice does not read (``python -m icm_lora.generator_sweep`` trains the generators of the
same folds to choose the generator's settings). Test folds are scored on test text and reported.
Folds resume: a fold's finished generator is reused, an interrupted one resumes from its last epoch;
one trained with other settings than the config's is trained again.
Writes ``<output>.md``, ``<output>.csv``, ``<output>.png`` and one TensorBoard run per fold and kind
under ``<output>_runs/`` (conditions in the embedding projector, labelled by family; the figure).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from icm_lora import base, baselines, files, hardware, semantic
from icm_lora.base import Unreachable
from icm_lora.callbacks import content_digest
from icm_lora.cli import ICMLoRACLI, Trainer
from icm_lora.condition import KINDS as GENERATOR_KINDS
from icm_lora.condition import description_embeddings
from icm_lora.data import ZooDataModule
from icm_lora.evaluate import LiveAdapter, Score, TextScorer
from icm_lora.generator_sweep import GeneratorSweep
from icm_lora.lora_sweep import LoRASweep
from icm_lora.system import DECODING_ARGS, ICMLoRA
from icm_lora.tasks import Task, fingerprint, slug
from icm_lora.zoo import Zoo, ZooMismatch
from icm_lora.zoo_build import build

KINDS = ("task_vector", "description")  # the stored conditions every fold's baselines read
SG_LORA = "SG-LoRA (description)"
MAX_SNAPSHOTS = 64  # checkpoints one multi-task run may keep to give every budget of multitask_steps
# python -m icm_lora.generator_sweep --sweep <section>: the YAML sections it can run
SWEEPS = ("generator_sweep", "generator_sweep_dense", "generator_sweep_mixup", "sg_lora_sweep", "sg_lora_sweep_mixup",
          "sg_lora_sweep_correction", "sg_lora_sweep_dropout", "generator_sweep_schedule")


class OpenWorldError(ValueError):
    """A benchmark configuration that cannot be run (a fold naming an unknown task, a task in no family...)."""


@dataclass
class Fold:
    """Tasks held out together.

    Args:
        name: the fold's name (used in file and run names).
        held_out: tasks whose LoRA, text and statistics the fold's generator never sees.
        role: ``validation`` (chooses settings, scored on validation text) or ``test`` (reported).
    """

    name: str
    held_out: list[str]
    role: str = "test"


@dataclass
class OpenWorld:
    """The leave-tasks-out protocol.

    Args:
        families: family name -> its tasks; every task of ``data.tasks`` is in exactly one.
        folds: the folds, written out so that runs are reproducible.
        kinds: condition kinds to train a generator for in each fold (``task_vector``: ICM-LoRA from
            demonstrations; ``description``: from the task's description; ``semantic``: SG-LoRA).
        kind_changes: per kind, config changes by dotted key for its generator only, e.g.
            ``{semantic: {model.generator: sg_lora, model.kl_weight: 1.0}}``.
        num_samples: generated adapters per held-out task and kind (mean ± std reported).
        top_k: values of K tried for the top-K weighted mean on the validation folds.
        temperatures: softmax temperatures tried with them.
        multitask_steps: training steps of the multi-task LoRA (the zoo's batch and block size); the
            first is scored in every fold, all of them in ``budget_fold``.
        budget_fold: the fold that shows the multi-task LoRA at every budget (default: the first test fold).
        random_description_chars: length of the random-character description of the control.
        validate_generators: score every seen task's decode on its validation text after the
            validated epochs and keep the best (``trainer.check_val_every_n_epoch``); off, a fold's
            generator is the state after ``trainer.max_epochs``, a schedule chosen on the validation
            folds (``generator_sweep``), and the seen-task scoring is skipped.
        output: path stem of the table, CSV and figure; runs go to ``<output>_runs/``.
    """

    families: dict[str, list[str]] = field(default_factory=dict)
    folds: list[Fold] = field(default_factory=list)
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    kind_changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 3
    top_k: list[int] = field(default_factory=lambda: [1, 3, 5])
    temperatures: list[float] = field(default_factory=lambda: [0.05, 0.2])
    multitask_steps: list[int] = field(default_factory=lambda: [64])
    budget_fold: str | None = None
    random_description_chars: int = 60
    validate_generators: bool = True
    output: str = "results/openworld"


class OpenWorldCLI(ICMLoRACLI):
    """The project's CLI with an ``openworld`` section (and the sweeps that chose the zoo's and the
    generator's settings: ``python -m icm_lora.lora_sweep`` and ``python -m icm_lora.generator_sweep``);
    it parses and builds, the benchmark runs."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(OpenWorld, "openworld")
        parser.add_class_arguments(LoRASweep, "lora_sweep")
        for section in SWEEPS:
            parser.add_class_arguments(GeneratorSweep, section)
        parser.add_argument("--sweep", type=Literal[SWEEPS], default="generator_sweep",
                            help="python -m icm_lora.generator_sweep: the section to run (" + ", ".join(SWEEPS) + ")")


def check(spec: OpenWorld, names: list[str]) -> None:
    """Every task in one family, folds over known tasks, a seen task left in every fold."""
    if not spec.folds:
        raise OpenWorldError("openworld.folds is empty")
    family_of = {}
    for family, tasks in spec.families.items():
        for t in tasks:
            if t in family_of:
                raise OpenWorldError(f"task {t!r} is in two families: {family_of[t]!r} and {family!r}")
            family_of[t] = family
    if set(family_of) != set(names):
        missing, unknown = sorted(set(names) - set(family_of)), sorted(set(family_of) - set(names))
        raise OpenWorldError(f"openworld.families must cover data.tasks exactly (in no family: {missing}; "
                             f"not a task: {unknown})")
    if len({f.name for f in spec.folds}) != len(spec.folds):
        raise OpenWorldError("fold names must be unique")
    for fold in spec.folds:
        unknown = sorted(set(fold.held_out) - set(names))
        if unknown or not fold.held_out:
            raise OpenWorldError(f"fold {fold.name!r}: held_out must name tasks of data.tasks (unknown: {unknown})")
        if len(set(names) - set(fold.held_out)) < 2:
            raise OpenWorldError(f"fold {fold.name!r} leaves fewer than 2 seen tasks to train a generator on")
        if fold.role not in ("validation", "test"):
            raise OpenWorldError(f"fold {fold.name!r}: role must be 'validation' or 'test', got {fold.role!r}")
    if not any(f.role == "test" for f in spec.folds):
        raise OpenWorldError("no fold has role 'test': nothing would be reported")
    if bad := sorted(set(spec.kinds) - set(GENERATOR_KINDS)):
        raise OpenWorldError(f"openworld.kinds: unknown {bad}; choose from {GENERATOR_KINDS}")
    if bad := sorted(set(spec.kind_changes) - set(spec.kinds)):
        raise OpenWorldError(f"openworld.kind_changes: {bad} not in openworld.kinds")
    if not spec.multitask_steps or min(spec.multitask_steps) < 1:
        raise OpenWorldError("openworld.multitask_steps needs at least one positive number of steps")
    snapshot_schedule(spec.multitask_steps)  # refused here, before anything is trained
    if spec.budget_fold is not None and spec.budget_fold not in {f.name for f in spec.folds if f.role == "test"}:
        raise OpenWorldError(f"openworld.budget_fold {spec.budget_fold!r} is not a test fold (validation folds "
                             "train no multi-task LoRA)")


class Benchmark:
    """Runs the protocol from a parsed ``OpenWorldCLI`` (``run=False``)."""

    def __init__(self, cli: OpenWorldCLI) -> None:
        self.cli, self.whole = cli, cli.datamodule
        self.spec: OpenWorld = cli.config_init["openworld"]
        self.names = [t.name for t in self.whole.task_specs]
        check(self.spec, self.names)
        self.family = {t: f for f, tasks in self.spec.families.items() for t in tasks}
        self.out = Path(self.spec.output)
        self.runs = self.out.parent / f"{self.out.name}_runs"
        self.seconds: dict[str, float] = {}  # this run's wall time per phase
        self.spent = self.runs / "phases.json"  # wall time per phase summed over every run, resumed ones included
        self.before: dict[str, float] = files.read_json(self.spent) if self.spent.exists() else {}
        self.config = copy.deepcopy(cli.config)
        self.overrides: dict[str, Any] = {}  # changes by dotted key over every kind's own (a sweep's setting)
        self._scores: dict[tuple[str | None, str], Score] = {}  # (adapter digest, text digest) -> its score

    # ---- phases -----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        start = time.time()
        with self.phase("zoo + conditions (all tasks)"):
            self.whole.setup("fit")  # every task's LoRA (the oracles included) and every task's conditions
        model, tokenizer = base.load(self.whole.base_model, self.whole.cache_dir)
        self.model, self.tokenizer = model.to(self.whole.device), tokenizer
        with self.phase("zoo on test (all tasks)"):
            self.zoo_rows = self.zoo_quality()
        rows, done = [], []
        for fold in self.spec.folds:
            rows += self.run_fold(fold)
            done.append(fold.name)
            if len(done) < len(self.spec.folds) and any(r["role"] == "test" for r in rows):
                self.finish(rows, start, done)  # a partial table after each fold, so a long run shows what it has
        return self.finish(rows, start, done)

    def finish(self, rows: list[dict], start: float, done: list[str]) -> list[dict]:
        """Finish the rows of the folds in ``done`` and write the table (marked partial until every fold is done)."""
        chosen = choose_top_k(rows, self.spec)
        rows = [finish_row(r, chosen) for r in rows]
        todo = [f.name for f in self.spec.folds if f.name not in done]
        self.write(rows, chosen, time.time() - start, todo)
        return rows

    def run_fold(self, fold: Fold) -> list[dict]:
        """A test fold's rows with every method; a validation fold's with the baselines that need no
        training, which is all that choosing the top-K mean's K and temperature reads."""
        seen = [n for n in self.names if n not in fold.held_out]
        generators, multitask = {}, {}
        if fold.role == "test":
            with self.phase(f"{fold.name}: generators"):
                generators = {kind: self.generator(fold, seen, kind) for kind in self.spec.kinds}
            with self.phase(f"{fold.name}: multi-task LoRA"):
                multitask = self.multitask(fold, seen)
        with self.phase(f"{fold.name}: scoring"):
            rows = [self.score(fold, seen, name, generators, multitask) for name in fold.held_out]
        return rows

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block into this run's phases and, even if it is interrupted, into the total over all runs."""
        start = time.time()
        try:
            yield
        finally:
            self.seconds[name] = time.time() - start
            files.write_json(self.spent, self.all_runs())

    def all_runs(self) -> dict[str, float]:
        """Wall time per phase over every run: the earlier runs' plus this run's."""
        return self.before | {k: self.before.get(k, 0.0) + v for k, v in self.seconds.items()}

    def generator(self, fold: Fold, seen: list[str], kind: str) -> tuple[ICMLoRA, ZooDataModule]:
        """The fold's generator for ``kind``, trained on the seen tasks (reused when already trained)."""
        folder = self.runs / fold.name / kind
        done = folder / "done.json"
        cfg = copy.deepcopy(self.config)
        cfg.data.tasks = [t for t in cfg.data.tasks if t.name in seen]
        cfg.data.condition.kind = kind
        for key, value in (self.spec.kind_changes.get(kind, {}) | self.overrides).items():
            cfg[key] = value
        if self.spec.validate_generators:
            check_schedule(cfg.trainer.max_epochs, cfg.trainer.check_val_every_n_epoch)
        else:
            cfg.trainer.limit_val_batches = 0  # in the key too: the checkpoint is no longer chosen
        cfg.trainer.default_root_dir = str(folder)
        cfg.trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                              "init_args": {"save_dir": str(self.runs), "name": fold.name, "version": kind}}
        self.cli.config = cfg
        self.cli.__dict__.pop("config_dump", None)  # Lightning saves the hparams from a dump it makes only once
        key = generator_key(cfg)
        L.seed_everything(int(self.config.seed_everything or 0))  # the same generator whatever ran before it
        self.cli.instantiate_classes()
        dm, model, trainer = self.cli.datamodule, self.cli.model, self.cli.trainer
        forget_other_settings(folder, key)
        decoding = {k: cfg.model[k] for k in DECODING_ARGS}  # not trained on: the config's values decode
        if done.exists():
            best = files.read_json(done)["best"]
            dm.setup("validate")
            return ICMLoRA.load_from_checkpoint(best, map_location="cpu", **decoding).eval(), dm
        files.write_json(folder / "generator.json", {"key": key})  # what the checkpoints below are trained with
        resume = folder / "checkpoints" / "resume.ckpt"  # an interrupted fit goes on from its last epoch
        start = time.time()
        trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume.exists() else None)
        if trainer.interrupted:
            raise KeyboardInterrupt
        best = self.fitted_checkpoint(trainer, resume)
        if not best:
            raise OpenWorldError(f"fold {fold.name!r} ({kind}): no checkpoint was saved; check trainer.max_epochs "
                                 "and trainer.check_val_every_n_epoch")
        self.projector(trainer, dm, fold)
        files.write_json(done, {"best": best, "seen": seen, "held_out": fold.held_out, "key": key,
                                "fit_seconds": time.time() - start})  # this run's part, if it resumed
        return ICMLoRA.load_from_checkpoint(best, map_location="cpu", **decoding).eval(), dm

    def fitted_checkpoint(self, trainer, resume: Path) -> str:
        """The generator a fit leaves: the checkpoint chosen on validation, or without validation the
        state after the last epoch (the resumption checkpoint, renamed so nothing resumes from it)."""
        if self.spec.validate_generators:
            selector = next(c for c in trainer.checkpoint_callbacks if c.monitor)
            return selector.best_model_path or selector.last_model_path
        if not resume.exists():
            return ""
        final = resume.with_name("final.ckpt")
        os.replace(resume, final)
        return str(final)

    def multitask(self, fold: Fold, seen: list[str]) -> dict[int, Tensor]:
        """steps -> (D,) a LoRA trained on the union of the seen tasks' training text (built once, cached).

        Every budget is a checkpoint of one run of the largest: the learning rate is constant after
        warm-up, so the LoRA after n steps of a longer run is the one an n-step run would give."""
        budget_fold = self.spec.budget_fold or next(f.name for f in self.spec.folds if f.role == "test")
        steps = self.spec.multitask_steps if fold.name == budget_fold else self.spec.multitask_steps[:1]
        every, kept = snapshot_schedule(steps)
        tasks = {t.name: t for t in self.whole.tasks}
        share = max(1, self.whole.text.val_chars // len(seen))  # its printed val ppl: as much text as one task's
        task = Task(f"multitask-{slug(fold.name)}-{max(steps)}steps", "", [d for n in seen for d in tasks[n].train],
                    "\n\n".join(tasks[n].val[:share] for n in seen), "", [])
        sources = self.whole.sources()
        source = {"task": {"union_of": {n: sources[n]["task"] for n in seen}}, "text": asdict(self.whole.text)}
        root = self.whole.zoo_dir / "multitask"
        build(root, self.model, self.tokenizer, self.whole.base_model, [task], [source], self.whole.lora,
              replace(self.whole.training, steps=max(steps), num_checkpoints=kept, checkpoint_every=every),
              eval_block_size=self.cli.config.eval.block_size)
        checkpoints = Zoo(root).checkpoints(task.name)  # (kept, D), the last after max(steps) steps
        return {n: checkpoints[kept - 1 - (max(steps) - n) // every] for n in steps}

    # ---- scoring ----------------------------------------------------------------------------
    def zoo_quality(self) -> list[dict]:
        """Per zoo task, on its test text: the base model, its own LoRA and the soup of all the zoo's LoRAs
        (does each LoRA learn something of its own, beyond what every task shares?)."""
        zoo = self.whole.zoo  # read by setup("fit") above
        soup = zoo.soup(self.names)
        rows = []
        for task in self.whole.tasks:
            scores = {method: self.scored(flat, task.test)
                      for method, flat in (("base", None), ("own LoRA", zoo.final(task.name)), ("soup", soup))}
            rows.append({"task": task.name, "family": self.family[task.name]} | {m: v.ppl for m, v in scores.items()}
                        | {f"{m} bpc": v.bpc for m, v in scores.items()})
        return rows

    def scored(self, flat: Tensor | None, text: str) -> Score:
        """``text`` scored with the adapter ``flat`` (None: the base model); a fixed adapter's score on a
        text is computed once (the zoo table's base and own LoRA are the held-out rows' base and oracle)."""
        key = (None if flat is None else content_digest(flat), content_digest(text.encode()))
        if key not in self._scores:
            live, scorer = self.scorer()
            with live.use(flat):
                self._scores[key] = scorer.score(text)
        return self._scores[key]

    def scorer(self) -> tuple[LiveAdapter, TextScorer]:
        if not hasattr(self, "_live"):
            ev = self.cli.config.eval
            model, _ = base.load(self.whole.base_model, self.whole.cache_dir)  # its own copy: the zoo builder
            model.to(self.whole.device)  # wraps and unwraps self.model
            self._live = LiveAdapter(model, self.whole.lora.peft_config(), self.whole.layout)
            self._scorer = TextScorer(self._live.model, self.tokenizer, ev.block_size, ev.batch_size, ev.precision)
        return self._live, self._scorer

    def score(self, fold: Fold, seen: list[str], name: str, generators: dict, multitask: dict[int, Tensor]) -> dict:
        """One held-out task's row: every method's NLL/token, ppl and bpc on the task's text."""
        task = next(t for t in self.whole.tasks if t.name == name)
        text = task.val if fold.role == "validation" else task.test
        zoo = self.whole.zoo if hasattr(self.whole, "zoo") else Zoo(self.whole.zoo_dir)
        experts = torch.stack([zoo.final(s) for s in seen])  # (E, D)
        raw = {kind: self.whole.raw_conditions(seen + [name], kind) for kind in KINDS}  # (E + 1, C)
        tv_sims = baselines.similarities(_centred(raw["task_vector"])[-1], _centred(raw["task_vector"])[:-1])
        desc_sims = baselines.similarities(raw["description"][-1], raw["description"][:-1])
        adapters: dict[str, Tensor | None] = {"base": None, "oracle": zoo.final(name), "soup": baselines.soup(experts),
                                              "nearest (task vector)": baselines.nearest(experts, tv_sims)[0],
                                              "nearest (description)": baselines.nearest(experts, desc_sims)[0]}
        for k, tau in itertools.product(self.spec.top_k, self.spec.temperatures):
            weights = baselines.top_k_weights(tv_sims, k, tau)
            adapters[f"top-{k} mean (t={tau:g})"] = baselines.weighted_mean(experts, weights)
        batch, block = self.whole.training.batch_size, self.whole.training.block_size
        for steps, flat in multitask.items():
            adapters[f"multi-task LoRA ({steps * batch * block:,} tokens)"] = flat
        other = self.other_task(fold, name)
        samples: dict[str, list[Tensor]] = {}
        torch.manual_seed(int(self.config.seed_everything or 0))
        refused: dict[str, bool] = {}
        for kind, (generator, dm) in generators.items():
            if kind == "semantic":
                refused = self.sg_lora(generator, dm, raw["description"], other, name, adapters, samples)
                continue
            own = self.condition(dm, kind, name, raw[kind][-1])
            samples[f"ICM-LoRA ({kind})"] = self.decode(generator, dm, own, self.spec.num_samples)
            adapters[f"ICM-LoRA ({kind}) z=0"] = self.decode(generator, dm, own, 0)[0]
            if kind == "task_vector":
                wrong = dm.scaler(self.whole.raw_conditions([other], kind)[0])
                adapters["control: another task's demonstrations"] = self.decode(generator, dm, wrong, 0)[0]
            else:
                text_ = baselines.random_description(self.spec.random_description_chars, seed=len(name))
                noise = self.condition(dm, kind, name, None, description=text_)
                adapters["control: random-character description"] = self.decode(generator, dm, noise, 0)[0]
        scores: dict[str, Score | list[Score]] = {method: self.scored(flat, text) for method, flat in adapters.items()}
        scores |= {method: [self.scored(flat, text) for flat in flats] for method, flats in samples.items()}
        return {"fold": fold.name, "role": fold.role, "task": name, "family": self.family[name],
                "seen_relatives": sum(self.family[s] == self.family[name] for s in seen),
                "nearest_tv": seen[int(tv_sims.argmax())], "nearest_desc": seen[int(desc_sims.argmax())],
                "other_task": other, "refused": refused, "scores": scores}

    def sg_lora(self, generator: ICMLoRA, dm: ZooDataModule, descriptions: Tensor, other: str, name: str,
                adapters: dict, samples: dict) -> dict[str, bool]:
        """SG-LoRA's rows for one held-out task (its description embedding is the last of the (E + 1, E)
        ``descriptions``): samples, the prior's mean, mu*, AdapterSoup of the same top K, and the controls.
        Returns which descriptions ``predict`` would refuse as far from every expert."""
        spec, d = dm.semantic, dm.lora_dim
        random_text = baselines.random_description(self.spec.random_description_chars, seed=len(name))
        queries = {"own": descriptions[-1], "other task's": self.whole.raw_conditions([other], "description")[0],
                   "random-character": description_embeddings([random_text], dm.condition.embedder)[0]}
        refused, conds, experts = {}, {}, {}
        for label, query in queries.items():
            conds[label], experts[label], best = semantic.prior_condition(query, dm.expert_keys, dm.expert_means,
                                                                          dm.expert_vars, spec)
            refused[label] = best < dm.threshold
        samples[SG_LORA] = self.decode(generator, dm, conds["own"], self.spec.num_samples)
        adapters[f"{SG_LORA} z=0"] = self.decode(generator, dm, conds["own"], 0)[0]
        adapters["mu* (top-K weighted by description)"] = dm.normalizer.denormalize(conds["own"][:d])
        adapters["AdapterSoup (top-K by description)"] = baselines.soup(  # the same top K, uniformly
            torch.stack([dm.zoo.final(dm.task_names[i]) for i in experts["own"]]))
        for label in ("other task's", "random-character"):
            adapters[f"control: SG-LoRA, {label} description"] = self.decode(generator, dm, conds[label], 0)[0]
        return refused

    def condition(self, dm: ZooDataModule, kind: str, name: str, raw: Tensor | None,
                  description: str | None = None) -> Tensor:
        """(C,) a held-out task's condition, scaled with the fold's (seen tasks') scaler."""
        if raw is None:  # a control: scored even where `predict` would refuse it as far from every expert
            return dm.description_condition(description, name, refuse_far=False)
        return dm.scaler(raw)

    @staticmethod
    def decode(generator: ICMLoRA, dm: ZooDataModule, condition: Tensor, num_samples: int) -> list[Tensor]:
        """``num_samples`` samples z ~ N(0, I) (0: the z = 0 decode) -> list of (D,) LoRAs."""
        with torch.no_grad():
            out = generator.generate(condition[None], max(1, num_samples), mean=num_samples == 0)[0]  # (S, D)
        return list(dm.normalizer.denormalize(out.cpu()))

    def other_task(self, fold: Fold, name: str) -> str:
        """Whose demonstrations the control uses: another held-out task of the fold from another family
        if there is one, else the next task (in data.tasks order) from another family."""
        others = [t for t in fold.held_out if t != name and self.family[t] != self.family[name]]
        if others:
            return others[0]
        i = self.names.index(name)
        ring = self.names[i + 1 :] + self.names[:i]
        return next((t for t in ring if self.family[t] != self.family[name]), ring[0])

    # ---- output -----------------------------------------------------------------------------
    def projector(self, trainer, dm: ZooDataModule, fold: Fold) -> None:
        """Every task's raw conditions in TensorBoard's embedding projector, labelled by family and role."""
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_embedding"):
            return
        labels = [[t, self.family[t], "held out" if t in fold.held_out else "seen"] for t in self.names]
        for kind in KINDS:
            experiment.add_embedding(self.whole.raw_conditions(self.names, kind), metadata=labels,
                                     metadata_header=["task", "family", "role"], tag=f"{kind}s", global_step=0)

    def write(self, rows: list[dict], chosen: dict, seconds: float, todo: list[str] | None = None) -> None:
        header = self.header(seconds)
        if todo:
            header = (f"**Partial**: written after the folds finished so far; still to run: {', '.join(todo)}. "
                      "The means below cover only the finished test folds.\n\n" + header)
        markdown, table = report(rows, chosen, header)
        markdown += zoo_table(getattr(self, "zoo_rows", []))
        files.write_text(self.out.with_suffix(".md"), markdown)
        files.write_text(self.out.with_suffix(".csv"), table)
        figure = gap_figure([r for r in rows if r["role"] == "test"])
        files.write_bytes(self.out.with_suffix(".png"), figure)
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.runs / "summary")) as writer:  # the table and figure beside the fold runs
            writer.add_text("openworld/table", markdown)
            writer.add_image("openworld/gap_closed", _png_to_chw(figure))
        print(f"\n{markdown}\nwritten to {self.out.with_suffix('.md')}, .csv and .png")

    def header(self, seconds: float) -> str:
        import peft
        import transformers

        device = self.whole.device
        total = self.all_runs()
        phases = "\n".join(f"| {k} | {total[k]:.0f} | {v:.0f} |" for k, v in self.seconds.items())
        return (f"Command: `{' '.join(['python -m icm_lora.openworld'] + sys.argv[1:])}`; seed "
                f"{self.config.seed_everything}.\n\nHardware: {hardware.describe(device)}{hardware.bf16_note(device)}; "
                f"precision: {', '.join(f'{k} {v}' for k, v in self.whole.precisions().items())}; torch {torch.__version__}, "
                f"transformers {transformers.__version__}, peft {peft.__version__}. Zoo: `{self.whole.zoo_dir}` "
                f"({len(self.names)} tasks, {len(self.spec.families)} families).\n\nWall time per phase: over every run "
                f"that worked on it (an interrupted run resumed) and in this run (a reused phase takes seconds).\n\n"
                f"| phase | seconds, all runs | seconds, this run |\n|---|---|---|\n{phases}\n"
                f"| total | {sum(total[k] for k in self.seconds):.0f} | {seconds:.0f} |\n")


def check_schedule(max_epochs: int | None, every: int | None) -> None:
    """The last epoch must be validated: the checkpoint is chosen among the validated epochs, so the
    epochs after the last validation would be trained for nothing (and with none, there is no checkpoint)."""
    if not (isinstance(max_epochs, int) and isinstance(every, int) and max_epochs > 0 and every > 0):
        return
    if max_epochs % every:
        last = max_epochs // every * every
        raise OpenWorldError(f"trainer.max_epochs {max_epochs} is not a multiple of trainer.check_val_every_n_epoch "
                             f"{every}: " + (f"the checkpoint would come from epoch {last} and the last "
                                             f"{max_epochs - last} would be wasted" if last else "no epoch would be validated"))


def snapshot_schedule(steps: list[int]) -> tuple[int, int]:
    """(checkpoint_every, num_checkpoints) of one run of ``max(steps)`` steps that keeps a checkpoint
    after each number of ``steps``: every gcd(steps) steps (one checkpoint for a single budget)."""
    if len(set(steps)) == 1:
        return 1, 1
    every = math.gcd(*steps)
    if max(steps) // every > MAX_SNAPSHOTS:
        raise OpenWorldError(f"openworld.multitask_steps {steps}: one run would keep {max(steps) // every} "
                             f"checkpoints to give every budget (their greatest common divisor is {every}); "
                             f"choose budgets with a larger common divisor (at most {MAX_SNAPSHOTS} checkpoints)")
    return every, max(steps) // every


def generator_key(cfg) -> str:
    """Hash of everything a fold's generator is trained from: its seen tasks and their zoo and
    conditions, the CVAE, the trainer and the checkpoint selection (not where it logs, nor how it
    decodes)."""
    plain = cfg.as_dict()
    trainer = {k: v for k, v in plain["trainer"].items() if k not in ("logger", "default_root_dir")}
    if not plain["model"].get("mixup"):  # off: the key of releases before the option, so their generators stay valid
        plain["model"].pop("mixup", None)
    semantic = plain["data"].get("semantic") or {}
    if not semantic.get("expert_dropout"):  # likewise
        semantic.pop("expert_dropout", None)
    for name in DECODING_ARGS:  # read at generation only: one trained generator serves every value
        plain["model"].pop(name, None)
    return fingerprint({"seed": plain.get("seed_everything"), "trainer": trainer}
                       | {k: plain.get(k) for k in ("model", "data", "eval", "checkpoint")})


def forget_other_settings(folder: Path, key: str) -> None:
    """A fold generator's folder trained with other settings (or before they were recorded) is not
    reused or resumed: its checkpoints and ``done.json`` go, and it is trained again."""
    record = folder / "generator.json"
    current = files.read_json(record).get("key") if record.exists() else None
    stale = [p for p in (folder / "done.json", folder / "checkpoints") if p.exists()] + sorted(
        folder.glob("events.out.tfevents.*"))  # and the old curves, so TensorBoard shows one run
    if current == key or not stale:
        return
    print(f"{folder}: trained with other settings than the config's; training it again")
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _centred(conditions: Tensor) -> Tensor:
    """(N, C) task vectors centred on the seen tasks' mean (all rows but the last: the held-out task)."""
    return conditions - conditions[:-1].mean(0)


def nll(score: Score) -> float:
    return score.nll / score.tokens


def choose_top_k(rows: list[dict], spec: OpenWorld) -> dict:
    """The (K, temperature) of the top-K mean with the lowest mean NLL on the validation folds' tasks
    (the first of each list when there is no validation fold)."""
    grid = [f"top-{k} mean (t={t:g})" for k, t in itertools.product(spec.top_k, spec.temperatures)]
    val = [r for r in rows if r["role"] == "validation"]
    if not val:
        return {"method": grid[0], "on": "no validation fold: the first K and temperature"}
    best = min(grid, key=lambda m: statistics.fmean(nll(r["scores"][m]) for r in val))
    return {"method": best, "on": f"validation folds ({len(val)} held-out tasks)"}


def finish_row(row: dict, chosen: dict) -> dict:
    """Per method: mean and std of ppl, bpc and the share of the base -> oracle gap closed."""
    scores = row["scores"]
    base_nll, oracle_nll = nll(scores["base"]), nll(scores["oracle"])
    methods = {}
    for method, s in scores.items():
        if method.startswith("top-") and method != chosen["method"]:
            continue
        draws = s if isinstance(s, list) else [s]
        label = "top-K mean" if method.startswith("top-") else method
        gaps = [baselines.gap_closed(nll(d), base_nll, oracle_nll) for d in draws]
        methods[label] = {"ppl": statistics.fmean(d.ppl for d in draws),
                          "ppl_std": statistics.pstdev(d.ppl for d in draws),
                          "bpc": statistics.fmean(d.bpc for d in draws), "gap": statistics.fmean(gaps),
                          "gap_std": statistics.pstdev(gaps)}
    order = sorted(methods, key=_method_rank)
    return {k: v for k, v in row.items() if k != "scores"} | {"methods": {m: methods[m] for m in order}}


def _method_rank(method: str) -> tuple[int, int, str]:
    """Baselines first, then the generator's rows, then the controls."""
    for rank, prefix in enumerate(("base", "oracle", "soup", "nearest", "top-K", "AdapterSoup", "mu*", "multi-task",
                                   "ICM-LoRA (task_vector)", "ICM-LoRA (description)", "SG-LoRA", "control")):
        if method.startswith(prefix):
            return rank, len(method), method  # by length: "512 tokens" before "1,024 tokens"
    return 99, len(method), method


def _png_to_chw(png: bytes):
    """(3, H, W) uint8 array of a PNG, for TensorBoard's image tab."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)


def report(rows: list[dict], chosen: dict, header: str) -> tuple[str, str]:
    """Markdown (per test task and on average) and CSV (every fold, every method) of the benchmark."""
    test = [r for r in rows if r["role"] == "test"]
    methods = common_methods(test)
    lines = ["# Open world: adapters for held-out tasks", "", header,
             f"Top-K mean: {chosen['method']}, chosen on {chosen['on']}. Gap: share of the base -> oracle gap in "
             "NLL per token that a method closes (1 = the task's own LoRA, 0 = the base model). "
             "ICM-LoRA and SG-LoRA rows are mean ± std over samples; `z=0` is the mean decode (SG-LoRA: the "
             "mean of its learned prior p(z | c)).", "",
             "## Mean over the test folds' held-out tasks", "", "| method | ppl | bpc | gap closed | beats soup |",
             "|---|---|---|---|---|"]
    for m in methods:
        ppl = statistics.fmean(r["methods"][m]["ppl"] for r in test)
        bpc = statistics.fmean(r["methods"][m]["bpc"] for r in test)
        gaps = [r["methods"][m]["gap"] for r in test if not math.isnan(r["methods"][m]["gap"])]
        wins = sum(r["methods"][m]["ppl"] < r["methods"]["soup"]["ppl"] for r in test)
        gap = f"{statistics.fmean(gaps):+.2f}" if gaps else "n/a"
        lines.append(f"| {m} | {ppl:.2f} | {bpc:.3f} | {gap} | {wins}/{len(test)} |")
    lines += refusals(test)
    lines += ["", "## Per held-out task (test folds): perplexity (gap closed)", "",
              "| fold | task | family | relatives seen | " + " | ".join(methods) + " |",
              "|" + "---|" * (4 + len(methods))]
    for r in test:
        cells = []
        for m in methods:
            v = r["methods"][m]
            std = f" ± {v['ppl_std']:.2f}" if v["ppl_std"] > 0 else ""
            cells.append(f"{v['ppl']:.2f}{std} ({v['gap']:+.2f})")
        lines.append(f"| {r['fold']} | {r['task']} | {r['family']} | {r['seen_relatives']} | " + " | ".join(cells) + " |")
    lines += budget_table(test)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["fold", "role", "task", "family", "seen_relatives", "nearest_tv", "nearest_desc", "other_task",
                     "method", "ppl", "ppl_std", "bpc", "gap", "gap_std"])
    for r in rows:
        for m, v in r["methods"].items():
            writer.writerow([r["fold"], r["role"], r["task"], r["family"], r["seen_relatives"], r["nearest_tv"],
                             r["nearest_desc"], r["other_task"], m, v["ppl"], v["ppl_std"], v["bpc"], v["gap"],
                             v["gap_std"]])
    return "\n".join(lines) + "\n", buf.getvalue()


def refusals(rows: list[dict]) -> list[str]:
    """Markdown lines: how many of SG-LoRA's descriptions ``predict`` would refuse (none without SG-LoRA rows)."""
    rows = [r for r in rows if r.get("refused")]
    if not rows:
        return []
    counts = ", ".join(f"{label} description {sum(r['refused'][label] for r in rows)}/{len(rows)}"
                       for label in rows[0]["refused"])
    return ["", f"Descriptions `predict` would refuse as far from every seen expert (SG-LoRA's threshold): {counts}. "
            "The rows above score them all the same (as `--allow_far`)."]


def zoo_table(rows: list[dict]) -> str:
    """Markdown: each zoo task's own LoRA against the base model and the soup of all, on test, and the summary."""
    if not rows:
        return ""
    gains = [100 * (1 - r["own LoRA"] / r["base"]) for r in rows]
    wins = sum(r["own LoRA"] < r["soup"] for r in rows)
    lines = ["", f"## The zoo on test: each task's own LoRA against the base model and the soup of all {len(rows)}", "",
             f"Own LoRA better than base by {statistics.fmean(gains):.1f}% perplexity on average (from "
             f"{min(gains):.1f}% to {max(gains):.1f}%); better than the soup on {wins} of {len(rows)} tasks.", "",
             "| task | family | base | own LoRA | soup | own vs base | base bpc | own bpc |", "|---|---|---|---|---|---|---|---|"]
    for r, gain in zip(rows, gains):
        lines.append(f"| {r['task']} | {r['family']} | {r['base']:.2f} | {r['own LoRA']:.2f} | {r['soup']:.2f} | "
                     f"-{gain:.1f}% | {r['base bpc']:.3f} | {r['own LoRA bpc']:.3f} |")
    return "\n".join(lines) + "\n"


def common_methods(rows: list[dict]) -> list[str]:
    """The methods every row has (the budget fold's extra multi-task budgets are not in the others), in order."""
    return [m for m in rows[0]["methods"] if all(m in r["methods"] for r in rows)] if rows else []


def budget_table(rows: list[dict]) -> list[str]:
    """Markdown lines: the multi-task LoRA at every budget on the fold that has them all, beside base,
    oracle and ICM-LoRA (empty when every fold has the same budgets)."""
    common = common_methods(rows)
    budgets = [r for r in rows if any(m.startswith("multi-task") and m not in common for m in r["methods"])]
    if not budgets:
        return []
    methods = [m for m in budgets[0]["methods"] if m in ("base", "oracle")
               or (m.startswith(("multi-task", "ICM-LoRA", "SG-LoRA")) and "z=0" not in m)]
    lines = ["", f"## The multi-task LoRA at every budget (fold {budgets[0]['fold']}, {budgets[0]['role']} text): "
             "perplexity (gap closed)", "", "| task | " + " | ".join(methods) + " |", "|" + "---|" * (1 + len(methods))]
    for r in budgets:
        cells = [f"{r['methods'][m]['ppl']:.2f} ({r['methods'][m]['gap']:+.2f})" for m in methods]
        lines.append(f"| {r['task']} | " + " | ".join(cells) + " |")
    return lines


def gap_figure(rows: list[dict]) -> bytes:
    """PNG: for each held-out test task, the share of the base -> oracle gap each method closes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in common_methods(rows) if m not in ("base", "oracle")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows) * len(methods)) + 3.5, 4.5))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab20").colors
    for j, m in enumerate(methods):
        gaps = [r["methods"][m]["gap"] for r in rows]
        errs = [r["methods"][m]["gap_std"] for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], gaps, width, yerr=errs, label=m,
               color=colours[j % len(colours)])
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["task"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("share of the base -> oracle gap closed")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def run_with_cli(runner, command: str, errors: tuple[type[Exception], ...], args: list[str] | None) -> list[dict]:
    """Parse the config with ``OpenWorldCLI`` and ``runner(cli).run()``; an unreachable hub, a zoo that
    does not match the config, or one of ``errors`` ends with one line naming ``command``, not a traceback."""
    main_thread = threading.current_thread() is threading.main_thread()
    # `kill` or a job scheduler's stop unwinds like Ctrl-C, so the interrupted run's phase times are kept
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        cli = OpenWorldCLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False, args=args,
                           save_config_kwargs={"overwrite": True})
        return runner(cli).run()
    except (Unreachable, ZooMismatch, *errors) as err:
        raise SystemExit(f"{command}: {err}") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(args: list[str] | None = None) -> list[dict]:
    """Parse the config and run the benchmark."""
    return run_with_cli(Benchmark, "icm_lora openworld", (OpenWorldError,), args)


if __name__ == "__main__":
    main()
