"""The LightningDataModule: builds the zoo and conditions in ``fit``, then streams meta-batches.

Each training batch is a meta-batch of ``tasks_per_batch`` tasks x ``checkpoints_per_task`` zoo
checkpoints of each, as (normalised flat LoRA, condition, task id). Rows are read from the
safetensors shards on demand, so the zoo never has to fit in memory.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import cached_property, partial
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from icm_lora import base, files, hardware, semantic
from icm_lora.condition import (
    STORED,
    ConditionScaler,
    ConditionSpec,
    description_embeddings,
    embedding_dim,
    task_vectors,
)
from icm_lora.evaluate import LiveAdapter
from icm_lora.flat import NORMALIZATIONS, Normalizer
from icm_lora.ranks import Ranks
from icm_lora.semantic import SemanticSpec
from icm_lora.tasks import Task, TaskSpec, TextBudget, fingerprint, load_task_file, slug, split_task
from icm_lora.zoo import LoRASpec, Zoo, ZooMismatch, ZooTraining, check_current, lora_layout, mismatches
from icm_lora.zoo_build import build

CONDITIONS = "conditions.safetensors"


class PredictInputError(ValueError):
    """A task given to ``predict`` that its generator cannot condition on (the CLI prints it in one line)."""


class ZooDataset(Dataset):
    """(task index, checkpoint row) pairs -> dict(weights (D,), condition (C,), task ()).

    ``names[t]`` is the zoo task whose checkpoints pair with ``conditions[t]``; the zoo's own task
    order is never used, so conditions and weights cannot drift apart.

    With ``prompts`` (per task, (P, C) conditions of its single prompts) and ``draws`` > 0, each item's
    condition is instead the mean of ``draws`` of its task's prompts drawn at random. With ``redraw``
    (task index -> (C,) condition), each item's condition is drawn by it instead (SG-LoRA's expert dropout).
    """

    def __init__(self, zoo: Zoo, names: list[str], items: list[tuple[int, int]], normalizer: Normalizer,
                 conditions: Tensor, prompts: list[Tensor] | None = None, draws: int = 0,
                 redraw: Callable[[int], Tensor] | None = None) -> None:
        if len(names) != len(conditions):
            raise ValueError(f"{len(names)} task names but {len(conditions)} conditions")
        self.zoo, self.names, self.items, self.normalizer, self.conditions = zoo, names, items, normalizer, conditions
        self.prompts, self.draws = (prompts, draws) if prompts is not None and draws > 0 else (None, 0)
        self.redraw = redraw

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        task, row = self.items[i]
        weights = self.zoo.checkpoint(self.names[task], row)
        return {"weights": self.normalizer.normalize(weights), "condition": self._condition(task),
                "task": torch.tensor(task)}

    def _condition(self, task: int) -> Tensor:
        if self.redraw is not None:
            return self.redraw(task)
        if self.prompts is None:
            return self.conditions[task]
        prompts = self.prompts[task]  # (P, C)
        return prompts[torch.randperm(len(prompts))[: self.draws]].mean(0)


class MetaBatchSampler(Sampler[list[int]]):
    """Yields meta-batches: ``tasks_per_batch`` distinct tasks x ``per_task`` items of each.

    Every rank draws the same global sequence of meta-batches for an epoch (one seed) and takes
    every ``world``-th one, so ranks train on different meta-batches and together on all of them.
    Tasks are dealt from shuffled passes over all tasks, and an epoch has at least enough
    meta-batches for one pass, so every task is seen every epoch.
    """

    def __init__(self, task_of_item: list[int], tasks_per_batch: int, per_task: int, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.by_task: dict[int, list[int]] = {}
        for i, t in enumerate(task_of_item):
            self.by_task.setdefault(t, []).append(i)
        self.tasks_per_batch = min(tasks_per_batch, len(self.by_task))
        self.per_task, self.seed, self.epoch, self.rank, self.world = per_task, seed, 0, rank, world
        batches = max(1, len(task_of_item) // (self.tasks_per_batch * per_task),
                      math.ceil(len(self.by_task) / self.tasks_per_batch))
        self.size = math.ceil(batches / world)  # per rank; every rank runs the same number of steps

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch, so resumed runs and all ranks agree on the order."""
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        deck: list[int] = []
        batches = []
        for _ in range(self.size * self.world):
            batch = []
            for t in self._deal(deck, rng):
                batch += rng.sample(self.by_task[t], min(self.per_task, len(self.by_task[t])))
            batches.append(batch)
        yield from batches[self.rank :: self.world]

    def _deal(self, deck: list[int], rng: random.Random) -> list[int]:
        """The next ``tasks_per_batch`` distinct tasks off ``deck``, refilled with shuffled passes over all tasks."""
        picked: list[int] = []
        while len(picked) < self.tasks_per_batch:
            i = next((i for i, t in enumerate(deck) if t not in picked), None)
            if i is None:
                deck += rng.sample(list(self.by_task), len(self.by_task))
            else:
                picked.append(deck.pop(i))
        return picked


class ZooDataModule(L.LightningDataModule):
    """Tasks -> LoRA zoo -> conditions -> meta-batches for the generator.

    Only ``fit`` builds: it trains the LoRAs the zoo lacks or holds stale (split across ranks under
    DDP) and the conditions. ``validate``, ``test`` and ``predict`` only read the zoo, and stop with
    the differences when it does not match the config.

    Args:
        zoo_dir: where the zoo lives; built by ``fit`` if missing, reused if present.
        base_model: hub id or path of an ``AutoModelForCausalLM``, or ``packaged:smollm2-135m`` /
            ``random:tiny-llama``.
        tasks: the zoo's tasks.
        text: how each task's text is split.
        lora: the LoRA structure of the zoo and of every generated adapter.
        training: how each task's LoRA is trained and which checkpoints are kept.
        condition: what the generator is conditioned on.
        normalization: ``element`` (subtract the zoo's mean LoRA, per-tensor std) or ``tensor``
            (per-tensor mean and std, the paper's scheme).
        tasks_per_batch: tasks in each meta-batch.
        checkpoints_per_task: checkpoints of each task in each meta-batch.
        val_every: every ``val_every``-th kept checkpoint of each task is held out for validation.
        condition_draws: task vectors only: in training, pair each checkpoint with the mean of this
            many of its task's prompts drawn at random, so the generator sees how a task's condition
            varies with the demonstrations it is given (0: the mean of all prompts, as at generation).
        semantic: ``condition.kind: semantic`` only: how SG-LoRA mixes the experts nearest to a
            description into its prior, and when it rejects a description.
        predict_tasks: for ``predict``: zoo task names and/or task files (JSON/YAML with ``name``,
            ``description`` and/or ``examples``).
        predict_description: for ``predict``: one more task, given by this sentence alone (the CLI's
            ``--description``).
        allow_far: for ``predict``: generate for a description no expert covers (with a warning)
            instead of refusing (the CLI's ``--allow_far``).
        num_workers: DataLoader workers.
        cache_dir: where converted base models are cached (default ``~/.cache/icm_lora``).
        build_device: device for building the zoo and task vectors (``auto``: the Trainer's device, or
            CUDA when available).
        seed: seed of the meta-batch order.
    """

    def __init__(self, zoo_dir: str = "zoo", base_model: str = base.PACKAGED_SMOLLM2,
                 tasks: list[TaskSpec] | None = None, text: TextBudget | None = None,
                 lora: LoRASpec | None = None, training: ZooTraining | None = None,
                 condition: ConditionSpec | None = None, normalization: str = "element",
                 tasks_per_batch: int = 4, checkpoints_per_task: int = 2, val_every: int = 10,
                 condition_draws: int = 0, semantic: SemanticSpec | None = None,
                 predict_tasks: list[str] | None = None, predict_description: str | None = None,
                 allow_far: bool = False, num_workers: int = 0,
                 cache_dir: str | None = None, build_device: str = "auto", seed: int = 0) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.zoo_dir, self.base_model, self.cache_dir = Path(zoo_dir), base_model, cache_dir
        self.task_specs = list(tasks or [])
        if not self.task_specs:
            raise ValueError("data.tasks is empty: the zoo needs at least one task")
        names = [t.name for t in self.task_specs]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.text, self.lora = text or TextBudget(), lora or LoRASpec()
        self.training, self.condition = training or ZooTraining(), condition or ConditionSpec()
        self.normalization, self.val_every, self.seed = normalization, val_every, seed
        if condition_draws < 0:
            raise ValueError(f"condition_draws must be >= 0, got {condition_draws}")
        self.condition_draws = condition_draws
        self.build_device = build_device
        self.tasks_per_batch, self.checkpoints_per_task = tasks_per_batch, checkpoints_per_task
        self.predict_tasks, self.num_workers = list(predict_tasks or []), num_workers
        self.semantic = semantic or SemanticSpec()
        self.predict_description, self.allow_far = predict_description, allow_far
        self.predict_info: dict[str, dict] = {}  # per predicted name: what its condition was made from
        self.phase_seconds: dict[str, float] = {}  # wall time of what `build` built in this run
        self.init_phase = "base model resolve (GGUF conversion on the first run)"
        # Shapes the generator needs, known before any zoo exists (linked into the model by the CLI).
        start = time.time()
        config = base.load_config(base_model, cache_dir)  # converts a packaged model once
        self.init_seconds = time.time() - start
        self.layout = lora_layout(config, self.lora)
        self.lora_dim = self.layout.dim
        self.cond_dim = {"task_vector": config.hidden_size, "semantic": 2 * self.lora_dim}.get(
            self.condition.kind) or embedding_dim(self.condition.embedder)

    # ---- building -------------------------------------------------------------------------
    @cached_property
    def tasks(self) -> list[Task]:
        return [split_task(spec, self.text) for spec in self.task_specs]

    def sources(self) -> dict[str, dict]:
        """Per task, what its text comes from (hashed into its zoo entry; named when it changes)."""
        return {spec.name: {"task": spec.hashed(), "text": asdict(self.text)} for spec in self.task_specs}

    def task_hashes(self) -> list[str]:
        return [fingerprint(spec.hashed(), self.text) for spec in self.task_specs]

    @property
    def device(self) -> torch.device:
        """Where the zoo and task vectors are built."""
        if self.build_device != "auto":
            return torch.device(self.build_device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def precisions(self) -> dict[str, str]:
        """The precision of each building phase: as the zoo records it for the entries this config uses
        (a zoo built on another machine keeps its own), ``auto`` resolved here for what is still to build."""
        path = self.zoo_dir / "metadata.json"
        meta = files.read_json(path) if path.exists() else {}
        names = [spec.name for spec in self.task_specs]
        lora_planned = hardware.resolve_precision(self.training.precision, self.device)
        lora_stale = mismatches(self.zoo_dir, self.sources(), self.training)
        entries = meta.get("tasks", {})
        lora = [lora_planned if n in lora_stale else entries[n].get("computed", {}).get("precision", lora_planned)
                for n in names]
        vector_planned = hardware.resolve_precision(self.condition.precision, self.device)
        vector_stale = set(self._stale_conditions())
        computed = meta.get("conditions", {}).get("computed", {})
        vectors = [vector_planned if n in vector_stale or n not in computed else computed[n]["precision"] for n in names]
        return {"LoRA zoo": _tally(lora), "task vectors": _tally(vectors)}

    def build(self) -> None:
        """Build what the zoo lacks: LoRAs (the ranks split the tasks), then conditions (rank 0)."""
        ranks = Ranks.current()
        # Rank 0 decides for everyone, so no rank skips a collective another rank is waiting in.
        zoo_stale, conditions_stale = ranks.gather(
            (bool(mismatches(self.zoo_dir, self.sources(), self.training)), self._stale_conditions()))[0]
        if not (zoo_stale or conditions_stale):
            return  # nothing to build: skip loading the base model
        start = time.time()
        model, tokenizer = base.load(self.base_model, self.cache_dir)
        model.to(self.device)
        tasks = self.tasks
        self.phase_seconds["base model + task text"] = time.time() - start
        if zoo_stale:
            start = time.time()
            sources = self.sources()
            build(self.zoo_dir, model, tokenizer, self.base_model, tasks, [sources[t.name] for t in tasks], self.lora,
                  self.training, ranks=ranks)
            self.phase_seconds["LoRA zoo"] = time.time() - start
        if conditions_stale:
            start = time.time()
            if ranks.is_main:
                self._build_conditions(model, tokenizer, self._stale_conditions())  # the LoRAs may have changed
            ranks.barrier()
            self.phase_seconds["task vectors + description embeddings"] = time.time() - start

    def _condition_hashes(self) -> dict[str, str]:
        """Per task, a hash of what its condition is computed from: its text and the condition settings
        (and, for task vectors through the task's own LoRA, how the LoRAs learn). Per task, so that
        DataModules over different subsets of one zoo (the folds of a leave-tasks-out benchmark)
        share the conditions they have in common."""
        learnt = [self.training.learning()] if self.condition.model == "finetuned" else []
        spec = self.condition.hashed() | {"kind": None}
        return {t.name: fingerprint(spec, h, *learnt) for t, h in zip(self.task_specs, self.task_hashes())}

    def _legacy_condition_hash(self) -> str:
        """The one hash over all tasks that zoos written before per-task condition hashes recorded."""
        learnt = [self.training.learning()] if self.condition.model == "finetuned" else []
        return fingerprint(self.condition.hashed() | {"kind": None}, self.task_hashes(), *learnt)

    def _stale_conditions(self) -> list[str]:
        """Tasks whose stored condition is missing or was computed from other text or settings."""
        path = self.zoo_dir / "metadata.json"
        built = (files.read_json(path) if path.exists() else {}).get("conditions", {})
        if not (self.zoo_dir / CONDITIONS).exists():
            return [t.name for t in self.task_specs]
        if built.get("hash") == self._legacy_condition_hash():
            return []
        current = built.get("tasks", {})
        return [name for name, h in self._condition_hashes().items() if current.get(name) != h]

    def _check_conditions(self) -> None:
        """For ``predict`` / ``validate`` / ``test``: conditions must have been built with this config."""
        stale = self._stale_conditions()
        if not stale:
            return
        built = files.read_json(self.zoo_dir / "metadata.json").get("conditions", {}).get("spec", {})
        changes = [f"condition.{k} {built[k]!r} -> {v!r}" for k, v in self.condition.hashed().items()
                   if k in built and built[k] != v]
        raise ZooMismatch(f"{self.zoo_dir / CONDITIONS}: the conditions of {', '.join(stale)} were built with other "
                         f"settings or are missing ({'; '.join(changes) or 'missing, or built from other text'}); "
                         "only `fit` builds them: run it with this config")

    def _build_conditions(self, model, tokenizer, names: list[str]) -> None:
        """Compute the conditions of ``names`` and store them beside the other tasks' (kept as they are)."""
        meta = files.read_json(self.zoo_dir / "metadata.json")
        path, zoo = self.zoo_dir / CONDITIONS, Zoo(self.zoo_dir)
        built = meta.get("conditions", {})
        old_spec = built.get("spec", {})
        same_spec = {k: old_spec.get(k) for k in self.condition.hashed()} == self.condition.hashed() and path.exists()
        tensors = files.load_tensors(path) if same_spec else {}
        hashes = dict(built.get("tasks", {})) if same_spec else {}
        live = LiveAdapter(model, self.lora.peft_config(), self.layout) if self.condition.model == "finetuned" else None
        tasks = [t for t in self.tasks if t.name in names]
        for task in tasks:
            if live is not None:  # the authors' variant: the task's own fine-tuned model
                live.load(zoo.final(task.name), f"{zoo.shard_path(task.name)} (final)")
            runner = live.model if live is not None else model
            tensors[f"task_vector/{slug(task.name)}"] = task_vectors(runner, tokenizer, task.demos, self.condition, task.name)
        descriptions = description_embeddings([t.description or t.name for t in tasks], self.condition.embedder)
        for task, emb in zip(tasks, descriptions):
            tensors[f"description/{slug(task.name)}"] = emb
        current = self._condition_hashes()
        hashes.update({name: current[name] for name in names})
        how = {"precision": hardware.resolve_precision(self.condition.precision, self.device), "device": str(self.device)}
        computed = {n: c for n, c in built.get("computed", {}).items() if n in hashes} if same_spec else {}
        computed.update({name: how for name in names})  # how each task's condition was computed: recorded, not hashed
        files.save_tensors(path, tensors)
        meta["conditions"] = {"file": CONDITIONS, "spec": asdict(self.condition), "tasks": hashes, "computed": computed}
        files.write_json(self.zoo_dir / "metadata.json", meta)

    # ---- reading --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "zoo", None) is not None:
            return
        if stage == "fit":
            self.build()
        else:  # validate / test / predict read the zoo as it is
            check_current(self.zoo_dir, self.base_model, self.lora, self.sources(), self.training)
            self._check_conditions()
        self.zoo = Zoo(self.zoo_dir)
        if self.zoo.layout != self.layout:
            raise ValueError(f"{self.zoo_dir / 'metadata.json'}: the zoo's LoRA layout does not match data.lora")
        self.task_names = [s.name for s in self.task_specs]
        self.normalizer = self.zoo.normalizer(self.normalization, self.task_names)
        raw = self.raw_conditions(self.task_names)  # (T, C); for semantic, (T, E) description embeddings
        self.scaler = ConditionScaler.fit(raw)
        self.conditions = self.scaler(raw) if self.condition.kind != "semantic" else self._semantic_setup(raw)
        if self.condition.kind != "task_vector":  # both description kinds read the description embeddings
            self._calibrate(raw)
        self.prompt_conditions = None  # (P, C) per task: single prompts' scaled conditions, for condition_draws
        if self.condition_draws and self.condition.kind == "task_vector":
            stored = files.load_tensors(self.zoo_dir / CONDITIONS)
            self.prompt_conditions = [self.scaler(stored[f"task_vector/{slug(n)}"].reshape(-1, raw.shape[1]))
                                      for n in self.task_names]
        self.train_items, self.val_items = [], []
        for t, name in enumerate(self.task_names):
            for row in range(self.zoo.num_checkpoints(name)):
                held_out = self.val_every > 0 and row % self.val_every == self.val_every - 1
                (self.val_items if held_out else self.train_items).append((t, row))

    def raw_conditions(self, names: list[str], kind: str | None = None) -> Tensor:
        """(T, C) unscaled conditions of zoo tasks, as stored: of this DataModule's kind, or ``kind``
        (``task_vector`` or ``description``; ``semantic`` reads the description embeddings)."""
        stored = files.load_tensors(self.zoo_dir / CONDITIONS)
        out = []
        for name in names:
            key = f"{STORED[kind or self.condition.kind]}/{slug(name)}"
            if key not in stored:
                raise KeyError(f"{self.zoo_dir / CONDITIONS}: no {key!r}; rebuild conditions with `fit`")
            value = stored[key]
            out.append(value.mean(0) if value.dim() == 2 else value)
        return torch.stack(out)

    # ---- SG-LoRA's semantic prior ------------------------------------------------------------
    def _semantic_setup(self, keys: Tensor) -> Tensor:
        """Experts' moments (normalised space), the rejection threshold, and the (T, 2 D) leave-self-out
        conditions the generator trains on."""
        if len(self.task_names) < 2:
            raise ValueError("condition.kind semantic needs at least two zoo tasks (each is mixed from the others)")
        moments = [semantic.expert_moments(self.normalizer.normalize(self.zoo.checkpoints(n)), self.semantic.checkpoints)
                   for n in self.task_names]
        self.expert_means = torch.stack([m for m, _ in moments])  # (T, D)
        self.expert_vars = torch.stack([v for _, v in moments])  # (T, D)
        return semantic.leave_self_out_conditions(keys, self.expert_means, self.expert_vars, self.semantic)

    def _calibrate(self, keys: Tensor) -> None:
        """The experts' (T, E) description embeddings and the similarity a new description must reach."""
        self.expert_keys = keys
        if len(keys) < 2:
            self.threshold = -1.0  # nothing to calibrate on: every description is covered, and the user is told
            warnings.warn(f"{self.zoo_dir}: one expert only, so descriptions far from it cannot be refused", stacklevel=2)
            return
        count = self.semantic.noise_strings
        noise = description_embeddings(semantic.noise_strings(count), self.condition.embedder) if count else None
        self.threshold = semantic.threshold(keys, self.semantic.margin, noise)

    def description_condition(self, description: str | None, name: str, refuse_far: bool = True) -> Tensor:
        """(C,) condition of a new description (``description`` or ``semantic`` kind); refuses one no expert
        covers (unless ``allow_far``, or ``refuse_far`` is off: a benchmark's controls) and records which
        experts it is closest to in ``predict_info``."""
        text = semantic.check_text(description)
        query = description_embeddings([text], self.condition.embedder)[0]  # (E,)
        if self.condition.kind == "semantic":
            cond, experts, best = semantic.prior_condition(query, self.expert_keys, self.expert_means,
                                                          self.expert_vars, self.semantic)
        else:  # ICM-LoRA from the description: its nearest experts are reported, not mixed
            idx, _, sims = semantic.expert_weights(query, self.expert_keys, self.semantic.top_k, 1.0)
            cond, experts, best = self.scaler(query), dict(zip(idx.tolist(), sims.tolist())), sims[0].item()
        if refuse_far:
            semantic.check_covered(text, best, self.threshold, self.allow_far)
        weight = "alpha" if self.condition.kind == "semantic" else "similarity"
        self.predict_info[name] = {"description": text, "best_similarity": best, "threshold": self.threshold,
                                   "experts": [{"task": self.task_names[i], weight: v} for i, v in experts.items()]}
        return cond

    def condition_for(self, examples: list[str] | None, description: str | None, name: str, model=None,
                      tokenizer=None) -> Tensor:
        """(C,) scaled condition of a task given by examples and/or a description (zoo task or new)."""
        if self.condition.kind != "task_vector":
            if not description:
                raise PredictInputError(f"task {name!r}: this generator is conditioned on descriptions, "
                                        "so the task needs a 'description'")
            return self.description_condition(description, name)
        if not examples:
            raise PredictInputError(f"task {name!r}: this generator is conditioned on task vectors, "
                                    "so the task needs 'examples' (a few texts of the task)")
        if self.condition.model == "finetuned":
            raise PredictInputError(f"task {name!r}: condition.model 'finetuned' needs the task's own LoRA, "
                                    "which a task outside the zoo does not have; use condition.model: base")
        return self.scaler(task_vectors(model, tokenizer, examples, self.condition, name).mean(0))

    def predict_conditions(self) -> tuple[list[str], Tensor]:
        """Names and (N, C) scaled conditions of ``predict_tasks``."""
        if not self.predict_tasks and self.predict_description is None:
            raise PredictInputError("predict needs data.predict_tasks (zoo task names and/or task files) or --description")
        names, conds, model, tokenizer = [], [], None, None
        if self.predict_description is not None:  # the name of its folder: the sentence, shortened
            text = semantic.check_text(self.predict_description)
            names.append(slug(text)[:48].strip("_-") or "description")
            conds.append(self.condition_for(None, text, names[-1]))
        for item in self.predict_tasks:
            if item in self.task_names:
                names.append(item)
                conds.append(self.conditions[self.task_names.index(item)])
                continue
            if not Path(item).exists():
                raise PredictInputError(f"predict task {item!r} is neither a zoo task ({self.task_names}) nor a file")
            spec = load_task_file(item)
            if model is None and self.condition.kind == "task_vector":
                model, tokenizer = base.load(self.base_model, self.cache_dir)
            names.append(spec["name"])
            conds.append(self.condition_for(spec.get("examples"), spec.get("description"), spec["name"], model, tokenizer))
        return names, torch.stack(conds)

    # ---- loaders --------------------------------------------------------------------------
    def _dataset(self, items: list[tuple[int, int]], train: bool = False) -> ZooDataset:
        prompts = self.prompt_conditions if train else None
        redraw = None
        if train and self.condition.kind == "semantic" and self.semantic.expert_dropout > 0:
            redraw = partial(semantic.dropout_condition, keys=self.expert_keys, means=self.expert_means,
                             variances=self.expert_vars, spec=self.semantic)
        return ZooDataset(self.zoo, self.task_names, items, self.normalizer, self.conditions, prompts,
                          self.condition_draws, redraw)

    def train_dataloader(self) -> DataLoader:
        ranks = Ranks.current()
        sampler = MetaBatchSampler([t for t, _ in self.train_items], self.tasks_per_batch,
                                   self.checkpoints_per_task, self.seed, ranks.rank, ranks.world)
        return DataLoader(self._dataset(self.train_items, train=True), batch_sampler=sampler,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if not self.val_items:
            raise ValueError("no held-out zoo checkpoints for validation: set data.val_every > 0")
        batch = self.tasks_per_batch * self.checkpoints_per_task
        return DataLoader(self._dataset(self.val_items), batch_size=batch, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        names, conds = self.predict_conditions()
        return DataLoader([{"name": n, "condition": c} for n, c in zip(names, conds)], batch_size=len(names))


def _tally(values: list[str]) -> str:
    """``fp32`` when every task agrees, else each value with its task count (``fp32 (20 tasks), bf16 (12 tasks)``)."""
    counts = {v: values.count(v) for v in dict.fromkeys(values)}
    if not counts:
        return "no tasks"
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{v} ({k} task{'s' * (k > 1)})" for v, k in counts.items())
