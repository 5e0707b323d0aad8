"""Detection tasks: one category, or a set of them, of a COCO-format dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..files import file_hash
from .coco import CocoSubset, build_subset
from .shapes import ShapesSpec, build


@dataclass
class DetectionTask:
    """One detection task.

    Args:
        name: unique task name (file names, metric names, tables).
        dataset: a key of the config's ``datasets`` (a synthetic dataset or a ``CocoSubset`` of a COCO-format
            dataset, written under ``data_dir``) or the folder of a COCO-format dataset (images +
            ``annotations/instances_{train,val,test}.json``).
        categories: the categories to detect, by name.
        description: one sentence about the task, for description conditioning.
    """

    name: str
    dataset: str
    categories: list[str]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.categories:
            raise ValueError(f"detection task {self.name!r}: no categories")


def load_task_file(path: str | Path) -> DetectionTask:
    """A user's detection task file (YAML or JSON): ``name``, ``dataset`` (a COCO-format folder, or a
    synthetic dataset of the config), ``categories`` and optionally ``description``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read task file: {err}") from err
    missing = [k for k in ("name", "dataset", "categories") if not isinstance(data, dict) or not data.get(k)]
    if missing:
        raise ValueError(f"{path}: a detection task file needs name, dataset and categories (missing: {missing})")
    categories = [data["categories"]] if isinstance(data["categories"], str) else list(data["categories"])
    return DetectionTask(name=str(data["name"]), dataset=str(data["dataset"]), categories=categories,
                         description=str(data.get("description", "")))


class DatasetResolver:
    """Folders of the tasks' datasets: the config's (synthetic, or subsets of a COCO-format dataset) written
    once under ``data_dir``, others as given.

    Args:
        datasets: the config's datasets by name.
        data_dir: where they are written.
    """

    def __init__(self, datasets: dict[str, ShapesSpec | CocoSubset], data_dir: str | Path) -> None:
        self.datasets, self.data_dir = datasets, Path(data_dir)

    def root(self, task: DetectionTask) -> Path:
        spec = self.datasets.get(task.dataset)
        if isinstance(spec, CocoSubset):
            return build_subset(self.data_dir / task.dataset, spec)
        if spec is not None:
            return build(self.data_dir / task.dataset, spec)
        folder = Path(task.dataset)
        if not (folder / "annotations").is_dir():
            raise FileNotFoundError(f"task {task.name!r}: dataset {task.dataset!r} is neither one of the config's "
                                    f"datasets ({sorted(self.datasets)}) nor a COCO-format folder with annotations/")
        return folder

    def missing(self, task: DetectionTask) -> list[str]:
        """What the task's data needs that is not on disk (a synthetic dataset is made here: nothing)."""
        spec = self.datasets.get(task.dataset)
        if isinstance(spec, CocoSubset):
            return spec.missing()
        if spec is None and not (Path(task.dataset) / "annotations").is_dir():
            return [f"dataset {task.dataset} (neither one of the config's datasets {sorted(self.datasets)} nor a "
                    "COCO-format folder with annotations/)"]
        return []

    def source(self, task: DetectionTask) -> dict:
        """What a task's data is (hashed into its zoo entry and its condition)."""
        spec = self.datasets.get(task.dataset)
        if isinstance(spec, CocoSubset):
            data = {"coco": spec.identity()}
        elif spec is not None:
            data = {"synthetic": asdict(spec)}
        else:  # a user's folder: its annotation files stand for it
            folder = Path(task.dataset) / "annotations"
            data = {"folder": str(Path(task.dataset).resolve()),
                    "annotations": {p.name: file_hash(p) for p in sorted(folder.glob("instances_*.json"))}}
        return {"task": {"dataset": task.dataset, "categories": list(task.categories)}, "data": data}

