"""COCO mAP with pycocotools' COCOeval (bbox) against the dataset's own annotations."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers import distributed

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@torch.inference_mode()
def predict(model, loader, label_to_cat: dict, progress: bool | None = None) -> list[dict]:
    """Detections in COCO result format ([x, y, w, h], category ids, scores)."""
    model.eval()
    device = next(model.parameters()).device
    results = []
    kwargs = {} if progress is None else {"disable": not progress}
    for images, targets in tqdm(loader, desc="predict", leave=False, **kwargs):
        outputs = model([image.to(device, non_blocking=True) for image in images])
        for target, out in zip(targets, outputs):
            out = {k: v.cpu() for k, v in out.items()}
            boxes = out["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                if int(label) in label_to_cat:
                    results.append({"image_id": int(target["image_id"]), "category_id": label_to_cat[int(label)],
                                    "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
    return results


def coco_map(ground_truth, detections: list[dict]) -> dict:
    """All 12 COCOeval stats plus AP per category name; pycocotools' printout goes to `log`."""
    names = {c["id"]: c["name"] for c in ground_truth.dataset["categories"]}
    if not detections:
        return {**{k: 0.0 for k in STAT_NAMES}, "per_class_AP": {n: 0.0 for n in names.values()},
                "detections": 0, "log": "no detections"}
    from pycocotools.cocoeval import COCOeval
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        dt = ground_truth.loadRes(detections)
        ev = COCOeval(ground_truth, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [T, R, K, A, M]; area 'all', maxDets 100
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[names[cat_id]] = float(np.mean(p[p > -1])) if (p > -1).any() else None
    # COCOeval reports -1 for a stat it cannot define (no ground truth in that size range): undefined, not 0
    stats = {name: float(v) if v >= 0 else None for name, v in zip(STAT_NAMES, ev.stats)}
    return {**stats, "per_class_AP": per_class, "detections": len(detections), "log": buffer.getvalue()}


def evaluate_detector(model, dataset, batch_size: int = 8, progress: bool | None = None) -> dict:
    """mAP of `model` on a `helpers.data.CocoDetectionSet` (without the pycocotools log).

    Inside a torchrun process group each rank predicts every N-th image and the detections are
    gathered, in the dataset's image order, before COCOeval (the same list one process makes)."""
    from helpers.data import make_loader
    detections = (gather_predictions(model, dataset, batch_size, progress) if distributed.active() else
                  predict(model, make_loader(dataset, batch_size, train=False), dataset.label_to_cat, progress))
    metrics = coco_map(dataset.ground_truth(), detections)
    metrics.pop("log")
    return metrics


def gather_predictions(model, dataset, batch_size: int = 8, progress: bool | None = None) -> list[dict]:
    """`predict` over the whole dataset, each rank taking every N-th image, merged on every rank in image order."""
    from helpers.data import make_loader
    part = distributed.RankSubset(dataset)
    mine = predict(model, make_loader(part, batch_size, train=False), dataset.label_to_cat,
                   progress if distributed.is_writer() else False)
    by_image: dict[int, list[dict]] = {}
    for det in mine:
        by_image.setdefault(det["image_id"], []).append(det)
    per_image = distributed.gather_in_order([(i, by_image.get(int(dataset.ids[i]), [])) for i in part.indices])
    return [det for dets in per_image for det in dets]


def metrics_table(metrics: dict, digits: int = 3) -> str:
    """The 12 COCO stats and per-class AP as two aligned, rounded lines each."""
    names = list(STAT_NAMES)
    lines = ["  ".join(f"{n:>6}" for n in names),
             "  ".join(f"{metrics[n]:6.{digits}f}" if metrics[n] is not None else f"{'n/a':>6}" for n in names)]
    per_class = metrics.get("per_class_AP", {})
    if per_class:
        lines.append("per-class AP: " + ", ".join(
            f"{k} {v:.{digits}f}" if v is not None else f"{k} n/a" for k, v in per_class.items()))
    return "\n".join(lines)


# FLIR gives the paper's fine-tuned RetinaNet 0.323 mAP; the synthetic thermal set must be about as hard.
DIFFICULTY_WINDOW = {"AP": (0.30, 0.55), "AP50_max": 0.90}


def difficulty_window(metrics: dict) -> dict:
    lo, hi = DIFFICULTY_WINDOW["AP"]
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "AP_in_window": lo <= metrics["AP"] <= hi,
            "AP50_below_max": metrics["AP50"] < DIFFICULTY_WINDOW["AP50_max"]}
