"""Detector training in the style of torchvision's `references/detection`, resumable and seeded.

`fit` writes, every epoch and atomically, one checkpoint dict
`{model, optimizer, lr_scheduler, epoch, args}` to `checkpoint.pth`, and appends the epoch's mean
losses (and optional validation mAP) to `train_log.jsonl`. Rerunning `fit` on the same folder
resumes after the last finished epoch; a finished run does no training at all.
Each epoch reseeds torch from (seed, epoch), so a resumed run equals an uninterrupted one.

Several GPUs: `torchrun --nproc-per-node N -m helpers.train params/paper.yaml` trains the batch's
notebook-02 runs with DistributedDataParallel (see `helpers.distributed` and `main`). Inside `fit`,
the distributed path is taken only when a process group of more than one process is initialised;
one process runs exactly the code it always ran.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from helpers import distributed
from helpers.runs import append_jsonl, atomic_torch_save, read_jsonl, write_jsonl


@dataclass
class Schedule:
    """Optimiser and learning-rate schedule (paper 4.2.1: SGD 0.01, momentum 0.9, wd 1e-4, lr/5 every 10 epochs)."""

    epochs: int
    optimizer: str = "sgd"          # "sgd" | "adamw"
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_schedule: str = "step"       # "step" (x gamma every step_epochs) | "cosine"
    step_epochs: int = 10
    gamma: float = 0.2
    warmup_iters: int = 0
    grad_clip: float = 0.0          # 0 = off


class TrainingDiverged(FloatingPointError):
    pass


def make_optimizer(model: nn.Module, s: Schedule) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {s.optimizer!r}")


def lr_factor(s: Schedule, iters_per_epoch: int) -> Callable[[int], float]:
    """Per-iteration multiplier: linear warm-up, then step or cosine decay."""
    total = max(s.epochs * iters_per_epoch, 1)
    if s.lr_schedule not in ("step", "cosine"):
        raise ValueError(f"lr_schedule must be 'step' or 'cosine', got {s.lr_schedule!r}")

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / s.warmup_iters) if s.warmup_iters else 1.0
        if s.lr_schedule == "step":
            return warm * s.gamma ** (it // (s.step_epochs * iters_per_epoch))
        return warm * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
    return factor


def train_one_epoch(model, optimizer, scheduler, loader, grad_clip: float = 0.0, epoch: int = 0,
                    progress: bool | None = None) -> dict:
    """One pass over `loader`; returns mean loss components."""
    model.train()
    device = next(model.parameters()).device
    sums, count = {}, 0
    kwargs = {} if progress is None else {"disable": not progress}
    for it, (images, targets) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, **kwargs)):
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        losses = model([image.to(device, non_blocking=True) for image in images], targets)
        loss = sum(losses.values())
        if distributed.any_rank(not torch.isfinite(loss)):  # every rank stops together (one process: as is)
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, iteration {it} "
                                   f"({ {k: v.item() for k, v in losses.items()} }); lower the learning rate "
                                   "or raise the warm-up, then rerun (training resumes from the last good epoch).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        count += 1
    means = {k: v / max(count, 1) for k, v in sums.items()}
    return distributed.mean_over_ranks(means) if distributed.active() else means


def fit(model: nn.Module, loader, schedule: Schedule, run_dir: str | Path, seed: int = 0,
        evaluate: Callable[[nn.Module], dict] | None = None, eval_every: int = 0,
        progress: bool | None = None, final_weights: str | Path | None = None) -> list[dict]:
    """Train for `schedule.epochs`, checkpointing and logging every epoch; resume if interrupted.

    `evaluate(model) -> dict` runs every `eval_every` epochs and after the last one (its values are
    logged with an `val_` prefix). Returns the whole epoch log.

    `final_weights`: the finished run's weights (`save_weights`). When they exist, the log holds every
    epoch and there is no checkpoint to resume from (a fresh clone has the committed weights and
    log, not the git-ignored checkpoint), they are loaded and nothing is trained: retraining on
    another CPU would give other weights than the ones every committed downstream result came from.
    """
    run_dir = Path(run_dir)
    ckpt_path, log_path = run_dir / "checkpoint.pth", run_dir / "train_log.jsonl"
    finished_log = read_jsonl(log_path)
    if (final_weights is not None and Path(final_weights).exists() and not ckpt_path.exists()
            and [row["epoch"] for row in finished_log] == list(range(schedule.epochs))):
        model.load_state_dict(load_checkpoint(final_weights)["model"])
        return finished_log
    optimizer = make_optimizer(model, schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, len(loader)))
    start = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, ("model", "optimizer", "lr_scheduler", "epoch"))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        start = ckpt["epoch"] + 1
    logged = read_jsonl(log_path)
    log = [row for row in logged if row["epoch"] < start]
    if len(log) != len(logged) and distributed.is_writer():  # epochs after the checkpoint (or all) are trained again
        write_jsonl(log_path, log)
    kwargs = {} if progress is None else {"disable": not progress or not distributed.is_writer()}
    sampler = getattr(loader, "sampler", None)
    with distributed.synced_batchnorm(model):
        net = distributed.wrap(model)  # DDP in a process group, `model` itself otherwise
        for epoch in tqdm(range(start, schedule.epochs), desc="training", initial=start, total=schedule.epochs, **kwargs):
            # rank 0 draws the single process's augmentation; the others their own, reproducible draws
            torch.manual_seed(seed * 100_003 + epoch + 1_000_003 * distributed.rank())
            if getattr(loader, "generator", None) is not None:
                loader.generator.manual_seed(seed * 100_003 + epoch)
            if isinstance(sampler, torch.utils.data.DistributedSampler):  # the same order from the same seed
                sampler.seed = seed
                sampler.set_epoch(epoch)
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
            started = time.perf_counter()
            row.update(train_one_epoch(net, optimizer, scheduler, loader, schedule.grad_clip, epoch, progress))
            row["train_seconds"] = time.perf_counter() - started  # volatile: logged, never printed in notebooks
            last = epoch == schedule.epochs - 1
            if evaluate is not None and (last or (eval_every and (epoch + 1) % eval_every == 0)):
                row.update({f"val_{k}": v for k, v in evaluate(model).items() if isinstance(v, (int, float))})
            if distributed.is_writer():
                atomic_torch_save(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "lr_scheduler": scheduler.state_dict(), "epoch": epoch,
                                              "args": asdict(schedule)})
                append_jsonl(log_path, row)
            log.append(row)
    distributed.barrier()  # the other ranks return once rank 0's files are complete
    return log


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or not the kind expected; the message names the fix."""


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = ("model",)) -> dict:
    """Read a checkpoint written by this module with `weights_only=True` (tensors, numbers, strings and
    containers only: no code runs while loading) and check that it holds `keys`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, pickled objects other than weights
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(err).__name__}: {str(err)[:200]}). "
                              "It is corrupt or not written by helpers.train: delete it and rerun the notebook "
                              "that writes it (training resumes from the previous checkpoint, if any).") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing} (has {sorted(state)[:6] if isinstance(state, dict) else type(state).__name__}); "
                              "it is not a checkpoint of helpers.train: delete it and rerun the notebook that writes it.")
    return state


def train_notebook_run(params: dict, run_dir: str | Path, augment: bool = True, progress: bool | None = None) -> list[dict]:
    """Notebook 02's training, cell for cell, in one process of a torchrun group (or alone): the same
    datasets, model, initial weights, schedule and `fit` call, with the per-rank share of BATCH_SIZE as
    the loader's batch (global batch = BATCH_SIZE) and evaluation predictions gathered over ranks.

    `augment=False` builds the training split without the random horizontal flip. With the flip, rank 0
    draws what one process would and the other ranks their own (seeded) flips, so N processes match one
    process only up to the augmentation draws; without it they match to float rounding (the CI check)."""
    from helpers import config, data, evaluate, models, upstream
    p = params
    config.seed_everything(p["SEED"])
    train_set = data.CocoDetectionSet(p["DATA_ROOT"], p["DATASET"], "train", p["CLASSES"] or None, p["LABELS"],
                                      train=augment, limit=p["TRAIN_LIMIT"] or None)
    val_set = data.CocoDetectionSet(p["DATA_ROOT"], p["DATASET"], "val", p["CLASSES"] or None, p["LABELS"],
                                    limit=p["VAL_LIMIT"] or None)
    init = upstream.pretrained_weights(p["INIT"], PROFILE=p["PROFILE"], SEED=p["SEED"], ARCH=p["ARCH"], DATA_ROOT=p["DATA_ROOT"])
    model = models.build_detector(p["ARCH"], train_set.num_classes, p["MIN_SIZE"], p["MAX_SIZE"], weights=init)
    model = model.to(config.device(p["PROFILE"]))
    schedule = Schedule(p["EPOCHS"], p["OPTIMIZER"], p["LR"], p["WEIGHT_DECAY"], p["MOMENTUM"], p["LR_SCHEDULE"],
                        p["LR_STEP_EPOCHS"], p["LR_GAMMA"], p["WARMUP_ITERS"], p["GRAD_CLIP"])
    loader = distributed.make_loader(train_set, distributed.per_rank_batch(p["BATCH_SIZE"]), train=True, seed=p["SEED"])
    return fit(model, loader, schedule, run_dir, p["SEED"], evaluate=lambda m: evaluate.evaluate_detector(m, val_set),
               eval_every=p["EVAL_EVERY"], progress=progress, final_weights=Path(run_dir) / "model.pth")


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """The final model alone (what downstream notebooks load)."""
    return atomic_torch_save(path, {"model": model.state_dict()})


def log_table(log: list[dict], digits: int = 3):
    """The epoch log as a rounded DataFrame (epoch counted from 1)."""
    import pandas as pd
    frame = pd.DataFrame(log)
    if frame.empty:
        return frame
    frame["epoch"] += 1
    keep = ["epoch", "lr", "loss", "classification", "bbox_regression", "val_AP", "val_AP50"]
    return frame[[c for c in keep if c in frame]].round({c: digits for c in frame if c != "lr"}).round({"lr": 6})


def convergence(log: list[dict], window: int = 1, loss_tol: float = 0.05, ap_tol: float = 0.015) -> dict:
    """Call training converged when, over the last `window` epochs, the train loss fell by less than
    `loss_tol` (relative) and validation mAP moved by less than `ap_tol` (absolute)."""
    if len(log) < window + 2:  # one more epoch than the window, so the judged change is not the warm-up
        return {"epochs": len(log), "converged": False, "reason": "too few epochs to judge"}
    loss_change = (log[-1 - window]["loss"] - log[-1]["loss"]) / log[-1 - window]["loss"]
    evaluated = [r["val_AP"] for r in log if "val_AP" in r]
    ap_change = evaluated[-1] - evaluated[-2] if len(evaluated) >= 2 else None
    converged = loss_change < loss_tol and ap_change is not None and abs(ap_change) < ap_tol
    return {"epochs": len(log), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "loss_rel_drop_last_epochs": loss_change, "window_epochs": window, "val_AP_change_last_eval": ap_change,
            "converged": converged}


NOTEBOOK = "02_train_detector"


def main(argv: list[str] | None = None) -> int:
    """`[torchrun --nproc-per-node N] python -m helpers.train BATCH.yaml [--run K ...]`.

    For each notebook-02 run of the batch (or the runs numbered K as `helpers.batch BATCH --list`
    prints them), unless finished: train it with every process of the group (checkpoint, log and
    weights in its run folder, written by rank 0), then let rank 0 execute notebook 02 for it in one
    process, which finds the last epoch's checkpoint, trains nothing, evaluates and finishes the run
    exactly as in the batch. A run with EPOCHS 0 (the paper's COCO detector) is only executed.
    Afterwards `python -m helpers.batch BATCH` runs the rest of the batch and skips these runs.
    """
    import argparse

    from helpers import batch, runs
    parser = batch.add_distributed_arguments(argparse.ArgumentParser(description=main.__doc__.splitlines()[0]), NOTEBOOK)
    parser.add_argument("--train-only", action="store_true", help="train, but do not execute the notebook")
    parser.add_argument("--no-augment", action="store_true", help="no random flip (N processes = 1 process to float rounding)")
    args = parser.parse_args(argv)

    def train_run(run: dict, device) -> None:  # a run with EPOCHS 0 (the paper's COCO detector) is only executed
        if run["params"]["EPOCHS"] > 0:
            if distributed.is_writer():
                runs.open_run(NOTEBOOK, run["params"])
            distributed.barrier()
            train_notebook_run(run["params"], runs.results_dir() / NOTEBOOK / run["run_id"], augment=not args.no_augment)
    return batch.run_distributed(args.batch, NOTEBOOK, train_run, args.run, args.backend,
                                 execute_notebook=not args.train_only)


if __name__ == "__main__":
    raise SystemExit(main())
