"""COCO mAP, mAP50 and mAP75 with pycocotools' COCOeval, over one task's categories."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def coco_map(gt: COCO, detections: Sequence[dict], category_ids: Sequence[int],
             image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """``{map, map50, map75}`` of ``detections`` against ``gt`` on ``category_ids`` only.

    Args:
        gt: the ground truth, as pycocotools reads an ``instances_*.json``.
        detections: COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h], score}``.
        category_ids: the task's categories; detections of others are ignored.
        image_ids: the images scored (default: all of ``gt``), so images with no detection count.
    """
    wanted = set(category_ids)
    kept = [d for d in detections if d["category_id"] in wanted]
    if not kept:  # loadRes refuses an empty list; no detection scores 0 wherever an object exists
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(kept)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.catIds = sorted(wanted)
        ev.params.imgIds = sorted(image_ids if image_ids is not None else gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(max(s, 0.0)) for s in ev.stats[:3]]  # -1 means "no ground truth": score it 0
    return dict(zip(("map", "map50", "map75"), stats))


def ground_truth_detections(gt: COCO, category_ids: Sequence[int], shift: float = 0.0) -> list[dict]:
    """The ground truth as detections (score 1), each box moved right and down by ``shift`` pixels."""
    anns = gt.loadAnns(gt.getAnnIds(catIds=list(category_ids), iscrowd=False))
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "bbox": list(np.asarray(a["bbox"], dtype=float) + [shift, shift, 0, 0])} for a in anns]
