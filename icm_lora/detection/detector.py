"""A small anchor-free detector: conv stem, transformer encoder, CenterNet-style heads (no NMS).

The encoder's attention projections ``q``, ``k``, ``v``, ``o`` and the class head ``heatmap`` are
``nn.Linear`` layers, the LoRA targets. Each grid cell of stride ``stride`` predicts a score per
class (a peak marks an object's centre), and the object's centre offset within the cell and its log
width and height. Decoding keeps the cells that are a 3 x 3 local maximum of their class map, so no
box suppression is needed. Saved as ``config.json`` + ``model.safetensors``. ``OwnDetector`` is
this detector as the pipeline's base (``bases.BaseDetector``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import atomic_dir, load_tensors, read_json, save_tensors, write_json
from .bases import BaseDetector, folder_key

MODEL_TYPE = "icm_lora-detector"
LORA_TARGETS = ["q", "k", "v", "o", "heatmap"]


@dataclass
class DetectorConfig:
    """The detector's shape.

    Args:
        image_size: square input side in pixels.
        num_classes: class channels (category id ``i + 1`` is channel ``i``).
        dim: token width of the encoder.
        depth: encoder blocks.
        heads: attention heads.
        mlp_ratio: hidden width of each block's MLP, as a multiple of ``dim``.
        stem_channels: channels of the first stem convolution.
        stride: input pixels per grid cell (the stem downsamples by this; a power of 2).
    """

    image_size: int = 64
    num_classes: int = 16
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    stem_channels: int = 32
    stride: int = 4

    def __post_init__(self) -> None:
        if self.stride < 2 or self.stride & (self.stride - 1) or self.image_size % self.stride:
            raise ValueError(f"detector: stride must be a power of 2 dividing image_size, got {self.stride}")
        if self.dim % self.heads:
            raise ValueError(f"detector: dim {self.dim} is not a multiple of heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.stride


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D)
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Detector(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> class logits (B, C, G, G) and boxes (B, 4, G, G)."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        layers, channels = [], 3
        for i in range(int(math.log2(config.stride))):
            out = config.stem_channels if i == 0 else config.dim
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(1, out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, config.dim, 3, padding=1))
        self.stem = nn.Sequential(*layers)
        self.pos = nn.Parameter(torch.randn(1, config.grid ** 2, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.hidden = nn.Linear(config.dim, config.dim)
        self.heatmap = nn.Linear(config.dim, config.num_classes)
        self.box = nn.Linear(config.dim, 4)  # centre offset (x, y) in the cell, log width, log height in cells
        nn.init.constant_(self.heatmap.bias, -math.log(99.0))  # CenterNet's prior: p = 0.01 everywhere

    def features(self, images: Tensor) -> Tensor:
        """The encoder's output tokens (B, G * G, D), row-major over the grid."""
        x = self.stem(images * 2 - 1)  # (B, D, G, G)
        x = x.flatten(2).transpose(1, 2) + self.pos  # (B, G * G, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        b, g = images.shape[0], self.config.grid
        h = F.gelu(self.hidden(self.features(images)))  # (B, G * G, D)
        logits = self.heatmap(h).transpose(1, 2).reshape(b, -1, g, g)  # (B, C, G, G)
        boxes = self.box(h).transpose(1, 2).reshape(b, 4, g, g)  # (B, 4, G, G)
        return logits, boxes


def save_detector(folder: str | Path, model: Detector, extra: dict | None = None,
                  sidecars: dict[str, object] | None = None) -> None:
    """Write ``config.json``, ``model.safetensors`` and any ``{name}.json`` sidecars, all or nothing."""
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / "model.safetensors", {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
        write_json(tmp / "config.json", {"model_type": MODEL_TYPE, **asdict(model.config), **(extra or {})})
        for name, data in (sidecars or {}).items():
            write_json(tmp / f"{name}.json", data)


def load_detector(folder: str | Path) -> Detector:
    """The detector saved in ``folder`` (fp32, eval mode, frozen), with errors that name the file."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no detector here (config.json missing); pretrain it first: "
                                "python -m icm_lora.detection.pretrain --config experiments/shapes.yaml")
    raw = read_json(folder / "config.json")
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{folder / 'config.json'}: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
    model = Detector(DetectorConfig(**{f.name: raw[f.name] for f in fields(DetectorConfig) if f.name in raw}))
    state = load_tensors(folder / "model.safetensors")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise ValueError(f"{folder / 'model.safetensors'}: tensors do not match config.json (e.g. {wrong})")
    model.load_state_dict(state)
    model.name_or_path = str(folder)  # PEFT records it as the adapters' base_model_name_or_path
    model.requires_grad_(False)
    return model.eval()


def targets(boxes: list[Tensor], labels: list[Tensor], config: DetectorConfig) -> tuple[Tensor, Tensor, Tensor]:
    """CenterNet targets for a batch.

    Args:
        boxes: per image (n, 4) ground-truth boxes ``[x, y, w, h]`` in pixels.
        labels: per image (n,) class channels.
        config: the detector's shape.

    Returns:
        heat (B, C, G, G): a Gaussian of each object's size around its centre cell, 1 at that cell;
        box (B, 4, G, G): offset and log size at centre cells; mask (B, G, G): True at centre cells.
    """
    g, s = config.grid, config.stride
    heat = torch.zeros(len(boxes), config.num_classes, g, g)
    box = torch.zeros(len(boxes), 4, g, g)
    mask = torch.zeros(len(boxes), g, g, dtype=torch.bool)
    grid = torch.arange(g, dtype=torch.float32)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        for (x, y, w, h), c in zip(b.tolist(), lab.tolist()):
            cx, cy = (x + w / 2) / s, (y + h / 2) / s
            ix, iy = min(int(cx), g - 1), min(int(cy), g - 1)
            sigma = max(0.5, math.sqrt(w * h) / s / 6)
            gauss = torch.exp(-((grid[None, :] - ix) ** 2 + (grid[:, None] - iy) ** 2) / (2 * sigma ** 2))  # (G, G)
            heat[i, c] = torch.maximum(heat[i, c], gauss)
            box[i, :, iy, ix] = torch.tensor([cx - ix, cy - iy, math.log(w / s), math.log(h / s)])
            mask[i, iy, ix] = True
    return heat, box, mask


def loss(logits: Tensor, pred_box: Tensor, heat: Tensor, box: Tensor, mask: Tensor, box_weight: float = 1.0) -> dict:
    """CenterNet's penalty-reduced focal loss on the class maps plus L1 on boxes at centre cells."""
    logits, pred_box = logits.float(), pred_box.float()
    pos = heat.eq(1).float()
    num_pos = pos.sum().clamp(min=1)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    focal = -(pos * (1 - p) ** 2 * log_p + (1 - pos) * (1 - heat) ** 4 * p ** 2 * log_not_p).sum() / num_pos
    cells = mask[:, None].expand_as(box)  # (B, 4, G, G)
    l1 = (pred_box - box).abs()[cells].sum() / mask.sum().clamp(min=1)
    return {"loss": focal + box_weight * l1, "focal": focal.detach(), "box_l1": l1.detach()}


@torch.no_grad()
def decode(logits: Tensor, pred_box: Tensor, config: DetectorConfig, top_k: int = 100) -> list[dict[str, Tensor]]:
    """Per image: ``boxes`` (K, 4) as ``[x, y, w, h]`` pixels, ``scores`` (K,), ``labels`` (K,) channels."""
    b, c, g, _ = logits.shape
    heat = logits.float().sigmoid()
    heat = heat * (heat == F.max_pool2d(heat, 3, stride=1, padding=1))  # local peaks only: no NMS needed
    scores, index = heat.flatten(1).topk(min(top_k, c * g * g), dim=1)  # (B, K)
    labels, cell = index // (g * g), index % (g * g)
    iy, ix = cell // g, cell % g
    out = pred_box.float().flatten(2).gather(2, cell[:, None].expand(b, 4, -1))  # (B, 4, K)
    s = config.stride
    cx, cy = (ix + out[:, 0]) * s, (iy + out[:, 1]) * s
    w, h = out[:, 2].clamp(max=8).exp() * s, out[:, 3].clamp(max=8).exp() * s
    x0, y0 = (cx - w / 2).clamp(min=0), (cy - h / 2).clamp(min=0)
    x1, y1 = (cx + w / 2).clamp(max=config.image_size), (cy + h / 2).clamp(max=config.image_size)
    boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)  # (B, K, 4)
    return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(b)]


class OwnDetector(BaseDetector):
    """The project's detector as a base: CenterNet targets, focal + L1 loss, peak decoding.

    Args:
        model: the detector (frozen for LoRA; trained from scratch in pretraining).
        name: its folder ("" for one being pretrained).
        box_weight: weight of the box L1 against the focal loss.
    """

    def __init__(self, model: Detector, name: str = "", box_weight: float = 1.0) -> None:
        self.model, self.name, self.box_weight = model, name, box_weight
        self.config = model.config
        self.image_size, self.token_dim = model.config.image_size, model.config.dim

    def key(self) -> str:
        if not hasattr(self, "_key"):
            self._key = folder_key(Path(self.name))
        return self._key

    def channel_map(self, coco, category_ids: list[int]) -> dict[int, int]:
        ids = sorted(coco.getCatIds())  # channel i is the dataset's i-th category id (id - 1 for shapes)
        if max(ids.index(c) for c in category_ids) >= self.config.num_classes:
            raise ValueError(f"{self.name}: the dataset has {len(ids)} categories, the detector "
                             f"{self.config.num_classes} class channels")
        return {cid: ids.index(cid) for cid in category_ids}

    def loss(self, net, images, boxes, labels, channels) -> dict[str, Tensor]:
        logits, pred = net(images)  # (B, C, G, G), (B, 4, G, G)
        heat, box, mask = targets(boxes, labels, self.config)
        dev = logits.device
        return loss(logits[:, channels], pred, heat[:, channels].to(dev), box.to(dev), mask.to(dev), self.box_weight)

    def detect(self, net, images, channels, top_k) -> list[dict[str, Tensor]]:
        logits, boxes = net(images)
        ch = torch.tensor(channels, device=logits.device)
        out = decode(logits[:, ch], boxes, self.config, top_k)
        for pred in out:  # decoded indices among the task's channels -> the model's channels
            pred["labels"] = ch[pred["labels"]]
        return out

    def tokens(self, images: Tensor) -> Tensor:
        g = self.config.grid
        return self.model.features(images).view(len(images), g, g, -1)  # (B, G, G, D)
