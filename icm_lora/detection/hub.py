"""Any ``transformers`` ``AutoModelForObjectDetection`` as a base detector (DETR, Conditional DETR, RT-DETR, ...).

The model is used as it is, so generated adapters load onto the plain transformers model with
``PeftModel.from_pretrained``. Images are normalised as the model's ``preprocessor_config.json``
says (ImageNet statistics when it has none). Training uses the model's own set-prediction loss
(Hungarian matching, its config's loss weights); a task's targets are its categories' boxes, so
the LoRA learns to report them and nothing else. Detection reads the class scores of the task's
channels only: softmax without the "no object" class where the head has ``num_labels + 1``
outputs (DETR), sigmoid otherwise (RT-DETR, Deformable and Conditional DETR), top ``top_k`` over
queries x channels (set prediction needs no NMS). Task vectors read the encoder's last hidden
state (the finest map where the encoder returns several).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from .bases import BaseDetector, folder_key

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HUB_HINT = ("the Hugging Face hub could not be reached and it is not in the local cache: download it where there "
            "is internet (`hf download {name}`), or set base_dir to a local folder with config.json and "
            "model.safetensors; the offline default is `make detection`")


def cached_file(name: str, filename: str) -> Path | None:
    """``filename`` of the model ``name`` (a local folder or a hub id in the local cache), without the network."""
    if Path(name).is_dir():
        path = Path(name) / filename
        return path if path.exists() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, filename)
    return Path(found) if isinstance(found, str) else None


def missing(name: str) -> str | None:
    """Why the model ``name`` cannot be loaded without the network, or None if it can."""
    if cached_file(name, "config.json") is not None:
        return None
    if Path(name).is_dir():
        return f"base model {name}: the folder has no config.json"
    return f"base model {name!r}: not a local folder and not in the Hugging Face cache"


def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a connection (checked before a download, which retries for a minute)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str):
    """The frozen transformers detector ``name`` (fp32, eval mode), with errors that name it."""
    from transformers import AutoModelForObjectDetection

    if missing(name) and (Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1" or not reachable()):
        raise FileNotFoundError(f"{missing(name)}; " + (HUB_HINT.format(name=name) if not Path(name).exists()
                                                          else "a transformers model folder has config.json"))

    try:
        model = AutoModelForObjectDetection.from_pretrained(name, dtype=torch.float32)
    except OSError as err:
        if Path(name).exists():
            raise ValueError(f"{name}: not a loadable transformers detector ({str(err).splitlines()[0]})") from err
        raise FileNotFoundError(f"base model {name!r}: {HUB_HINT.format(name=name)}") from err
    except (ValueError, KeyError) as err:
        raise ValueError(f"{name}: not a transformers object-detection model ({str(err).splitlines()[0]})") from err
    model.requires_grad_(False)
    return model.eval()


class HubDetector(BaseDetector):
    """A transformers detector as the pipeline's base.

    Args:
        name: hub id or local folder.
        image_size: the square side images are resized to (None: not known here; the DataModule needs it).
    """

    def __init__(self, name: str, image_size: int | None) -> None:
        self.name, self.image_size = name, image_size
        self.model = load_model(name)
        self.mean, self.std = normalisation(name)
        with torch.no_grad():
            probe = self.model(pixel_values=torch.zeros(1, 3, 64, 64))
        self.token_dim = self._grid(probe).shape[-1]
        self.labels = self.model.config.num_labels
        self.no_object = probe.logits.shape[-1] == self.labels + 1  # DETR's softmax head

    def key(self) -> str:
        if not hasattr(self, "_key"):
            config = cached_file(self.name, "config.json")  # a hub model's: .../snapshots/<commit>/config.json
            self._key = (folder_key(Path(self.name)) if Path(self.name).is_dir()
                         else f"{self.name}@{config.parent.name}" if config else self.name)
        return self._key

    def channel_map(self, coco, category_ids: list[int]) -> dict[int, int]:
        """By name where the model's labels name the categories (a COCO-trained model keeps its classes);
        categories it has no label for take channel i for the dataset's i-th category id (a novel category
        then reuses a trained class's channel, with a warning)."""
        by_name = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        named = [cid for cid in category_ids if cats[cid].lower() in by_name]
        if named and len(named) < len(category_ids):
            absent = sorted(cats[c] for c in category_ids if c not in named)
            raise ValueError(f"{self.name}: the model's labels lack categories {absent} of a task that has "
                             f"{sorted(cats[c] for c in named)}; use one kind per task")
        if named:
            return {cid: by_name[cats[cid].lower()] for cid in category_ids}
        ids = sorted(cats)
        beyond = sorted(cats[c] for c in category_ids if ids.index(c) >= self.labels)
        if beyond:
            raise ValueError(f"{self.name}: categories {beyond} come after the model's {self.labels} labels in the "
                             "dataset's order")
        if not all(str(v).startswith("LABEL_") for v in self.model.config.id2label.values()):
            warnings.warn(f"{self.name}: categories {sorted(cats[c] for c in category_ids)} are not among the "
                          "model's labels; they take the channels of the dataset's order", stacklevel=2)
        return {cid: ids.index(cid) for cid in category_ids}

    def _pixels(self, images: Tensor) -> Tensor:
        if self.mean is None:
            return images
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def loss(self, net, images, boxes, labels, channels) -> dict[str, Tensor]:
        h, w = images.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        targets = []
        for b, lab in zip(boxes, labels):
            cxcywh = torch.cat([b[:, :2] + b[:, 2:] / 2, b[:, 2:]], dim=1) / scale  # (n, 4) in [0, 1]
            targets.append({"class_labels": lab.to(images.device), "boxes": cxcywh.to(images.device)})
        out = net(pixel_values=self._pixels(images), labels=targets)
        parts = {k: v.detach() for k, v in (out.loss_dict or {}).items() if torch.is_tensor(v) and v.ndim == 0}
        return {"loss": out.loss} | parts

    def detect(self, net, images, channels, top_k) -> list[dict[str, Tensor]]:
        h, w = images.shape[-2:]
        out = net(pixel_values=self._pixels(images))
        logits = out.logits.float()  # (B, Q, labels [+ 1])
        probs = logits.softmax(-1)[..., :-1] if self.no_object else logits.sigmoid()
        ch = torch.tensor(channels, device=logits.device)
        probs = probs[..., ch]  # (B, Q, c)
        scores, index = probs.flatten(1).topk(min(top_k, probs[0].numel()), dim=1)  # (B, K)
        query, label = index // len(channels), index % len(channels)
        box = out.pred_boxes.float().gather(1, query[..., None].expand(-1, -1, 4))  # (B, K, 4) cx, cy, w, h in [0, 1]
        scale = torch.tensor([w, h, w, h], device=box.device, dtype=box.dtype)
        xyxy = torch.cat([box[..., :2] - box[..., 2:] / 2, box[..., :2] + box[..., 2:] / 2], -1) * scale
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)
        xywh = torch.cat([xyxy[..., :2], xyxy[..., 2:] - xyxy[..., :2]], -1)
        return [{"boxes": xywh[i], "scores": scores[i], "labels": ch[label[i]]} for i in range(len(images))]

    def _grid(self, out) -> Tensor:
        state = out.encoder_last_hidden_state
        if isinstance(state, (list, tuple)):  # several maps (RT-DETR): the finest
            state = state[0]
        if state.ndim == 4:  # (B, D, H, W)
            return state.permute(0, 2, 3, 1)
        n = state.shape[1]
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{self.name}: its encoder's {n} tokens are not one square map; task vectors need "
                             "one (DETR, Conditional DETR and RT-DETR have it)")
        return state.view(state.shape[0], side, side, -1)  # (B, G, G, D)

    def tokens(self, images: Tensor) -> Tensor:
        return self._grid(self.model(pixel_values=self._pixels(images)))


def normalisation(name: str) -> tuple[tuple | None, tuple | None]:
    """Mean and std the model's processor normalises with ((None, None): none; ImageNet's when it is silent)."""
    path = cached_file(name, "preprocessor_config.json")
    if path is None:
        return IMAGENET_MEAN, IMAGENET_STD
    spec = json.loads(path.read_text(encoding="utf-8"))
    if not spec.get("do_normalize", True):
        return None, None
    return tuple(spec.get("image_mean", IMAGENET_MEAN)), tuple(spec.get("image_std", IMAGENET_STD))
