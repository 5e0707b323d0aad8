"""A user's COCO-format dataset (COCO 2017 itself, or any like it) as a detection dataset of the pipeline.

COCO ships ``annotations/instances_{train,val}2017.json`` beside ``train2017/`` and ``val2017/``, and
no test annotations. ``CocoSubset`` says which annotation file and image folder each of the
pipeline's splits (train / val / test) comes from, optionally a fold of it (the usual choice: train
on train2017 and split val2017 into validation and test by alternating images), which images to keep
(those holding given categories, at most ``max_images`` per split, in id order) and writes them as
``annotations/instances_{split}.json`` with absolute image paths, once per spec, atomically.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import atomic_dir, read_json, write_json
from .data import read_coco

SPLITS = ("train", "val", "test")


@dataclass
class CocoSplit:
    """Where one split comes from.

    Args:
        annotations: COCO instances file, relative to the dataset's root.
        images: the folder its ``file_name`` entries are relative to, relative to the root.
        fold: ``[k, n]`` keeps the images at positions k, k + n, k + 2n, ... in id order (None: all).
    """

    annotations: str
    images: str
    fold: list[int] | None = None

    def __post_init__(self) -> None:
        if self.fold is not None and not (len(self.fold) == 2 and 0 <= self.fold[0] < self.fold[1]):
            raise ValueError(f"{self.annotations}: fold must be [k, n] with 0 <= k < n, got {self.fold}")


def _coco2017(split: str, fold: list[int] | None = None) -> CocoSplit:
    return CocoSplit(f"annotations/instances_{split}2017.json", f"{split}2017", fold)


@dataclass
class CocoSubset:
    """Splits of a COCO-format dataset, written as the pipeline's ``instances_{train,val,test}.json``.

    Args:
        root: the dataset's folder (for COCO 2017: the one holding ``annotations/``, ``train2017/``, ``val2017/``).
        train: where the training split comes from (default: train2017).
        val: where the validation split comes from (default: even positions of val2017).
        test: where the test split comes from (default: odd positions of val2017).
        categories: keep the images holding one of these categories (None: every image); every category
            and annotation of a kept image stays.
        max_images: at most this many images per split, in id order (missing: all).
    """

    root: str
    train: CocoSplit = field(default_factory=lambda: _coco2017("train"))
    val: CocoSplit = field(default_factory=lambda: _coco2017("val", [0, 2]))
    test: CocoSplit = field(default_factory=lambda: _coco2017("val", [1, 2]))
    categories: list[str] | None = None
    max_images: dict[str, int] = field(default_factory=dict)

    def splits(self) -> dict[str, CocoSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def missing(self) -> list[str]:
        """What the spec needs that is not on disk."""
        root = Path(self.root)
        if not root.is_dir():
            return [f"COCO folder {root} (set its root in the config's datasets)"]
        out = []
        for split in self.splits().values():
            for part in (split.annotations, split.images):
                if not (root / part).exists() and str(root / part) not in out:
                    out.append(str(root / part))
        return out

    def identity(self) -> dict:
        """The spec and the size and modification time of each source annotation file (cheap to check)."""
        stats = {}
        for split in self.splits().values():
            path = Path(self.root) / split.annotations
            stats[split.annotations] = [path.stat().st_size, int(path.stat().st_mtime)] if path.exists() else None
        return {"spec": asdict(self), "sources": stats}


def build_subset(out: str | Path, spec: CocoSubset) -> Path:
    """Write ``out/annotations/instances_{split}.json`` for ``spec`` unless already written from it."""
    out = Path(out)
    marker = out / "subset.json"
    identity = json.loads(json.dumps(spec.identity()))
    if marker.exists() and read_json(marker) == identity:
        return out
    gone = spec.missing()
    if gone:
        raise FileNotFoundError(f"dataset {out.name}: missing {', '.join(gone)}")
    with atomic_dir(out) as tmp:
        sources: dict[str, dict] = {}
        for name, split in spec.splits().items():
            if split.annotations not in sources:
                sources[split.annotations] = _read(Path(spec.root) / split.annotations)
            data = _select(sources[split.annotations], split, spec, name)
            images_dir = (Path(spec.root) / split.images).resolve()
            for image in data["images"]:
                image["file_name"] = str(images_dir / image["file_name"])
            write_json(tmp / "annotations" / f"instances_{name}.json", data)
        write_json(tmp / "subset.json", identity)
    for split in SPLITS:  # what is written must load
        read_coco(out, split)
    return out


def _read(path: Path) -> dict:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable COCO annotation file ({err})") from err
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file (no {', '.join(missing)})")
    return data


def _select(data: dict, split: CocoSplit, spec: CocoSubset, name: str) -> dict:
    images = sorted(data["images"], key=lambda im: im["id"])
    if split.fold is not None:
        k, n = split.fold
        images = images[k::n]
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    if spec.categories is not None:
        by_name = {c["name"]: c["id"] for c in data["categories"]}
        unknown = [c for c in spec.categories if c not in by_name]
        if unknown:
            raise ValueError(f"{split.annotations}: no categories {unknown} (it has {sorted(by_name)[:10]}, ...)")
        wanted = {by_name[c] for c in spec.categories}
        images = [im for im in images if any(a["category_id"] in wanted for a in by_image.get(im["id"], []))]
    images = images[: spec.max_images.get(name, len(images))]
    if not images:
        raise ValueError(f"{split.annotations}: the {name} split keeps no images")
    kept = {im["id"] for im in images}
    return {"images": [dict(im) for im in images], "categories": data["categories"],
            "annotations": [a for a in data["annotations"] if a["image_id"] in kept]}
