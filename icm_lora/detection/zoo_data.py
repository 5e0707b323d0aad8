"""The generator's DataModule for detection: tasks -> detector LoRA zoo -> task vectors -> meta-batches.

It is the detection counterpart of ``icm_lora.data.ZooDataModule`` and shares its reading half:
the zoo on disk (``Zoo``), normalisation, ``ConditionScaler``, ``ZooDataset`` and
``MetaBatchSampler``. What differs is what a domain supplies: the base model (``bases.load_base``:
the project's detector or a transformers one),
the tasks (categories of COCO-format datasets), how each LoRA is trained (``detection.zoo``) and the
task vector (``detection.condition``). Only ``fit`` builds; other stages stop if the zoo or its
conditions do not match the config.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .. import files
from ..condition import ConditionScaler
from ..data import CONDITIONS, NORMALIZATIONS, MetaBatchSampler, PredictInputError, ZooDataset
from ..hardware import resolve_precision, trainer_precision
from ..ranks import Ranks
from ..tasks import fingerprint, slug
from ..zoo import Zoo, ZooMismatch
from .bases import load_base, missing
from .coco import CocoSubset
from .condition import DetectionCondition, task_vectors
from .data import CocoImages, category_ids, read_coco
from .shapes import ShapesSpec
from .system import DetectorLoRA
from .tasks import DatasetResolver, DetectionTask, load_task_file
from .zoo import DetectionTraining, build_zoo, lora_layout, stale_tasks


class DetectionZooData(L.LightningDataModule):
    """Detection tasks -> LoRA zoo on the frozen base detector -> task vectors -> meta-batches.

    Args:
        zoo_dir: where the zoo lives; built by ``fit`` if missing, reused if present.
        base_dir: the base detector: a folder of this project's (``python -m icm_lora.detection.pretrain``
            writes it), or a transformers ``AutoModelForObjectDetection`` folder or hub id.
        image_size: the side images are resized to for a transformers base (the project's detector has its own).
        datasets: datasets by name, for tasks that name one: synthetic (``ShapesSpec``) or splits of a
            COCO-format dataset on disk (``CocoSubset``).
        data_dir: where they are written.
        tasks: the zoo's tasks.
        lora: the LoRA structure of the zoo and of every generated adapter.
        training: how each task's LoRA is trained and which checkpoints are kept.
        condition: how a task's vector is made from its demonstration images.
        normalization: ``element`` or ``tensor`` (as the language zoo's).
        tasks_per_batch: tasks in each meta-batch.
        checkpoints_per_task: checkpoints of each task in each meta-batch.
        val_every: every ``val_every``-th kept checkpoint of each task is held out for validation.
        predict_tasks: for ``predict``: zoo task names and/or task files (YAML/JSON with ``name``,
            ``dataset`` (a COCO-format folder) and ``categories``; its train split gives the demonstrations).
        build_device: device for the zoo and task vectors (``auto``: CUDA when present).
        num_workers: DataLoader workers.
        seed: seed of the meta-batch order.
    """

    def __init__(self, zoo_dir: str = "zoo/detection/zoo", base_dir: str = "zoo/detection/base",
                 image_size: int | None = None, datasets: dict[str, ShapesSpec | CocoSubset] | None = None, data_dir: str = "zoo/detection/data",
                 tasks: list[DetectionTask] | None = None, lora: DetectorLoRA | None = None,
                 training: DetectionTraining | None = None, condition: DetectionCondition | None = None,
                 normalization: str = "element", tasks_per_batch: int = 4, checkpoints_per_task: int = 2,
                 val_every: int = 5, predict_tasks: list[str] | None = None, build_device: str = "auto",
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.task_specs = list(tasks or [])
        names = [t.name for t in self.task_specs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"data.tasks must be non-empty with unique names, got {names}")
        self.zoo_dir, self.base_dir = Path(zoo_dir), base_dir
        self.resolver = DatasetResolver(dict(datasets or {}), data_dir)
        self.lora, self.training = lora or DetectorLoRA(), training or DetectionTraining()
        self.condition = condition or DetectionCondition()
        self.normalization, self.val_every, self.seed = normalization, val_every, seed
        self.tasks_per_batch, self.checkpoints_per_task = tasks_per_batch, checkpoints_per_task
        self.predict_tasks, self.build_device, self.num_workers = list(predict_tasks or []), build_device, num_workers
        self.base_model = base_dir  # what generated adapters record (the shared adapter writer reads it)
        self.predict_info: dict[str, dict] = {}
        self.phase_seconds: dict[str, float] = {}
        self.init_phase = "base detector (pretrained on the first run)"
        start = time.time()
        self._check_inputs(base_dir)
        self.base = load_base(base_dir, image_size)
        if not self.base.image_size:
            raise ValueError(f"base model {base_dir}: a transformers detector needs data.image_size (the side "
                             "images are resized to)")
        self.image_size = self.base.image_size
        self.layout = lora_layout(self.base.model, self.lora)
        self.lora_dim, self.cond_dim = self.layout.dim, 2 * self.base.token_dim
        self.init_seconds = time.time() - start
        self._splits: dict[tuple[str, str], CocoImages] = {}

    def _check_inputs(self, base_dir: str) -> None:
        """Stop before anything loads when the tasks' data is missing, naming all that is (and an uncached model)."""
        gone = list(dict.fromkeys(item for task in self.task_specs for item in self.resolver.missing(task)))
        if gone:
            model = missing(base_dir)
            raise FileNotFoundError("missing: " + "; ".join(gone + ([model] if model else []))
                                    + "; the offline default is `make detection` (experiments/shapes.yaml)")

    @property
    def device(self) -> torch.device:
        if self.build_device != "auto":
            return torch.device(self.build_device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ---- building -------------------------------------------------------------------------
    def task_split(self, task: DetectionTask, split: str) -> CocoImages:
        """One split of a task's images (cached), at the base detector's input size."""
        if (task.name, split) not in self._splits:
            root = self.resolver.root(task)
            ids = category_ids(read_coco(root, "train"), task.categories)
            self._splits[task.name, split] = CocoImages(root, split, ids, self.image_size, self.base.channel_map)
        return self._splits[task.name, split]

    def _condition_hashes(self) -> dict[str, str]:
        key = self.base.key()
        return {t.name: fingerprint(self.resolver.source(t), self.condition.hashed(), key) for t in self.task_specs}

    def _stale_conditions(self) -> list[str]:
        meta_path = self.zoo_dir / "metadata.json"
        built = (files.read_json(meta_path) if meta_path.exists() else {}).get("conditions", {}).get("tasks", {})
        if not (self.zoo_dir / CONDITIONS).exists():
            return [t.name for t in self.task_specs]
        return [name for name, h in self._condition_hashes().items() if built.get(name) != h]

    def _write_datasets(self, ranks: Ranks) -> None:
        """Write the config's datasets (synthetic, COCO subsets) that are not on disk yet, on rank 0 only.

        Two tasks may share a dataset and the ranks train different tasks: were each rank to write
        what it reads, two would write one folder at once and one would replace it under the other.
        """
        if ranks.is_main:
            for task in self.task_specs:
                self.resolver.root(task)
        ranks.barrier()

    def build(self) -> None:
        """Train the LoRAs the zoo lacks (the ranks split the tasks), then the task vectors it lacks (rank 0)."""
        ranks = Ranks.current()
        start = time.time()
        self._write_datasets(ranks)  # counted in the zoo phase
        build_zoo(self.zoo_dir, self.base, self.task_specs, self.resolver, self.lora, self.training, self.device,
                  ranks)
        self.phase_seconds["LoRA zoo"] = time.time() - start
        stale = ranks.gather(self._stale_conditions())[0]
        if stale:
            start = time.time()
            if ranks.is_main:
                self._build_conditions(stale)
            ranks.barrier()
            self.phase_seconds["task vectors"] = time.time() - start

    def _build_conditions(self, names: list[str]) -> None:
        meta = files.read_json(self.zoo_dir / "metadata.json")
        path = self.zoo_dir / CONDITIONS
        tensors = files.load_tensors(path) if path.exists() else {}
        self.base.model.to(self.device)
        for task in self.task_specs:
            if task.name in names:
                tensors[f"task_vector/{slug(task.name)}"] = task_vectors(self.base, self.task_split(task, "train"),
                                                                         self.condition, task.name)
        files.save_tensors(path, tensors)
        current = self._condition_hashes()
        hashes = meta.get("conditions", {}).get("tasks", {}) | {n: current[n] for n in names}
        meta["conditions"] = {"file": CONDITIONS, "spec": asdict(self.condition), "tasks": hashes}
        files.write_json(self.zoo_dir / "metadata.json", meta)

    def _check_current(self) -> None:
        stale = stale_tasks(self.zoo_dir, self.task_specs, self.resolver, self.training, self.base.key())
        if stale:
            raise ZooMismatch(f"{self.zoo_dir}: " + "; ".join(f"{k}: {v}" for k, v in stale.items())
                              + "; only `fit` builds the zoo: run it with this config")
        stale_conditions = self._stale_conditions()
        if stale_conditions:
            raise ZooMismatch(f"{self.zoo_dir / CONDITIONS}: task vectors of {', '.join(stale_conditions)} are "
                              "missing or were built with other settings; only `fit` builds them")

    # ---- reading --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "zoo", None) is not None:
            return
        if stage == "fit":
            self.build()
        else:
            self._write_datasets(Ranks.current())  # evaluation reads them
            self._check_current()
        self.zoo = Zoo(self.zoo_dir)
        if self.zoo.layout != self.layout:
            raise ValueError(f"{self.zoo_dir / 'metadata.json'}: the zoo's LoRA layout does not match data.lora")
        self.task_names = [t.name for t in self.task_specs]
        self.normalizer = self.zoo.normalizer(self.normalization, self.task_names)
        stored = files.load_tensors(self.zoo_dir / CONDITIONS)
        raw = torch.stack([stored[f"task_vector/{slug(n)}"].mean(0) for n in self.task_names])  # (T, C)
        self.scaler = ConditionScaler.fit(raw)
        self.conditions = self.scaler(raw)
        self.train_items, self.val_items = [], []
        for t, name in enumerate(self.task_names):
            for row in range(self.zoo.num_checkpoints(name)):
                held_out = self.val_every > 0 and row % self.val_every == self.val_every - 1
                (self.val_items if held_out else self.train_items).append((t, row))

    def predict_conditions(self) -> tuple[list[str], Tensor]:
        """Names and (N, C) scaled conditions of ``predict_tasks``."""
        if not self.predict_tasks:
            raise PredictInputError("predict needs data.predict_tasks (zoo task names and/or task files)")
        names, conds = [], []
        for item in self.predict_tasks:
            if item in self.task_names:
                names.append(item)
                conds.append(self.conditions[self.task_names.index(item)])
                continue
            if not Path(item).exists():
                raise PredictInputError(f"predict task {item!r} is neither a zoo task ({self.task_names}) nor a file")
            task = load_task_file(item)
            self.base.model.to(self.device)
            names.append(task.name)
            self.predict_info[task.name] = {"demonstrations": self.resolver.source(task)}
            conds.append(self.scaler(task_vectors(self.base, self.task_split(task, "train"), self.condition,
                                                  task.name).mean(0)))
        return names, torch.stack(conds)

    def precisions(self) -> dict[str, str]:
        """The precision each building phase runs in on this machine (``auto`` resolved)."""
        zoo = "bf16" if str(trainer_precision(self.training.precision, self.device.type)).startswith("bf16") else "fp32"
        return {"LoRA zoo": zoo, "task vectors": resolve_precision(self.condition.precision, self.device)}

    # ---- loaders --------------------------------------------------------------------------
    def _dataset(self, items: list[tuple[int, int]]) -> ZooDataset:
        return ZooDataset(self.zoo, self.task_names, items, self.normalizer, self.conditions, None, 0)

    def train_dataloader(self) -> DataLoader:
        sampler = MetaBatchSampler([t for t, _ in self.train_items], self.tasks_per_batch, self.checkpoints_per_task,
                                   self.seed)
        return DataLoader(self._dataset(self.train_items), batch_sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if not self.val_items:
            raise ValueError("no held-out zoo checkpoints for validation: set data.val_every > 0")
        return DataLoader(self._dataset(self.val_items), batch_size=self.tasks_per_batch * self.checkpoints_per_task,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        names, conds = self.predict_conditions()
        return DataLoader([{"name": n, "condition": c} for n, c in zip(names, conds)], batch_size=len(names))
