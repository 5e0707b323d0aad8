"""A deterministic synthetic detection dataset in COCO format: coloured, textured shapes on varied scenes.

Every dataset uses the same 16 categories with the same COCO ids (1-16, ``CATEGORIES``), so a
detector's class channel ``i`` is category id ``i + 1`` in every dataset. A dataset draws its objects
from a subset of them in one *style*: ``plain`` (smooth backgrounds), ``noisy`` (strong pixel
noise), ``tiny`` (objects of 4-8 pixels) or ``textured`` (high-contrast patterned backgrounds).
Every style adds clutter (unlabelled blobs) and partial occlusion (a later object may cover part of
an earlier one; boxes stay the full extent of each shape). Images are PNG files, annotations are
``annotations/instances_{split}.json``, and the folder is written atomically, so an interrupted
build never leaves a dataset that looks whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_dir, read_json, write_json
from ..tasks import fingerprint

SPLITS = ("train", "val", "test")
STYLES = ("plain", "noisy", "tiny", "textured")
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar", "ellipse",
          "semicircle", "lshape", "octagon")
TEXTURES = ("solid", "stripes", "checker", "hollow")


@dataclass(frozen=True)
class Category:
    """One object category: a shape drawn in a colour with a texture."""

    name: str
    shape: str
    colour: tuple[int, int, int]
    texture: str = "solid"


CATEGORIES: tuple[Category, ...] = (
    Category("red_circle", "circle", (220, 40, 40)),
    Category("blue_square", "square", (40, 70, 220)),
    Category("green_triangle", "triangle", (40, 190, 60)),
    Category("yellow_diamond", "diamond", (230, 210, 40)),
    Category("magenta_cross", "cross", (210, 40, 200)),
    Category("cyan_ring", "ring", (40, 210, 220)),
    Category("orange_bar", "hbar", (240, 140, 30)),
    Category("striped_square", "square", (235, 235, 235), "stripes"),
    Category("checker_circle", "circle", (60, 200, 90), "checker"),
    Category("hollow_triangle", "triangle", (80, 120, 255), "hollow"),
    Category("purple_ellipse", "ellipse", (140, 60, 200)),
    Category("pink_lshape", "lshape", (250, 130, 180)),
    Category("lime_semicircle", "semicircle", (170, 240, 60)),
    Category("teal_bar", "vbar", (30, 140, 130)),
    Category("brown_octagon", "octagon", (150, 90, 40)),
    Category("striped_diamond", "diamond", (240, 240, 240), "stripes"),
)
CATEGORY_IDS = {c.name: i + 1 for i, c in enumerate(CATEGORIES)}


@dataclass
class ShapesSpec:
    """One synthetic dataset.

    Args:
        categories: names from ``CATEGORIES`` whose objects appear (and are annotated).
        style: ``plain``, ``noisy``, ``tiny`` or ``textured``.
        image_size: square image side in pixels.
        images: images per split, ``{train: n, val: n, test: n}``.
        objects: least and most annotated objects per image.
        clutter: most unlabelled blobs per image.
        seed: the dataset's seed (each split draws from its own stream of it).
    """

    categories: list[str]
    style: str = "plain"
    image_size: int = 64
    images: dict[str, int] = field(default_factory=lambda: {"train": 512, "val": 128, "test": 128})
    objects: tuple[int, int] = (1, 4)
    clutter: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in CATEGORY_IDS]
        if unknown or not self.categories:
            raise ValueError(f"shapes dataset: unknown or no categories {unknown or self.categories}; "
                             f"known: {sorted(CATEGORY_IDS)}")
        if self.style not in STYLES:
            raise ValueError(f"shapes dataset: style must be one of {STYLES}, got {self.style!r}")
        if set(self.images) - set(SPLITS):
            raise ValueError(f"shapes dataset: splits must be among {SPLITS}, got {sorted(self.images)}")
        self.objects = tuple(self.objects)
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"shapes dataset: objects must be 1 <= least <= most, got {self.objects}")


def build(root: str | Path, spec: ShapesSpec) -> Path:
    """Write the dataset under ``root`` once; a folder built from the same spec is reused as it is."""
    root = Path(root)
    key = fingerprint(asdict(spec), "shapes-v1")
    marker = root / "dataset.json"
    if marker.exists() and read_json(marker).get("key") == key:
        return root
    with atomic_dir(root) as tmp:
        for s, (split, n) in enumerate(sorted(spec.images.items())):
            rng = np.random.default_rng([spec.seed, s, STYLES.index(spec.style)])
            write_json(tmp / "annotations" / f"instances_{split}.json", _render_split(tmp, split, n, spec, rng))
        write_json(tmp / "dataset.json", {"key": key, "spec": asdict(spec)})
    return root


def _render_split(root: Path, split: str, n: int, spec: ShapesSpec, rng: np.random.Generator) -> dict:
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        pixels, objects = render_image(spec, rng)
        name = f"{split}/{i:05d}.png"
        Image.fromarray(pixels).save(root / name)
        images.append({"id": i + 1, "file_name": name, "width": spec.image_size, "height": spec.image_size})
        for category, box, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[category],
                                "bbox": box, "area": area, "iscrowd": 0})
    categories = [{"id": CATEGORY_IDS[c.name], "name": c.name, "supercategory": c.shape} for c in CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}


def render_image(spec: ShapesSpec, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """One image (H, W, 3) uint8 and its objects as ``(category, [x, y, w, h], area)``."""
    size = spec.image_size
    canvas = _background(spec.style, size, rng)  # (H, W, 3) float in [0, 1]
    for _ in range(rng.integers(0, spec.clutter + 1)):
        _draw_blob(canvas, rng)
    objects, boxes = [], []
    for _ in range(rng.integers(spec.objects[0], spec.objects[1] + 1)):
        category = CATEGORIES[CATEGORY_IDS[spec.categories[rng.integers(len(spec.categories))]] - 1]
        placed = _place(category, spec, boxes, rng)
        if placed is None:
            continue
        mask, paint, (x0, y0) = placed
        h, w = mask.shape
        region = canvas[y0:y0 + h, x0:x0 + w]
        drawn = mask & ~np.isnan(paint[..., 0])  # a hollow shape leaves its middle to the scene
        region[drawn] = paint[drawn]
        ys, xs = np.nonzero(mask)
        box = [float(x0 + xs.min()), float(y0 + ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        boxes.append(box)
        objects.append((category.name, box, float(mask.sum())))
    if spec.style == "noisy":
        canvas += rng.normal(0, 0.22, canvas.shape)
        salt = rng.random(canvas.shape[:2]) < 0.04
        canvas[salt] = rng.random((int(salt.sum()), 1))
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), objects


def _background(style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.1, 0.5, 3)
    tilt = rng.uniform(-0.2, 0.2, (2, 3))
    canvas = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    if style == "textured":
        period = rng.integers(3, 9)
        angle = rng.uniform(0, np.pi)
        wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * size * 2 * np.pi / period) > 0
        other = rng.uniform(0.0, 1.0, 3)
        canvas = np.where(wave[..., None], canvas, other)
    return canvas.astype(np.float64)


def _draw_blob(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """An unlabelled irregular patch of random colour and speckle, so not every colour is an object."""
    size = canvas.shape[0]
    side = int(rng.integers(4, max(5, size // 4)))
    x0, y0 = rng.integers(0, size - side, 2)
    mask = rng.random((side, side)) < rng.uniform(0.4, 0.8)
    colour = rng.uniform(0, 1, 3)
    canvas[y0:y0 + side, x0:x0 + side][mask] = colour


def _place(category: Category, spec: ShapesSpec, boxes: list, rng: np.random.Generator):
    """A mask, its paint and its corner, at a spot whose box overlaps earlier boxes by IoU <= 0.35."""
    size = spec.image_size
    lo, hi = (4, 8) if spec.style == "tiny" else (10, max(11, int(size * 0.4)))
    for _ in range(20):
        side = int(rng.integers(lo, hi + 1))
        mask = shape_mask(category.shape, side)
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = [x0, y0, side, side]
        if all(_iou(box, b) <= 0.35 for b in boxes):
            return mask, _paint(category, side, rng), (x0, y0)
    return None


def shape_mask(shape: str, side: int) -> np.ndarray:
    """A (side, side) boolean mask of ``shape`` filling its square as the shape allows."""
    c = (np.arange(side) + 0.5) / side * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    r = np.hypot(x, y)
    masks = {
        "circle": r <= 1,
        "square": np.maximum(abs(x), abs(y)) <= 1,
        "triangle": (abs(x) <= (y + 1) / 2) & (y <= 1),
        "diamond": abs(x) + abs(y) <= 1,
        "cross": (np.minimum(abs(x), abs(y)) <= 0.34),
        "ring": (r <= 1) & (r >= 0.55),
        "hbar": abs(y) <= 0.4,
        "vbar": abs(x) <= 0.4,
        "ellipse": x ** 2 + (y / 0.6) ** 2 <= 1,
        "semicircle": (r <= 1) & (y >= 0),
        "lshape": (x <= -0.2) | (y >= 0.2),
        "octagon": (abs(x) + abs(y) <= 1.42) & (np.maximum(abs(x), abs(y)) <= 1),
    }
    if shape not in masks:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return masks[shape]


def _paint(category: Category, side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) colours of the shape: its colour, jittered, with its texture."""
    colour = np.clip(np.array(category.colour) / 255 + rng.normal(0, 0.04, 3), 0, 1)
    paint = np.broadcast_to(colour, (side, side, 3)).copy()
    y, x = np.mgrid[0:side, 0:side]
    if category.texture == "stripes":
        paint[((x + y) // 2) % 2 == 1] *= 0.25
    elif category.texture == "checker":
        paint[(x // 2 + y // 2) % 2 == 1] = 0.95
    elif category.texture == "hollow":
        inner = shape_mask(category.shape, side)
        thickness = max(1, side // 6)
        shrunk = np.zeros_like(inner)
        core = shape_mask(category.shape, side - 2 * thickness) if side > 2 * thickness + 2 else None
        if core is not None:
            shrunk[thickness:side - thickness, thickness:side - thickness] = core
        paint[inner & shrunk] = np.nan  # the see-through middle
    return paint


def _iou(a: list, b: list) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)
