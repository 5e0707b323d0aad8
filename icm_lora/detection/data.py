"""COCO-format detection data (images + ``annotations/instances_{split}.json``) read with pycocotools.

A task is one category, or a set of them, of such a dataset. Images are resized to the detector's
square input and kept in memory as uint8; boxes are scaled with them, and ``to_coco`` maps
predictions back to the original pixels for COCOeval.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .shapes import ShapesSpec, build


def read_coco(root: str | Path, split: str) -> COCO:
    """pycocotools' index of ``root/annotations/instances_{split}.json``, with errors that name it."""
    path = Path(root) / "annotations" / f"instances_{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (a COCO-format dataset has images and "
                                f"annotations/instances_{{train,val,test}}.json)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a COCO annotation file ({err})") from err


def category_ids(coco: COCO, names: list[str] | None) -> list[int]:
    """COCO ids of the named categories (all when ``names`` is None); unknown names fail clearly."""
    by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    if names is None:
        return sorted(by_name.values())
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(f"categories {unknown or names} are not in the dataset; it has {sorted(by_name)}")
    return [by_name[n] for n in names]


class CocoImages(Dataset):
    """One split: (image (3, S, S) float in [0, 1], boxes (n, 4) ``[x, y, w, h]`` at S, channels (n,), image id).

    Args:
        root: the dataset folder.
        split: ``train``, ``val`` or ``test``.
        category_ids: the task's categories; other objects are not targets.
        image_size: the detector's input side S.
        channel_map: gives the base's class channel of each category id (``BaseDetector.channel_map``;
            default: the id's rank among the dataset's ids).
    """

    def __init__(self, root: str | Path, split: str, category_ids: list[int], image_size: int,
                 channel_map: Callable[[COCO, list[int]], dict[int, int]] | None = None) -> None:
        self.coco = read_coco(root, split)
        self.category_ids = list(category_ids)
        ids = sorted(self.coco.getCatIds())
        self.channel = (channel_map(self.coco, self.category_ids) if channel_map
                        else {cid: ids.index(cid) for cid in self.category_ids})
        self.image_ids = sorted(self.coco.getImgIds())
        if not self.image_ids:
            raise ValueError(f"{root}: split {split!r} has no images")
        self.size = image_size
        self.images, self.scales, self.boxes, self.labels, self.paths = [], [], [], [], []
        for image_id in self.image_ids:
            info = self.coco.loadImgs(image_id)[0]
            path = Path(root) / info["file_name"]
            try:
                image = Image.open(path).convert("RGB")
            except OSError as err:
                raise ValueError(f"{path}: not a readable image ({err})") from err
            scale = (image_size / image.width, image_size / image.height)
            self.paths.append(path)
            self.images.append(torch.from_numpy(np.array(image.resize((image_size, image_size)))).permute(2, 0, 1))
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, catIds=self.category_ids, iscrowd=False))
            box = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            self.boxes.append(box * torch.tensor([scale[0], scale[1], scale[0], scale[1]]))
            self.labels.append(torch.tensor([self.channel[a["category_id"]] for a in anns], dtype=torch.long))
            self.scales.append(scale)

    @property
    def channels(self) -> list[int]:
        return [self.channel[c] for c in self.category_ids]

    def original(self, i: int) -> Image.Image:
        """Image ``i`` as stored (its own size), for drawing boxes in original pixels."""
        return Image.open(self.paths[i])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, int]:
        return self.images[i].float() / 255, self.boxes[i], self.labels[i], i

    def results(self, index: list[int], detections: list[dict[str, Tensor]]) -> list[dict]:
        """COCO result dicts of images ``index`` from a base's decoded detections (``BaseDetector.detect``)."""
        out = []
        for i, pred in zip(index, detections):
            out += self.to_coco(i, {k: v.cpu() for k, v in pred.items()})
        return out

    def to_coco(self, index: int, pred: dict[str, Tensor]) -> list[dict]:
        """COCO result dicts of one image's decoded predictions, in its original pixels, task channels only."""
        sx, sy = self.scales[index]
        category = {self.channel[c]: c for c in self.category_ids}
        boxes = pred["boxes"] / torch.tensor([sx, sy, sx, sy])
        return [{"image_id": self.image_ids[index], "category_id": category[int(lab)], "bbox": [float(v) for v in box],
                 "score": float(score)}
                for box, score, lab in zip(boxes, pred["scores"], pred["labels"]) if int(lab) in category]


def collate(batch: list) -> tuple[Tensor, list[Tensor], list[Tensor], list[int]]:
    images, boxes, labels, index = zip(*batch)
    return torch.stack(images), list(boxes), list(labels), list(index)


class DetectionData(L.LightningDataModule):
    """Train / val / test loaders of one task of a COCO-format dataset.

    Args:
        root: the dataset folder (built here first when ``shapes`` is given).
        categories: the task's category names (None: all of the dataset's).
        shapes: a synthetic dataset to build at ``root`` (reused when already built from the same spec).
        image_size: the detector's input side.
        batch_size: images per training step.
        num_workers: loader processes.

    ``channel_map`` (set by the zoo builder, not a setting: the pretraining key is made of these
    arguments) gives a base's class channel of each category id (``BaseDetector.channel_map``).
    """

    def __init__(self, root: str = "zoo/detection/shapes", categories: list[str] | None = None,
                 shapes: ShapesSpec | None = None, image_size: int = 64, batch_size: int = 32,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.root, self.categories, self.shapes = root, categories, shapes
        self.channel_map: Callable[[COCO, list[int]], dict[int, int]] | None = None
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.splits: dict[str, CocoImages] = {}

    def setup(self, stage: str | None = None) -> None:
        # The dataset is built here, not in prepare_data: the zoo trains each task with its own one-device
        # Trainer inside a DDP rank, and Lightning wraps prepare_data in a barrier of every rank.
        if self.splits:
            return
        if self.shapes is not None:
            build(self.root, self.shapes)
        ids = category_ids(read_coco(self.root, "train"), self.categories)
        for split in ("train", "val", "test"):
            self.splits[split] = CocoImages(self.root, split, ids, self.image_size, self.channel_map)

    @property
    def channels(self) -> list[int]:
        return self.splits["train"].channels

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, drop_last=shuffle and len(self.splits[split]) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
