"""The seam between the detection pipeline and a base detector: what a base must supply.

The zoo, the task vectors, the scorer and the Lightning system only ever call the five methods of
``BaseDetector``; two bases implement them side by side:

- ``detector.OwnDetector``: the project's small CenterNet-style detector (the offline default,
  pretrained by ``python -m icm_lora.detection.pretrain``);
- ``hub.HubDetector``: any ``transformers`` ``AutoModelForObjectDetection`` (DETR, Conditional DETR,
  RT-DETR, ...) by hub id or local folder.

Images enter as (B, 3, S, S) floats in [0, 1]; boxes are ``[x, y, w, h]`` in input pixels and
labels are the model's class channels, so COCO bookkeeping stays in ``data.CocoImages``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from pycocotools.coco import COCO
from torch import Tensor, nn

from ..files import file_hash, read_json


class BaseDetector(ABC):
    """A frozen base detector and what the pipeline asks of it.

    Attributes:
        name: how it is named (a folder or a hub id); adapters record it as their base model.
        model: the bare ``nn.Module`` (fp32, eval mode, frozen); PEFT wraps it for LoRA.
        image_size: the square side images are resized to (a transformers base: as configured, or None).
        token_dim: width of the encoder tokens a task vector is made of.
    """

    name: str
    model: nn.Module
    image_size: int
    token_dim: int

    @abstractmethod
    def key(self) -> str:
        """The base's identity, hashed into zoo entries and task vectors."""

    @abstractmethod
    def channel_map(self, coco: COCO, category_ids: list[int]) -> dict[int, int]:
        """The class channel of each of a task's category ids in the dataset ``coco``."""

    @abstractmethod
    def loss(self, net: nn.Module, images: Tensor, boxes: list[Tensor], labels: list[Tensor],
             channels: list[int]) -> dict[str, Tensor]:
        """Training loss of ``net`` (this base, bare or LoRA-wrapped) on a batch; ``loss`` is the total."""

    @abstractmethod
    def detect(self, net: nn.Module, images: Tensor, channels: list[int], top_k: int) -> list[dict[str, Tensor]]:
        """Per image ``boxes`` (K, 4) ``[x, y, w, h]`` input pixels, ``scores`` (K,), ``labels`` (K,) among ``channels``."""

    @abstractmethod
    def tokens(self, images: Tensor) -> Tensor:
        """The bare base's encoder tokens on their spatial grid, (B, Gh, Gw, D)."""


def is_own_detector(folder: str | Path) -> bool:
    """Whether ``folder`` holds a detector of this project (``config.json`` with its model_type)."""
    from .detector import MODEL_TYPE

    config = Path(folder) / "config.json"
    return config.exists() and read_json(config).get("model_type") == MODEL_TYPE


def is_own(name: str | Path) -> bool:
    """Whether ``name`` names a detector of this project: its folder, or a missing path (``a/b/c``; a hub
    id is ``org/name``) where one is to be pretrained."""
    return is_own_detector(name) or (not Path(name).exists() and str(name).count("/") > 1)


def missing(name: str | Path) -> str | None:
    """Why a transformers base ``name`` cannot be loaded from disk (not cached), or None."""
    from .hub import missing as hub_missing

    return None if is_own(name) else hub_missing(str(name))


def load_base(name: str | Path, image_size: int | None = None) -> BaseDetector:
    """The base detector ``name``: a folder this project pretrained, or any ``AutoModelForObjectDetection``
    folder or hub id (``org/name``; then ``image_size`` is the side images are resized to)."""
    from .detector import OwnDetector, load_detector
    from .hub import HubDetector

    folder = Path(name)
    if is_own(name):
        model = load_detector(folder)  # a missing folder of ours ends in load_detector's "pretrain it first"
        if image_size not in (None, model.config.image_size):
            raise ValueError(f"{folder / 'config.json'}: this detector takes {model.config.image_size}-pixel "
                             f"images, not image_size {image_size}")
        return OwnDetector(model, str(name))
    return HubDetector(str(name), image_size)


def folder_key(folder: Path) -> str:
    """A local base's identity: its pretraining settings' key, or its weights' hash."""
    record = folder / "pretrain.json"
    if record.exists():
        return read_json(record)["key"]
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"{folder}: no weights (model.safetensors) beside config.json")
    return "-".join(file_hash(p) for p in weights)
