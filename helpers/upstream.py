"""Where a notebook finds what earlier notebooks made: one home for every upstream lookup.

Each stage reads its inputs through these functions, never through another stage's module:
the detector a `02_train_detector` run trained (and the datasets it was trained and evaluated on),
the pretrained weights a fine-tuning starts from, and the images a `03_distill_calibration_data`
run distilled. Runs are found with `runs.find_run`: by id, else the single finished run whose
parameters match, preferring the one a batch made (listed in `results/manifest.json`); when that
leaves more than one, `runs.AmbiguousRun` names them instead of guessing.
"""
from __future__ import annotations

import torch

from helpers import config, data, models, runs

DETECTOR_STAGES = ("pretrain", "finetune")


def detector_run(stage: str, **match) -> runs.Run:
    """The `02_train_detector` run of `stage` ("pretrain" on RGB, "finetune" on thermal) matching `match`."""
    if stage not in DETECTOR_STAGES:
        raise ValueError(f"STAGE must be 'pretrain' or 'finetune', got {stage!r}")
    return runs.find_run("02_train_detector", STAGE=stage, **match)


def validation_set(run: runs.Run, limit: int = 0) -> data.CocoDetectionSet:
    """The validation set the detector of a `02_train_detector` run was evaluated on."""
    p = run.params
    return data.CocoDetectionSet(p["DATA_ROOT"], p["DATASET"], "val", p["CLASSES"] or None, p["LABELS"],
                                 limit=limit or None)


def training_set(run: runs.Run) -> data.CocoDetectionSet:
    """The detector's training images without augmentation (the PTQ calibration pool)."""
    p = run.params
    return data.CocoDetectionSet(p["DATA_ROOT"], p["DATASET"], "train", p["CLASSES"] or None, p["LABELS"])


def load_detector(run: runs.Run, num_classes: int) -> torch.nn.Module:
    """The trained detector of a `02_train_detector` run, on the device its profile runs on, in eval mode."""
    p = run.params
    return models.build_detector(p["ARCH"], num_classes, p["MIN_SIZE"], p["MAX_SIZE"],
                                 weights=str(run.path("model.pth"))).to(config.device(p["PROFILE"])).eval()


def pretrained_weights(init: str, **match) -> str:
    """Weights a training starts from: "none", "COCO_V1", or "pretrain" = the finished pretrain run matching `match`."""
    if init in ("none", "COCO_V1"):
        return init
    if init == "pretrain":
        return str(detector_run("pretrain", **match).path("model.pth"))
    raise ValueError(f"INIT must be 'none', 'COCO_V1' or 'pretrain', got {init!r}")


def distilled_run(stage: str, seed: int, data_root: str, **match) -> runs.Run:
    """The `03_distill_calibration_data` run for the detector of `stage` (e.g. LOSS="mean", CLAMP=True)."""
    return runs.find_run("03_distill_calibration_data", STAGE=stage, SEED=seed, DATA_ROOT=data_root, **match)


def load_distilled(run: runs.Run) -> dict[int, torch.Tensor]:
    """{iteration: images} saved by `03_distill_calibration_data` (normalised input space, float16)."""
    return torch.load(run.path("distilled.pt"), weights_only=True)
