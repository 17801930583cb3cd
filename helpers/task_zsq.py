"""Task-specific zero-shot quantization for detectors (Li et al. 2025, DFQ-Dojo/dfq-toolkit; notebook 07).

Stage 1, a task-specific calibration set. Pseudo targets come from the detector itself, with no
prior from any dataset: every image starts with one box of the toolkit's zero-prior law
(`yolo11/label/generate_one_label.py`: w, h ~ U(0.2, 0.8) of the frame, the centre drawn so the box
stays inside, class uniform), and the adaptive sampler (`yolo11/generation/fp_sampler.py`) then
adds boxes the detector predicts where no target is (conf > 0.2, IoU < 0.35 with every target, area
share in (0.01, 0.85)) and removes targets no prediction overlaps any more. Images (N(0, 1) noise
in the normalised input space, as notebook 03) are optimised with Adam against
    L = a_bn * R_BN + a_det * (focal classification + GIoU box loss of the detector on the targets) + a_tv * TV
where R_BN is notebook 03's loss (`helpers.distill.BNStatisticsLoss`, the same fused eval-BN
path: the BN statistics come out of the forward that also feeds the FPN and head, no second pass).

Stage 2, zero-shot QAT. The student is the detector fake-quantized by `helpers.quant` (per-channel
weights, per-tensor symmetric activations) and calibrated on the first synthetic batch (that is the
PTQ row), whose convs are then swapped for `LSQConv2d`: float latent weights, learnable steps with
LSQ's scaled gradient and a straight-through rounding (`yolo11/quant/qatops.py`). It is trained on
the synthetic images only with the toolkit's task-specific KD loss (`yolo11/quant/kd_loss.py`)
    L = w_det * L_det(S(x), targets) + w_kd * tau^2 KL(softmax(z_T / tau) || softmax(z_S / tau)) + w_mse * MSE
with z the raw head outputs (class and box channels) flattened per pyramid level, and MSE the
mean over every Conv2d and BatchNorm2d output of (f_S - f_T)^2. Task-agnostic images have no
targets: w_det is then 0 (the paper's "w/o L_detect").

Conventions: "toolkit" keeps the first conv and the whole detection head in float (all three of
the toolkit's CNN code bases do), "whole" quantizes every conv, as notebook 04.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou
from tqdm.auto import tqdm

from helpers import distill, quant, runs
from helpers.references import VERDICTS, effect_verdict  # notebook 06's rule
from helpers.distill import DistillationDiverged

CONVENTIONS = ("toolkit", "whole")
SAMPLER = {"conf": 0.2, "overlap_iou": 0.35, "min_area": 0.01, "max_area": 0.85}  # toolkit genlabel.json
MIN_BOX_PIXELS = 2.0  # a box narrower than this holds no anchor the detector can match


class TaskZSQError(ValueError):
    """Bad input to task-specific ZSQ; the message names the fix."""


# --------------------------------------------------------------------------- checks
def check_detector(model: nn.Module) -> None:
    """A torchvision one-stage detector (backbone, head, anchor generator, compute_loss) with BN statistics."""
    missing = [a for a in ("backbone", "head", "anchor_generator", "compute_loss", "transform") if not hasattr(model, a)]
    if missing:
        raise TaskZSQError(f"the model lacks {missing}: pass a torchvision RetinaNet (helpers.models.build_detector)")
    if not distill.bn_layers(distill.distill_target(model)):
        raise TaskZSQError("the detector's backbone has no BatchNorm layers with running statistics, so there is "
                           "nothing to distill images from: build it with BatchNorm2d (the tiny RetinaNets of "
                           "helpers.models) or load a checkpoint trained with BN")


def check_categories(categories) -> list[int]:
    cats = [int(c) for c in categories]
    if not cats:
        raise TaskZSQError("the category list is empty: pass the detector's foreground labels, e.g. range(1, num_classes)")
    if any(c < 1 for c in cats):
        raise TaskZSQError(f"labels must be >= 1 (0 is torchvision's background), got {cats}")
    return cats


def check_size_range(size_range: tuple[float, float], image_size: tuple[int, int]) -> tuple[float, float]:
    lo, hi = (float(v) for v in size_range)
    if not (0.0 < lo <= hi <= 1.0):
        raise TaskZSQError(f"box sizes are fractions of the frame with 0 < min <= max <= 1, got {size_range}; "
                           "the toolkit uses (0.2, 0.8)")
    if lo * min(image_size) < MIN_BOX_PIXELS:
        raise TaskZSQError(f"boxes of {lo} of a {image_size} frame are under {MIN_BOX_PIXELS} pixels; raise the "
                           "minimum box size")
    return lo, hi


def _finite(value: float, what: str, step: int) -> float:
    if not math.isfinite(value):
        raise DistillationDiverged(f"{what} is {value} at step {step}; lower the learning rate or the loss weights, "
                                   "and check the detector's weights and BN statistics for NaN/inf")
    return value


# --------------------------------------------------------------------------- targets
def sample_targets(n_images: int, image_size: tuple[int, int], categories, boxes_per_image: int = 1,
                   size_range: tuple[float, float] = (0.2, 0.8), category_weights=None, seed: int = 0) -> list[dict]:
    """The toolkit's zero-prior initial labels: `boxes_per_image` boxes per image, xyxy pixels inside the frame.

    w, h ~ U(size_range) fractions of the frame; cx = 0.5 +- U(0, 1) * (0.5 - w / 2) with a random
    sign (cy likewise), so the box lies inside; the class is drawn from `categories` (uniform
    unless `category_weights`).
    """
    cats = check_categories(categories)
    lo, hi = check_size_range(size_range, image_size)
    if not isinstance(n_images, int) or n_images < 1 or not isinstance(boxes_per_image, int) or boxes_per_image < 1:
        raise TaskZSQError(f"n_images and boxes_per_image must be positive integers, got {n_images}, {boxes_per_image}")
    weights = np.ones(len(cats)) if category_weights is None else np.asarray(category_weights, dtype=float)
    if weights.shape != (len(cats),) or (weights < 0).any() or weights.sum() <= 0:
        raise TaskZSQError(f"category_weights needs one non-negative weight per category ({len(cats)}), got {category_weights}")
    rng = np.random.default_rng(seed)
    height, width = image_size
    targets = []
    for _ in range(n_images):
        wh = rng.uniform(lo, hi, size=(boxes_per_image, 2))
        offset = rng.uniform(0, 1, size=(boxes_per_image, 2)) * rng.choice([-1.0, 1.0], size=(boxes_per_image, 2))
        centre = 0.5 + offset * (0.5 - wh / 2)
        xy = np.concatenate([centre - wh / 2, centre + wh / 2], 1) * [width, height, width, height]
        labels = rng.choice(cats, size=boxes_per_image, p=weights / weights.sum())
        targets.append({"boxes": torch.tensor(xy, dtype=torch.float32).clamp_(min=0),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    for t in targets:  # float rounding at the far edges
        t["boxes"][:, 0::2].clamp_(max=width)
        t["boxes"][:, 1::2].clamp_(max=height)
    return targets


@contextmanager
def _nms(model: nn.Module, iou: float, score: float):
    saved = model.nms_thresh, model.score_thresh
    model.nms_thresh, model.score_thresh = iou, score
    try:
        yield model
    finally:
        model.nms_thresh, model.score_thresh = saved


@torch.no_grad()
def predict_normalized(model: nn.Module, images: torch.Tensor, score: float = 0.05, nms_iou: float = 0.6) -> list[dict]:
    """The detector's post-NMS detections on normalised images (class-aware NMS, as the toolkit's sampler)."""
    was_training = model.training
    model.eval()
    try:
        with quant.skip_normalization(model), _nms(model, nms_iou, score):
            return model(list(images))
    finally:
        model.train(was_training)


def update_targets(targets: list[dict], detections: list[dict], image_size: tuple[int, int],
                   conf: float = SAMPLER["conf"], overlap_iou: float = SAMPLER["overlap_iou"],
                   min_area: float = SAMPLER["min_area"], max_area: float = SAMPLER["max_area"]) -> tuple[list[dict], int, int]:
    """One event of the toolkit's adaptive sampler (fp_sampler.py): (new targets, added, removed).

    Per image, with predictions P (score > conf) and targets G: add p when max_g IoU(p, g) <
    overlap_iou and its area share lies in (min_area, max_area), with the predicted class; remove g
    when the image has more than one target and max_p IoU(p, g) < overlap_iou (if all would go, the
    best-overlapping one stays). Images without predictions are unchanged.
    """
    frame = float(image_size[0] * image_size[1])
    new, added, removed = [], 0, 0
    for target, det in zip(targets, detections):
        keep = det["scores"] > conf
        boxes, labels = det["boxes"][keep].cpu(), det["labels"][keep].cpu()
        g_boxes, g_labels = target["boxes"], target["labels"]
        if len(boxes) == 0 or len(g_boxes) == 0:
            new.append(target)
            continue
        ious = box_iou(boxes, g_boxes)
        stay = torch.ones(len(g_boxes), dtype=torch.bool)
        if len(g_boxes) > 1:
            best = ious.max(0).values
            stay = best >= overlap_iou
            if not stay.any():
                stay[best.argmax()] = True
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / frame
        add = (ious.max(1).values < overlap_iou) & (area > min_area) & (area < max_area)
        new.append({"boxes": torch.cat([g_boxes[stay], boxes[add]]), "labels": torch.cat([g_labels[stay], labels[add]])})
        added, removed = added + int(add.sum()), removed + int((~stay).sum())
    return new, added, removed


def found_objects(detections: list[dict], targets: list[dict], iou: float = 0.5, score: float = 0.05) -> dict:
    """How many target boxes the detector finds: a detection of the same class with IoU >= `iou` (score > `score`)."""
    found = total = 0
    for det, target in zip(detections, targets):
        total += len(target["boxes"])
        keep = det["scores"] > score
        boxes, labels = det["boxes"][keep].cpu(), det["labels"][keep].cpu()
        if len(boxes) and len(target["boxes"]):
            same = labels[:, None] == target["labels"][None, :]
            found += int(((box_iou(boxes, target["boxes"]) >= iou) & same).any(0).sum())
    return {"found": found, "targets": total, "recall": found / max(total, 1)}


# --------------------------------------------------------------------------- losses
def head_forward(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], dict, list[torch.Tensor]]:
    """(features, raw head outputs, anchors) of a RetinaNet on normalised images at its input size, in any mode."""
    features = list(model.backbone(images).values())
    outputs = model.head(features)
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    anchors = model.anchor_generator(ImageList(images, sizes), features)
    return features, outputs, anchors


def detection_loss(model: nn.Module, outputs: dict, anchors: list[torch.Tensor], targets: list[dict]) -> torch.Tensor:
    """The detector's own training loss (focal classification + box regression) on `targets`, as torchvision sums it."""
    device = outputs["cls_logits"].device
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    losses = model.compute_loss(targets, outputs, anchors)
    return losses["classification"] + losses["bbox_regression"]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """The toolkit's TV2: Frobenius norms (not squared) of x minus its shifts right, down and along both diagonals."""
    diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
    return sum(torch.linalg.vector_norm(d) for d in diffs)


class TaskLoss:
    """a_bn * R_BN + a_det * L_det + a_tv * TV on normalised images, in one detector forward.

    A context manager (the BN layers are patched inside, as `distill.BNStatisticsLoss`); the
    detector must be in eval mode with frozen parameters (`synthesize` does that). Calling it
    returns a dict of tensors: total, bn, det, tv (unweighted terms beside the weighted total).
    """

    def __init__(self, model: nn.Module, a_bn: float = 1.0, a_det: float = 1.0, a_tv: float = 0.0,
                 bn_loss: str = "mean"):
        check_detector(model)
        self.model, self.weights = model, {"bn": a_bn, "det": a_det, "tv": a_tv}
        self.bn = distill.BNStatisticsLoss(distill.distill_target(model), bn_loss, stop_at_last=False)

    def __enter__(self) -> "TaskLoss":
        self.bn.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bn.__exit__(*exc)

    def __call__(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        (features, outputs, anchors), (bn, _, _) = self.bn.run(images, lambda x: head_forward(self.model, x))
        det = detection_loss(self.model, outputs, anchors, targets) if self.weights["det"] else bn.new_zeros(())
        tv = total_variation(images) if self.weights["tv"] else bn.new_zeros(())
        total = self.weights["bn"] * bn + self.weights["det"] * det + self.weights["tv"] * tv
        return {"total": total, "bn": bn, "det": det, "tv": tv}


# --------------------------------------------------------------------------- stage 1
@dataclass
class TaskSet:
    """Result of `synthesize`: images in the normalised input space and their sampled targets."""

    images: torch.Tensor
    targets: list[dict]
    initial_targets: list[dict]
    curves: dict                         # per iteration, averaged over batches: total, bn, det, tv
    events: list[dict] = field(default_factory=list)  # sampler events: iteration, added, removed, boxes
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # iteration -> all images
    config: dict = field(default_factory=dict)


def sampler_iterations(iterations: int, warmup: int, every: int, early_exit: int) -> list[int]:
    """Iterations at which the sampler runs: warmup, warmup + every, ... up to early_exit (toolkit: 800/100/2800 of 3000)."""
    if every < 1 or not 0 <= warmup <= early_exit < iterations:
        raise TaskZSQError(f"sampler schedule needs every >= 1 and 0 <= warmup <= early_exit < iterations, got "
                           f"warmup={warmup}, every={every}, early_exit={early_exit}, iterations={iterations}")
    return list(range(warmup, early_exit + 1, every))


def synthesize(model: nn.Module, categories, num_images: int = 8, batch_size: int = 8, iterations: int = 40,
               lr: float = 0.1, a_bn: float = 1.0, a_det: float = 1.0, a_tv: float = 0.0, bn_loss: str = "mean",
               sampler: tuple[int, int, int] | None = (10, 5, 35), size_range: tuple[float, float] = (0.2, 0.8),
               clamp: bool = True, snapshot_at: tuple[int, ...] = (), seed: int = 0,
               progress: bool | None = None) -> TaskSet:
    """Stage 1: `num_images` task-specific images with their targets, in independent batches.

    `sampler` = (warmup, every, early_exit) iterations of the adaptive label sampler, None to keep
    the initial labels. Adam at `lr` with cosine annealing to 0 (toolkit); `clamp` projects pixels
    onto the normalised [0, 1] range after each step (notebook 03). Raises DistillationDiverged at
    the step where the loss is NaN/inf; every input is checked before work starts.
    """
    check_detector(model)
    cats = check_categories(categories)
    height, width = distill.input_size(model)
    check_size_range(size_range, (height, width))
    events_at = set(sampler_iterations(iterations, *sampler)) if sampler else set()
    bad = [k for k in snapshot_at if not 0 <= k <= iterations]
    if bad:
        raise TaskZSQError(f"snapshot_at must lie in 0..{iterations}, got {bad}")
    device = next(model.parameters()).device
    low, high = (b.to(device)[None, :, None, None] for b in distill.pixel_range(model))
    initial = sample_targets(num_images, (height, width), cats, size_range=size_range, seed=seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    generator = torch.Generator().manual_seed(seed)
    starts = list(range(0, num_images, batch_size))
    curves = {k: np.zeros((len(starts), iterations)) for k in ("total", "bn", "det", "tv")}
    images, targets, events, snapshots = [], [], [], {k: [] for k in snapshot_at}
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    bar = tqdm(total=len(starts) * iterations, desc="task-specific synthesis", leave=False,
               **({} if progress is None else {"disable": not progress}))
    try:
        with TaskLoss(model, a_bn, a_det, a_tv, bn_loss) as criterion:
            for b, start in enumerate(starts):
                batch_targets = [dict(t) for t in initial[start:start + batch_size]]
                x = torch.randn(len(batch_targets), 3, height, width, generator=generator).to(device)
                x = (x.clamp(low, high) if clamp else x).requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=lr)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
                for it in range(iterations):
                    if it in snapshots:
                        snapshots[it].append(x.detach().cpu().clone())
                    if it in events_at:
                        criterion.__exit__()  # the sampler's forward is the detector's own, not the patched BN
                        try:
                            detections = predict_normalized(model, x.detach(), score=SAMPLER["conf"])
                        finally:
                            criterion.__enter__()
                        batch_targets, added, removed = update_targets(batch_targets, detections, (height, width))
                        events.append({"batch": b, "iteration": it, "added": added, "removed": removed,
                                       "boxes": sum(len(t["boxes"]) for t in batch_targets)})
                    terms = criterion(x, batch_targets)
                    for k, v in terms.items():
                        curves[k][b, it] = _finite(float(v.detach()), f"task-specific loss term {k}", it)
                    optimizer.zero_grad(set_to_none=True)
                    terms["total"].backward()
                    optimizer.step()
                    schedule.step()
                    if clamp:
                        with torch.no_grad():
                            x.clamp_(low, high)
                    bar.update()
                if iterations in snapshots:
                    snapshots[iterations].append(x.detach().cpu().clone())
                images.append(x.detach().cpu())
                targets += [{k: v.cpu() for k, v in t.items()} for t in batch_targets]
    finally:
        bar.close()
        model.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)
    config = {"num_images": num_images, "batch_size": batch_size, "iterations": iterations, "lr": lr, "a_bn": a_bn,
              "a_det": a_det, "a_tv": a_tv, "bn_loss": bn_loss, "sampler": list(sampler) if sampler else None,
              "size_range": list(size_range), "clamp": clamp, "seed": seed, "categories": cats}
    weights = [min(batch_size, num_images - s) for s in starts]
    mean_curves = {k: np.average(v, axis=0, weights=weights).tolist() for k, v in curves.items()}
    return TaskSet(torch.cat(images), targets, initial, mean_curves, events,
                   {k: torch.cat(v) for k, v in snapshots.items()}, config)


def save_task_set(path: Path, task_set: TaskSet) -> Path:
    """Images as float16 (the 03 convention) with targets, snapshots and curves, written atomically."""
    return runs.atomic_torch_save(path, {
        "images": task_set.images.half(), "targets": task_set.targets, "initial_targets": task_set.initial_targets,
        "curves": task_set.curves, "events": task_set.events, "config": task_set.config,
        "snapshots": {k: v.half() for k, v in task_set.snapshots.items()}})


def synthesize_or_load(path: Path, model: nn.Module, categories, **kwargs) -> TaskSet:
    """`synthesize` once per run folder and seed; a rerun loads the stored float16 set."""
    path = Path(path)
    if not path.exists():
        save_task_set(path, synthesize(model, categories, **kwargs))
    return load_task_set(path)  # the float16-rounded images, as a rerun sees them


def load_task_set(path: Path) -> TaskSet:
    d = torch.load(path, weights_only=True)
    return TaskSet(d["images"].float(), d["targets"], d["initial_targets"], d["curves"], d["events"],
                   {int(k): v.float() for k, v in d["snapshots"].items()}, d["config"])


def target_histograms(targets: list[dict], image_size: tuple[int, int], categories, area_bins) -> dict:
    """Per-category counts, boxes-per-image counts and box-area-share histogram (`area_bins` edges) of a target list."""
    frame = float(image_size[0] * image_size[1])
    labels = torch.cat([t["labels"] for t in targets]).tolist() if targets else []
    boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]) if targets else torch.zeros(0, 4)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / frame).numpy()
    counts = np.histogram(area, bins=area_bins)[0]
    return {"category": {int(c): labels.count(int(c)) for c in categories},
            "area": counts.tolist(), "area_bins": list(map(float, area_bins)),
            "boxes_per_image": float(len(labels) / max(len(targets), 1)), "boxes": len(labels)}


# --------------------------------------------------------------------------- cost
def iteration_cost(model: nn.Module, targets: list[dict], repeats: int = 5, seed: int = 0,
                   a_det: float = 1.0) -> dict:
    """Seconds of one synthesis iteration (patched BN + head + losses + backward + Adam step) against one
    plain detector forward + backward to the images of the same batch; alternating rounds, medians."""
    height, width = distill.input_size(model)
    x = torch.randn(len(targets), 3, height, width, generator=torch.Generator().manual_seed(seed))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)

    def plain() -> None:
        y = x.clone().requires_grad_(True)
        _, outputs, anchors = head_forward(model, y)
        detection_loss(model, outputs, anchors, targets).backward()

    y = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([y], lr=0.1)
    try:
        with TaskLoss(model, a_det=a_det) as criterion:
            def full() -> None:
                optimizer.zero_grad(set_to_none=True)
                criterion(y, targets)["total"].backward()
                optimizer.step()

            times = {"full": [], "plain": []}
            for _ in range(2):  # warm-up
                full()
            with _unpatched(criterion):
                plain()
            for _ in range(repeats):
                for name, fn in (("full", full), ("plain", plain)):
                    ctx = _unpatched(criterion) if name == "plain" else _null()
                    with ctx:
                        started = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - started)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    full_s, plain_s = float(np.median(times["full"])), float(np.median(times["plain"]))
    paired = float(np.median(np.array(times["full"]) / np.array(times["plain"])))
    return {"full_s": full_s, "plain_s": plain_s, "ratio": full_s / plain_s, "paired_ratio": paired,
            "batch": len(targets), "repeats": repeats}


@contextmanager
def _unpatched(criterion: TaskLoss):
    criterion.__exit__()
    try:
        yield
    finally:
        criterion.__enter__()


@contextmanager
def _null():
    yield


# --------------------------------------------------------------------------- stage 2: quantizers
def excluded_layers(model: nn.Module, convention: str) -> list[str]:
    """Conv/linear layers kept in float: "toolkit" = the first conv and the whole head; "whole" = none."""
    if convention not in CONVENTIONS:
        raise TaskZSQError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if convention == "whole":
        return []
    layers = [n for n, m in model.named_modules() if type(m) in quant.QUANT_LAYERS]
    return [layers[0]] + [n for n in layers if n.startswith("head.")]


def ptq_model(model: nn.Module, setting: str, convention: str, batch, normalized: bool,
              calibrator: str = "percentile", percentile: float = 99.99) -> nn.Module:
    """helpers.quant's PTQ (notebook 04) with the convention's float layers, calibrated on one batch."""
    parsed = quant.QuantSetting.parse(setting, calibrator, percentile)
    q = quant.quantize_model(model, parsed.w_bits, parsed.a_bits, calibrator, percentile,
                             exclude=excluded_layers(model, convention))
    quant.calibrate(q, [batch], normalized=normalized, progress=False)
    return q


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward, scale * grad in the backward (LSQ's step-size gradient scale)."""
    return (x - x * scale).detach() + x * scale


def lsq_fake_quant(v: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
    """LSQ: clamp(round(v / s), qmin, qmax) * s with a straight-through round, zero gradient outside the range
    and the step's gradient scaled by `grad_scale` (Esser et al.; toolkit qatops.py; s <- |s| every forward)."""
    s = _grad_scale(step.abs().clamp(min=1e-8), grad_scale)
    scaled = torch.clamp(v / s, qmin, qmax)
    return ((scaled.round() - scaled).detach() + scaled) * s


class LSQConv2d(nn.Conv2d):
    """A conv with float latent weights, a learnable per-output-channel weight step and a learnable
    per-tensor input step (symmetric narrow range, as helpers.quant), initialised from a calibrated
    `quant.QuantConv2d` so that step 0 is the PTQ model."""

    @classmethod
    def from_quant(cls, float_conv: nn.Conv2d, qconv) -> "LSQConv2d":
        new = quant.trainable_conv_copy(cls, float_conv)
        new.w_range = quant.int_range(qconv.w_bits, True)
        new.w_step = nn.Parameter(qconv.weight_scale.detach().clone().view(-1, 1, 1, 1))
        new.w_grad = 1.0 / math.sqrt(new.weight[0].numel() * new.w_range[1])
        iq = qconv.input_quantizer
        new.a_range = None if iq is None else quant.int_range(iq.bits, True)
        new.a_step = None if iq is None else nn.Parameter(iq.scale.detach().clone().reshape(()))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_step is not None:
            g = 1.0 / math.sqrt(x[0].numel() * self.a_range[1])
            x = lsq_fake_quant(x, self.a_step, *self.a_range, g)
        w = lsq_fake_quant(self.weight, self.w_step, *self.w_range, self.w_grad)
        return self._conv_forward(x, w, self.bias)


def lsq_student(model: nn.Module, ptq: nn.Module) -> nn.Module:
    """The QAT student: a copy of the PTQ model whose QuantConv2d layers become LSQConv2d (float weights from
    `model`, steps from the PTQ calibration); layers the convention keeps in float stay float."""
    import copy
    student = copy.deepcopy(ptq)
    floats = dict(model.named_modules())
    for name, layer in quant.quant_layers(ptq).items():
        if isinstance(layer, quant.QuantConv2d):
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent) if parent else student, child,
                    LSQConv2d.from_quant(floats[name], layer))
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval()


# --------------------------------------------------------------------------- stage 2: KD loss
class KDLoss:
    """The toolkit's task-specific KD loss (kd_loss.py, kd_module=cnnbn) for a RetinaNet student and teacher.

    Forward hooks record every nn.Conv2d and nn.BatchNorm2d output of both (matched by name);
    `__call__(images, targets)` runs both on normalised images and returns a dict of tensors:
    total, det (student's detection loss on `targets`; 0 without targets), kl, mse.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, w_det: float = 1.0, w_kd: float = 0.1,
                 w_mse: float = 1.0, tau: float = 4.0):
        self.student, self.teacher = student, teacher
        self.w = {"det": w_det, "kl": w_kd, "mse": w_mse}
        self.tau = tau
        self.features: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.handles = []
        for role, net in (("student", student), ("teacher", teacher)):
            for name, m in net.named_modules():
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    self.handles.append(m.register_forward_hook(self._hook(role, name)))

    def _hook(self, role: str, name: str):
        def hook(module, args, out):
            self.features[role][name] = out
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def level_kl(self, student_out: dict, teacher_out: dict, features: list[torch.Tensor]) -> torch.Tensor:
        """sum over levels of tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau)), z = the level's raw class+box map per image."""
        anchors = self.student.anchor_generator.num_anchors_per_location()[0]
        sizes = [f.shape[-2] * f.shape[-1] * anchors for f in features]
        total = student_out["cls_logits"].new_zeros(())
        for key_s, key_t in zip(*(torch.cat([o["cls_logits"], o["bbox_regression"]], 2).split(sizes, 1)
                                  for o in (student_out, teacher_out))):
            zs, zt = key_s.flatten(1) / self.tau, key_t.flatten(1) / self.tau
            total = total + F.kl_div(F.log_softmax(zs, 1), F.log_softmax(zt, 1), reduction="batchmean",
                                     log_target=True) * self.tau ** 2
        return total

    def __call__(self, images: torch.Tensor, targets: list[dict] | None) -> dict[str, torch.Tensor]:
        self.features = {"student": {}, "teacher": {}}
        with torch.no_grad():
            _, teacher_out, _ = head_forward(self.teacher, images)
        features, student_out, anchors = head_forward(self.student, images)
        det = (detection_loss(self.student, student_out, anchors, targets)
               if targets is not None and self.w["det"] else images.new_zeros(()))
        kl = self.level_kl(student_out, teacher_out, features)
        names = [n for n in self.features["student"] if n in self.features["teacher"]]
        mse = sum(F.mse_loss(self.features["student"][n], self.features["teacher"][n]) for n in names) / max(len(names), 1)
        total = self.w["det"] * det + self.w["kl"] * kl + self.w["mse"] * mse
        return {"total": total, "det": det, "kl": kl, "mse": mse}


@torch.no_grad()
def output_gap(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> float:
    """Mean squared difference of the raw head outputs (class logits and box deltas) of student and teacher."""
    _, s, _ = head_forward(student, images)
    _, t, _ = head_forward(teacher, images)
    return float(sum(F.mse_loss(s[k], t[k]) for k in ("cls_logits", "bbox_regression")))


def kd_gap(student: nn.Module, teacher: nn.Module, images: torch.Tensor, w_kd: float = 0.1, w_mse: float = 1.0,
           tau: float = 4.0) -> float:
    """The KD part of the loss (w_kd * KL of the head outputs + w_mse * feature MSE), no gradient: the gap KD closes."""
    criterion = KDLoss(student, teacher, 0.0, w_kd, w_mse, tau)
    try:
        with torch.no_grad():
            return float(criterion(images, None)["total"])
    finally:
        criterion.close()


def normalize_real(model: nn.Module, images: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """Real [0, 1] images and their labels through the detector's transform (normalised, resized, batched)."""
    was_training = model.transform.training
    model.transform.eval()
    try:
        batch, targets = model.transform(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    finally:
        model.transform.train(was_training)
    return batch.tensors, targets


def fit_qat(student: nn.Module, teacher: nn.Module, images: torch.Tensor, targets: list[dict] | None,
            checkpoint: Path, log_path: Path, epochs: int = 4, batch_size: int = 4, lr: float = 1e-4,
            weight_decay: float = 5e-4, grad_clip: float = 10.0, w_det: float = 1.0, w_kd: float = 0.1,
            w_mse: float = 1.0, tau: float = 4.0, seed: int = 0, progress: bool | None = None,
            stop_after: int | None = None) -> list[dict]:
    """Stage 2: train `student` on normalised `images` (with `targets`, or None) by KD from `teacher`.

    Adam, linear decay to 1 % (toolkit kd.json), gradient clip, fixed epochs (no model selection on
    real data), the student's BN frozen (eval: the synthetic batches' statistics do not move its
    running stats). Each epoch reseeds its shuffle from (seed, epoch), writes `checkpoint` atomically
    and appends its mean losses to `log_path`; rerunning resumes after the last finished epoch.
    `stop_after`: return after that many epochs of the schedule (an interruption, for tests).
    """
    if not isinstance(epochs, int) or epochs < 1 or batch_size < 1:
        raise TaskZSQError(f"epochs and batch_size must be positive integers, got {epochs}, {batch_size}")
    if targets is not None and len(targets) != len(images):
        raise TaskZSQError(f"{len(targets)} targets for {len(images)} images")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - 0.99 * min(it, total) / total)
    start, log = 0, []
    checkpoint, log_path = Path(checkpoint), Path(log_path)
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        start = state["epoch"] + 1
    log = [r for r in runs.read_jsonl(log_path) if r["epoch"] < start]
    runs.write_jsonl(log_path, log)
    criterion = KDLoss(student, teacher, w_det if targets is not None else 0.0, w_kd, w_mse, tau)
    student.eval()
    try:
        for epoch in tqdm(range(start, min(epochs, stop_after or epochs)), desc="zero-shot QAT", initial=start, total=epochs, leave=False,
                          **({} if progress is None else {"disable": not progress})):
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            sums = {}
            for k in range(steps_per_epoch):
                idx = order[k * batch_size:(k + 1) * batch_size]
                terms = criterion(images[idx], None if targets is None else [targets[i] for i in idx.tolist()])
                _finite(float(terms["total"].detach()), "QAT loss", epoch * steps_per_epoch + k)
                optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                scheduler.step()
                for name, v in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(v.detach()) / steps_per_epoch
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **sums}
            runs.atomic_torch_save(checkpoint, {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                                                "lr_scheduler": scheduler.state_dict(), "epoch": epoch})
            runs.append_jsonl(log_path, row)
            log.append(row)
    finally:
        criterion.close()
    return log


# --------------------------------------------------------------------------- the comparison grid
PTQ_METHODS = ("ptq_real", "ptq_agnostic", "ptq_specific")
QAT_METHODS = ("qat_agnostic", "qat_specific", "qat_real")
METHODS = PTQ_METHODS + QAT_METHODS


class Lazy:
    """A read-only mapping seed -> value made by `make(seed)` on first use (task sets are synthesized only when a
    missing row needs them; a finished run reads its stored rows and never makes them)."""

    def __init__(self, make):
        self.make, self.cache = make, {}

    def __getitem__(self, key):
        if key not in self.cache:
            self.cache[key] = self.make(key)
        return self.cache[key]


def task_sets(run, model: nn.Module, categories, seeds, **synth_kwargs) -> Lazy:
    """seed -> TaskSet, synthesized once per run folder (`task_set_<seed>.pt`, float16, not an artifact)."""
    def make(seed: int) -> TaskSet:
        if seed not in seeds:
            raise TaskZSQError(f"seed {seed} is not among SEEDS {list(seeds)}")
        return synthesize_or_load(run.path(f"task_set_{seed}.pt"), model, categories, seed=seed, **synth_kwargs)
    return Lazy(make)


def real_calibration(dataset, seeds, n_images: int) -> dict:
    """seed k -> (training images k*n ... (k+1)*n - 1 in [0, 1], their labels, normalized=False)."""
    need = (max(seeds) + 1) * n_images
    if need > len(dataset):
        raise TaskZSQError(f"seeds {list(seeds)} x {n_images} images need {need} training images, the set has {len(dataset)}")
    out = {}
    for k in seeds:
        items = [dataset[i] for i in range(k * n_images, (k + 1) * n_images)]
        out[k] = ([x for x, _ in items], [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items], False)
    return out


def agnostic_calibration(images: torch.Tensor, seeds, n_images: int) -> dict:
    """seed k -> (batch k of notebook 03's final distilled images, no targets, normalized=True)."""
    need = (max(seeds) + 1) * n_images
    if need > len(images):
        raise TaskZSQError(f"seeds {list(seeds)} x {n_images} images need {need} distilled images, notebook 03 made "
                           f"{len(images)}: raise its NUM_IMAGES or lower CALIB_IMAGES")
    return {k: (images[k * n_images:(k + 1) * n_images].float(), None, True) for k in seeds}


def ptq_grid(conventions, settings, seeds) -> list[tuple]:
    """Every (convention, setting, seed, method) of the PTQ rows."""
    return [(c, s, k, m) for c in conventions for s in settings for k in seeds for m in PTQ_METHODS]


def qat_cells(rows: list[dict], fp32_ap: float, min_drop: float) -> list[tuple[str, str]]:
    """(convention, setting) where QAT has something to recover: some PTQ method's mean AP lies at least
    `min_drop` mAP points below FP32. Elsewhere PTQ already reaches FP32 within noise, and QAT is not run."""
    ptq = [r for r in rows if r["method"] in PTQ_METHODS]
    if not ptq:
        return []
    table = summary_table(ptq, fp32_ap)
    worst = table.groupby(["convention", "setting"], sort=False)["drop_vs_fp32"].max()
    return [key for key, drop in worst.items() if 100 * drop >= min_drop]


def qat_grid(cells, seeds) -> list[tuple]:
    return [(c, s, k, m) for c, s in cells for k in seeds for m in QAT_METHODS]


def run_comparison(model: nn.Module, sources: dict, val_set, grid: list[tuple], rows_path: Path, work_dir: Path,
                   qat: dict, gap_images: torch.Tensor | None = None, progress: bool | None = None) -> list[dict]:
    """Every (convention, setting, seed, method) of `grid` not yet in `rows_path`: quantize, calibrate on the
    method's data (PTQ) and, for QAT methods, fine-tune by `fit_qat(**qat)` on it; COCO mAP on `val_set`; one
    row appended per cell (an interrupted run resumes at the next cell). `sources` maps "real", "agnostic",
    "specific" to seed -> (images, targets or None, normalized). QAT rows also record the head-output gap
    to the teacher (`output_gap`) before and after training, on the training images and on `gap_images`
    (held-out real images, never trained on): the measure of what the training transfers."""
    from helpers import data, evaluate
    rows = runs.read_jsonl(rows_path)
    done = {(r["convention"], r["setting"], r["seed"], r["method"]) for r in rows}
    todo = [key for key in grid if key not in done]
    val = data.Preloaded(val_set) if todo and not isinstance(val_set, data.Preloaded) else val_set
    bar = tqdm(todo, desc="task-specific ZSQ grid", **({} if progress is None else {"disable": not progress})) if todo else []
    for convention, setting, seed, method in bar:  # no bar at all when every row is stored (a stable notebook output)
        images, targets, normalized = sources[method.split("_", 1)[1]][seed]
        started = time.perf_counter()
        ptq = ptq_model(model, setting, convention, images if normalized else list(images), normalized)
        net, log, gaps = ptq, [], {}
        if method in QAT_METHODS:
            x, t = (images, targets) if normalized else normalize_real(model, list(images), targets)
            net = lsq_student(model, ptq)
            held = {"train": x} if gap_images is None else {"train": x, "heldout": gap_images}
            gaps = {f"gap_{k}_before": output_gap(net, model, v) for k, v in held.items()}
            cell = work_dir / f"{convention}_{setting}_{seed}_{method}"
            log = fit_qat(net, model, x, t, cell.with_suffix(".pth"), cell.with_suffix(".jsonl"), seed=seed,
                          progress=False, **qat)
            gaps |= {f"gap_{k}_after": output_gap(net, model, v) for k, v in held.items()}
        metrics = evaluate.evaluate_detector(net, val, progress=False)
        row = {"convention": convention, "setting": setting, "seed": seed, "method": method,
               "AP": metrics["AP"], "AP50": metrics["AP50"], "qat_last_loss": log[-1]["total"] if log else None,
               **gaps, "seconds": time.perf_counter() - started}
        runs.append_jsonl(rows_path, row)
        rows.append(row)
        if method in QAT_METHODS:
            (work_dir / f"{convention}_{setting}_{seed}_{method}.pth").unlink(missing_ok=True)
    return rows


def summary_table(rows: list[dict], fp32_ap: float):
    """mean, std (ddof 1) and n of AP per (convention, setting, method), with the drop from FP32."""
    import pandas as pd
    frame = pd.DataFrame(rows)
    table = frame.groupby(["convention", "setting", "method"], sort=False)["AP"].agg(
        mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, n="count").reset_index()
    table["drop_vs_fp32"] = fp32_ap - table["mean"]
    return table


def drop_table(table, settings, conventions):
    """PTQ drop from FP32 (mAP points) per (convention, setting) and method: what decides where QAT runs."""
    part = table[table["method"].isin(PTQ_METHODS)]
    out = part.pivot_table(index=["convention", "setting"], columns="method", values="drop_vs_fp32") * 100
    order = [(c, s) for c in conventions for s in settings if (c, s) in out.index]
    return out.loc[order, [m for m in PTQ_METHODS if m in out.columns]]


def qat_gaps(rows: list[dict]):
    """Mean head-output gap to the teacher before/after QAT, on the training images and held-out real images,
    per (convention, setting, method): the QAT fits its own images; does it carry over?"""
    import pandas as pd
    frame = pd.DataFrame([r for r in rows if r["method"] in QAT_METHODS])
    if frame.empty:
        return frame
    cols = [c for c in ("gap_train_before", "gap_train_after", "gap_heldout_before", "gap_heldout_after") if c in frame]
    return frame.groupby(["convention", "setting", "method"], sort=False)[cols].mean()


def cut_cost(rows: list[dict], cells, conventions, settings, seeds) -> dict:
    """What the cut saved: measured seconds per PTQ and per QAT row, the QAT cells not run and their estimated cost."""
    ptq = [r["seconds"] for r in rows if r["method"] in PTQ_METHODS]
    qat = [r["seconds"] for r in rows if r["method"] in QAT_METHODS]
    skipped = [(c, s) for c in conventions for s in settings if (c, s) not in set(map(tuple, cells))]
    per_qat = float(np.mean(qat)) if qat else None
    return {"ptq_row_s": float(np.mean(ptq)) if ptq else None, "qat_row_s": per_qat, "qat_rows": len(qat),
            "skipped_cells": skipped,
            "skipped_qat_s": None if per_qat is None else per_qat * len(skipped) * len(seeds) * len(QAT_METHODS)}


# --------------------------------------------------------------------------- stage-1 summaries (stored)
STORED = ("rows.jsonl", "probe.jsonl", "stage1.json", "preview.npz")  # the run's artifacts (small, committed)


def heldout_images(model: nn.Module, dataset, n: int = 8) -> torch.Tensor:
    """The first `n` images of an evaluation set, normalised as the detector sees them (a QAT diagnostic only)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return normalize_real(model, [x for x, _ in items], [t for _, t in items])[0]
def histogram_distance(h: dict, reference: dict) -> dict:
    """Total-variation distance (0 = same, 1 = disjoint) of category shares and of box-area-share histograms."""
    def tv(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        return float(0.5 * np.abs(a / max(a.sum(), 1e-12) - b / max(b.sum(), 1e-12)).sum())
    cats = sorted(reference["category"], key=int)
    return {"category": tv([h["category"][c] for c in cats], [reference["category"][c] for c in cats]),
            "area": tv(h["area"], reference["area"])}


def stage1_summary(path: Path, sets, seeds, agnostic: dict, model: nn.Module, real_set, categories, area_bins,
                   real_count: int = 200, cost_repeats: int = 5) -> dict:
    """What stage 1 made, computed once and read back from `path` (JSON): per seed the loss terms at the first and
    last iteration, the sampler events, how many targets the FP32 detector finds at IoU 0.5 (final targets;
    the zero-prior initial boxes on the task-specific images and, as the baseline, on notebook 03's
    task-agnostic images of the same seed); the histograms of sampled, initial and real labels with their
    distances (real: the labels of the first `real_count` images of `real_set`, only to judge the sampler);
    the cost of one iteration against one detector forward + backward."""
    path = Path(path)
    if not path.exists():
        real_targets = [real_set[i][1] for i in range(min(real_count, len(real_set)))]
        size = distill.input_size(model)
        per_seed, final, initial = {}, [], []
        for s in seeds:
            t = sets[s]
            own, other = predict_normalized(model, t.images), predict_normalized(model, agnostic[s][0])
            per_seed[str(s)] = {
                "found": found_objects(own, t.targets), "found_initial": found_objects(own, t.initial_targets),
                "found_initial_on_agnostic": found_objects(other, t.initial_targets),
                "initial_kept": kept_initial(t.initial_targets, t.targets),
                "loss_first": {k: v[0] for k, v in t.curves.items()}, "loss_last": {k: v[-1] for k, v in t.curves.items()},
                "events": t.events}
            final += t.targets
            initial += t.initial_targets
        hist = {"sampled": target_histograms(final, size, categories, area_bins),
                "initial": target_histograms(initial, size, categories, area_bins),
                "real": target_histograms(real_targets, size, categories, area_bins)}
        hist = json.loads(json.dumps(hist))  # the int category keys as JSON stores them
        distance = {k: histogram_distance(hist[k], hist["real"]) for k in ("sampled", "initial")}
        cost = iteration_cost(model, sets[seeds[0]].targets, repeats=cost_repeats)
        runs.atomic_write_json(path, {"seeds": per_seed, "histograms": hist, "distance": distance, "cost": cost},
                               digits=5)
    return json.loads(path.read_text())


def kept_initial(initial: list[dict], final: list[dict]) -> int:
    """How many zero-prior initial boxes are still targets at the end (the sampler removes the ones the detector
    does not see once an image has other targets)."""
    return sum(int((box_iou(a["boxes"], b["boxes"]) > 0.999).any(1).sum()) if len(a["boxes"]) and len(b["boxes"]) else 0
               for a, b in zip(initial, final))


def found_table(summary: dict):
    """Per seed: found / targets at IoU 0.5 for the final targets, the initial boxes, the initial boxes on 03's images."""
    import pandas as pd
    out = {}
    for s, d in summary["seeds"].items():
        out[int(s)] = {k: f"{d[k]['found']}/{d[k]['targets']}" for k in ("found", "found_initial", "found_initial_on_agnostic")}
        if "initial_kept" in d:
            out[int(s)]["initial_kept"] = f"{d['initial_kept']}/{d['found_initial']['targets']}"
    return pd.DataFrame(out).T.rename_axis("seed")


def write_preview(path: Path, task_set: TaskSet, model: nn.Module, n: int = 4, score: float = 0.3) -> Path:
    """The first `n` images as uint8 pixels with their sampled targets and the FP32 detections above `score` (npz)."""
    images = task_set.images[:n]
    pixels = (distill.to_pixels(images, model).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    dets = predict_normalized(model, images)
    flat = {}
    for name, items, keys in (("t", task_set.targets[:n], ("boxes", "labels")), ("d", dets, ("boxes", "labels", "scores"))):
        keep = [torch.ones(len(i["labels"]), dtype=torch.bool) if name == "t" else i["scores"] > score for i in items]
        for k in keys:
            flat[f"{name}_{k}"] = torch.cat([i[k][m].cpu() for i, m in zip(items, keep)]).numpy()
        flat[f"{name}_image"] = np.concatenate([np.full(int(m.sum()), j) for j, m in enumerate(keep)]).astype(np.int64)
    path = Path(path)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, pixels=pixels, **flat)
    tmp.replace(path)
    return path


def read_preview(path: Path) -> tuple[np.ndarray, list[dict], list[dict]]:
    """(pixels in [0, 1] as (n, H, W, 3), targets, detections) of `write_preview`."""
    d = np.load(path)
    n = len(d["pixels"])

    def split(prefix, keys):
        return [{k: torch.from_numpy(d[f"{prefix}_{k}"][d[f"{prefix}_image"] == j]) for k in keys} for j in range(n)]
    return d["pixels"] / 255.0, split("t", ("boxes", "labels")), split("d", ("boxes", "labels", "scores"))


# --------------------------------------------------------------------------- the size probe
def probe(path: Path, sets, seeds, model: nn.Module, val_set, setting: str, convention: str,
          iterations=(), image_counts=(), image_seeds=(), qat: dict | None = None, work_dir: Path | None = None) -> list[dict]:
    """Does the result stop moving at the chosen synthesis size? Rows (appended to `path`, resumable):
    kind "iterations": PTQ mAP from the snapshot at each of `iterations`, per seed; kind "images": PTQ and
    zero-shot QAT (task-specific) mAP from the first n of the seed's set pooled with the next seeds' sets."""
    from helpers import data, evaluate
    rows = runs.read_jsonl(path)
    done = {(r["kind"], r["seed"], r["x"]) for r in rows}
    todo = [("iterations", s, it) for s in seeds for it in iterations] + [("images", s, n) for s in image_seeds for n in image_counts]
    todo = [k for k in todo if k not in done]
    val = data.Preloaded(val_set) if todo and not isinstance(val_set, data.Preloaded) else val_set
    seeds = list(seeds)
    for kind, seed, x in todo:
        if kind == "iterations":
            q = ptq_model(model, setting, convention, sets[seed].snapshots[x], True)
            row = {"kind": kind, "seed": seed, "x": x, "ptq_AP": evaluate.evaluate_detector(q, val, progress=False)["AP"]}
        else:
            order = seeds[seeds.index(seed):] + seeds[:seeds.index(seed)]
            images = torch.cat([sets[s].images for s in order])[:x]
            targets = [t for s in order for t in sets[s].targets][:x]
            if len(images) < x:
                raise TaskZSQError(f"the image probe asks {x} images, the sets of SEEDS hold {len(images)}")
            q = ptq_model(model, setting, convention, images, True)
            row = {"kind": kind, "seed": seed, "x": x, "ptq_AP": evaluate.evaluate_detector(q, val, progress=False)["AP"]}
            student = lsq_student(model, q)
            cell = Path(work_dir) / f"probe_{seed}_{x}"
            fit_qat(student, model, images, targets, cell.with_suffix(".pth"), cell.with_suffix(".jsonl"), seed=seed,
                    progress=False, **(qat or {}))
            row["qat_AP"] = evaluate.evaluate_detector(student, val, progress=False)["AP"]
            cell.with_suffix(".pth").unlink(missing_ok=True)
        runs.append_jsonl(path, row)
        rows.append(row)
    return rows


def probe_table(rows: list[dict], kind: str):
    """mean, std and n of the probe's mAP (points) per size, for PTQ and (image probe) QAT."""
    import pandas as pd
    frame = pd.DataFrame([r for r in rows if r["kind"] == kind])
    if frame.empty:
        return frame
    cols = [c for c in ("ptq_AP", "qat_AP") if c in frame]
    out = frame.groupby("x")[cols].agg(["mean", "std", "count"]) * 1.0
    for c in cols:
        out[(c, "mean")] *= 100
        out[(c, "std")] *= 100
    return out


def settled(table, chosen, column: str = "ptq_AP", effect: float = 0.5) -> dict:
    """The probe's rule: the result has stopped moving at `chosen` when its mean differs from the previous size's
    by no more than the larger of `effect` mAP points and their combined seed spread."""
    sizes = sorted(table.index)
    if chosen not in sizes or sizes.index(chosen) == 0:
        raise TaskZSQError(f"the probe needs a size below the chosen {chosen}, it has {sizes}")
    prev = sizes[sizes.index(chosen) - 1]
    a, b = table.loc[chosen, (column, "mean")], table.loc[prev, (column, "mean")]
    spread = math.hypot(*(float(np.nan_to_num(table.loc[k, (column, "std")])) for k in (chosen, prev)))
    change = float(a - b)
    return {"column": column, "chosen": chosen, "previous": prev, "change_points": change,
            "spread_points": spread, "settled": abs(change) <= max(effect, spread)}


# --------------------------------------------------------------------------- the paper's numbers and the claims
# Table 4 (COCO mAP, 2k synthetic images): task-specific (ours) vs task-agnostic (w/o L_detect)
PAPER_TABLE4 = {"YOLO11-s": {"W8A8": (45.6, 43.6), "W4A8": (42.6, 39.7), "W6A6": (43.0, 40.7)},
                "YOLO11-m": {"W8A8": (50.0, 49.8), "W4A8": (47.7, 47.3), "W6A6": (47.1, 46.6)},
                "Swin-T Mask R-CNN": {"W8A8": (45.1, 44.6), "W4A8": (43.0, 43.0), "W6A6": (42.0, 40.4)},
                "Swin-S Mask R-CNN": {"W8A8": (47.1, 45.1), "W4A8": (46.2, 43.6), "W6A6": (45.1, 42.8)}}
# Tables 1-3: ours (synthetic) vs LSQ on a small real set of the same size: (model, dataset) -> setting -> (ours, small real)
PAPER_SMALL_REAL = {("YOLOv5-s", "COCO (2k)"): {"W8A8": (35.8, 31.6), "W6A6": (32.7, 28.9), "W4A8": (33.0, 28.1)},
                    ("YOLO11-s", "COCO (2k)"): {"W8A8": (45.6, 44.0), "W6A6": (43.0, 41.5), "W4A8": (42.6, 40.9)},
                    ("Swin-T Mask R-CNN", "COCO (2k)"): {"W8A8": (45.1, 44.4), "W6A6": (42.0, 41.2), "W4A8": (43.0, 43.3)},
                    ("R50 Mask R-CNN", "VOC (50)"): {"W8A8": (72.9, 70.9)},
                    ("R50 Mask R-CNN", "COCO (2k)"): {"W8A8": (35.2, 32.9), "W4A8": (34.6, 32.3)}}


def paper_rows() -> list[dict]:
    """The paper's Table 4 beside ours: task-specific vs task-agnostic QAT, COCO mAP points, with model and dataset."""
    return [{"model": m, "dataset": "COCO", "setting": s, "specific": a, "agnostic": b, "gap": round(a - b, 1)}
            for m, row in PAPER_TABLE4.items() for s, (a, b) in row.items()]


def paper_effect(setting: str, which: str = "agnostic") -> float | None:
    """The paper's mean relative gain at `setting` over its models: task-specific over task-agnostic (Table 4) or
    synthetic over a small real set (`which="small_real"`, Tables 1-3); None where it has no row (W4A4)."""
    table = PAPER_TABLE4.values() if which == "agnostic" else PAPER_SMALL_REAL.values()
    gains = [(a - b) / b for row in table for s, (a, b) in row.items() if s == setting]
    return float(np.mean(gains)) if gains else None


def _stat(table, convention, setting, method):
    hit = table[(table["convention"] == convention) & (table["setting"] == setting) & (table["method"] == method)]
    return None if hit.empty else (float(hit["mean"].iloc[0]), float(hit["std"].iloc[0]))


def _claim(claim, cell, paper, ours, verdict, rule, paper_effect=None, our_effect=None, spread=None) -> dict:
    assert verdict in VERDICTS, verdict
    return {"claim": claim, "cell": cell, "paper": paper, "ours": ours, "verdict": verdict, "rule": rule,
            "paper_effect": paper_effect, "our_effect": our_effect, "spread": spread}


def _pct(v):
    return "n/a" if v is None else f"{100 * v:+.1f} %"


def claim_gap(table, convention: str, setting: str, a: str, b: str, claim: str, paper: float | None,
              paper_text: str, rule: str) -> dict | None:
    """Method `a` above method `b` in a cell: relative gain (a - b) / b against the spread sqrt(std_a^2 + std_b^2) / b."""
    sa, sb = _stat(table, convention, setting, a), _stat(table, convention, setting, b)
    if sa is None or sb is None:
        return None
    effect, spread = (sa[0] - sb[0]) / sb[0], math.hypot(sa[1], sb[1]) / sb[0]
    return _claim(claim, f"{convention} {setting}", paper_text, f"{100 * sa[0]:.1f} vs {100 * sb[0]:.1f} ({_pct(effect)})",
                  effect_verdict(effect, spread, paper), rule, paper, effect, spread)


def claim_specific_beats_agnostic(table, convention: str, setting: str, stage: str = "qat") -> dict | None:
    paper = paper_effect(setting) if stage == "qat" else None
    text = (f"Table 4 mean over 4 models (COCO): {_pct(paper)}" if paper is not None else
            "no number (the paper reports QAT only)" if stage == "ptq" else "no W4A4 row")
    return claim_gap(table, convention, setting, f"{stage}_specific", f"{stage}_agnostic",
                     f"{stage.upper()}: task-specific images beat task-agnostic ones", paper, text,
                     "gain beyond the seed spread and >= 1/3 of the paper's (where it has one)")


def claim_qat_beats_ptq(table, convention: str, setting: str) -> dict | None:
    return claim_gap(table, convention, setting, "qat_specific", "ptq_specific",
                     "zero-shot QAT improves on PTQ from the same images", None,
                     "implied (QAT is the method; no PTQ number)",
                     "gain beyond the seed spread")


def claim_synthetic_vs_small_real(table, convention: str, setting: str) -> dict | None:
    paper = paper_effect(setting, "small_real")
    return claim_gap(table, convention, setting, "qat_specific", "qat_real",
                     "QAT on synthetic images beats QAT on as many real images", paper,
                     f"Tables 1-3 mean (YOLO/Mask R-CNN, COCO/VOC): {_pct(paper)}" if paper is not None else "no W4A4 row",
                     "gain beyond the seed spread and >= 1/3 of the paper's (where it has one)")


def claim_objects_written(summary: dict) -> dict:
    """The detection loss writes the sampled objects into the images: the FP32 detector finds more of the zero-prior
    initial boxes (IoU 0.5, same class) on the task-specific images than on 03's task-agnostic images."""
    own = [d["found_initial"]["recall"] for d in summary["seeds"].values()]
    other = [d["found_initial_on_agnostic"]["recall"] for d in summary["seeds"].values()]
    diff = np.subtract(own, other)
    spread = float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
    return _claim("the images contain the sampled objects (detector finds the initial boxes)", "all seeds",
                  "shown as images (no number)", f"recall {np.mean(own):.2f} vs {np.mean(other):.2f} on 03's images",
                  effect_verdict(float(diff.mean()), spread, None), "recall gain beyond its seed spread",
                  None, float(diff.mean()), spread)


def claim_reconstructs(summary: dict, what: str) -> dict:
    """The sampler reconstructs the label distribution: the sampled labels' distance to the thermal set's real
    labels (never used) against the zero-prior initial labels' distance; holds when a third of it is closed."""
    d0, d1 = summary["distance"]["initial"][what], summary["distance"]["sampled"][what]
    effect = (d0 - d1) / d0 if d0 > 0 else 0.0
    return _claim(f"the sampler reconstructs the {what} distribution", "all seeds", "claimed (abstract; no number)",
                  f"TV distance to real labels {d0:.2f} (initial) -> {d1:.2f} (sampled)",
                  effect_verdict(effect, 0.0, 1.0), "distance to the real labels cut by >= 1/3",
                  1.0, effect, 0.0)


def claims(table, summary: dict, conventions, settings) -> list[dict]:
    """Every claim rule on every cell where its rows exist (QAT claims only where QAT ran)."""
    out = [claim_objects_written(summary), claim_reconstructs(summary, "category"), claim_reconstructs(summary, "area")]
    for c in conventions:
        for s in settings:
            for rule in (lambda: claim_specific_beats_agnostic(table, c, s, "qat"),
                         lambda: claim_specific_beats_agnostic(table, c, s, "ptq"),
                         lambda: claim_qat_beats_ptq(table, c, s), lambda: claim_synthetic_vs_small_real(table, c, s)):
                row = rule()
                if row is not None:
                    out.append(row)
    return out


def ours_beside_paper(table, conventions, settings):
    """Our task-specific vs task-agnostic gap per cell (QAT where it ran, else PTQ) beside the paper's Table 4."""
    import pandas as pd
    rows = [{"source": "paper", "model": r["model"], "dataset": r["dataset"], "stage": "QAT", "setting": r["setting"],
             "specific": r["specific"], "agnostic": r["agnostic"], "gap": r["gap"]} for r in paper_rows()]
    for c in conventions:
        for s in settings:
            stage = "qat" if _stat(table, c, s, "qat_specific") else "ptq"
            a, b = _stat(table, c, s, f"{stage}_specific"), _stat(table, c, s, f"{stage}_agnostic")
            if a and b:
                rows.append({"source": "ours", "model": f"RetinaNet R18-FPN ({c})", "dataset": "thermal tiny",
                             "stage": stage.upper(), "setting": s, "specific": round(100 * a[0], 1),
                             "agnostic": round(100 * b[0], 1), "gap": round(100 * (a[0] - b[0]), 1)})
    frame = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(("W8A8", "W6A6", "W4A8", "W4A4"))}
    return frame.sort_values(["setting", "source"], key=lambda v: v.map(order) if v.name == "setting" else v,
                             kind="stable").reset_index(drop=True)
