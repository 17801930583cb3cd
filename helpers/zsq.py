"""Zero-shot vs. real-data vs. noise calibration of the fake-quantized detector (paper 4.2.2-4.3).

The experiment notebook (`04_quantize_evaluate`) loads a trained detector, builds calibration
batches from one source, and for every (bit setting, batch) quantizes the whole detector, calibrates
it on that batch alone and measures COCO mAP. Each result is one row appended to `rows.jsonl` in
the run folder as soon as it is measured, so an interrupted run resumes where it stopped.

Calibration sources (all in batches of `batch_size`, paper: 8):
- "real": consecutive training images, batch k = images [k*8, k*8 + 8) in file order (paper 4.2.3);
- "distilled": images of a `03_distill_calibration_data` run, already in the normalised input space;
- "gaussian": N(0, 1) noise in the normalised input space at the detector's input size (the bundle's
  reading of the paper's "Gaussian noise" calibration data);
- the other noise sources, to find which reading of "Gaussian noise" makes calibration collapse as in
  the paper (section 4.3), all fed as pixel images through the detector's transform (normalised and
  resized like a camera frame): "gaussian-pixel", N(0, 1) pixels (what `torch.randn` images give a
  torchvision detector); "uniform-pixel", U(0, 1) over the pixel range; "gaussian-512x640", N(0, 1)
  pixels at the paper's input size, resized by the transform; "gaussian-matched", pixels from N(m, s)
  per channel, with m and s the mean and std of the detector's training images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers import config, data, distill, distributed, evaluate, quant, runs, upstream

NOISE_SOURCES = ("gaussian", "gaussian-pixel", "uniform-pixel", "gaussian-512x640", "gaussian-matched")
SOURCES = ("distilled", "real", *NOISE_SOURCES)
PAPER_INPUT_SIZE = (512, 640)  # FLIR ADAS frames, the paper's input size (H, W)


def real_batches(dataset, n_batches: int, batch_size: int = 8) -> list[list[torch.Tensor]]:
    """Consecutive training images: batch k holds images k*batch_size ... (k+1)*batch_size - 1."""
    needed = n_batches * batch_size
    if needed > len(dataset):
        raise ValueError(f"{n_batches} batches of {batch_size} need {needed} images; the set has {len(dataset)}")
    return [[dataset[i][0] for i in range(k * batch_size, (k + 1) * batch_size)] for k in range(n_batches)]


def gaussian_batches(n_batches: int, batch_size: int, image_size: tuple[int, int], seed: int) -> list[torch.Tensor]:
    """N(0, 1) images in the normalised input space (feed with `normalized=True`)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 3, *image_size, generator=g) for _ in range(n_batches)]


def pixel_moments(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a dataset's images in [0, 1] pixels (over every pixel of every image)."""
    total, squares, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for i in range(len(dataset)):
        image = dataset[i][0].double().flatten(1)
        total, squares, count = total + image.sum(1), squares + (image ** 2).sum(1), count + image.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean ** 2).clamp(min=0).sqrt().float()


def noise_batches(kind: str, n_batches: int, batch_size: int, model, seed: int,
                  train_set=None) -> tuple[list, bool]:
    """Calibration batches of one noise source (see the module docstring) and whether they are already in
    the normalised input space (only "gaussian" is). "gaussian-matched" needs the detector's training set."""
    if kind == "gaussian":
        return gaussian_batches(n_batches, batch_size, distill.input_size(model), seed), True
    if kind not in NOISE_SOURCES:
        raise ValueError(f"noise source must be one of {NOISE_SOURCES}, got {kind!r}")
    size = PAPER_INPUT_SIZE if kind == "gaussian-512x640" else distill.input_size(model)
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian-matched":
        if train_set is None:
            raise ValueError("'gaussian-matched' noise takes its per-channel mean and std from the training set: pass train_set")
        mean, std = (v[None, :, None, None] for v in pixel_moments(train_set))
    draw = torch.rand if kind == "uniform-pixel" else torch.randn
    batches = []
    for _ in range(n_batches):
        x = draw(batch_size, 3, *size, generator=g)
        batches.append(x * std + mean if kind == "gaussian-matched" else x)
    return batches, False


def calibration_batches(source: str, detector: runs.Run, model, n_batches: int, batch_size: int, seed: int,
                        distilled: runs.Run | None = None, sweep_iterations: list[int] = (), sweep_batches: int = 0):
    """Notebook 04's calibration data: ({iteration or None: batches}, {swept iteration: batches}, normalized)."""
    if source == "distilled":
        snapshots = upstream.load_distilled(distilled)
        final = max(snapshots)
        batches = {final: split_batches(snapshots[final], batch_size, n_batches)}
        return batches, {it: split_batches(snapshots[it], batch_size, sweep_batches) for it in sweep_iterations}, True
    if source == "real":
        return {None: real_batches(upstream.training_set(detector), n_batches, batch_size)}, {}, False
    if source in NOISE_SOURCES:
        train_set = upstream.training_set(detector) if source == "gaussian-matched" else None
        batches, normalized = noise_batches(source, n_batches, batch_size, model, seed, train_set)
        return {None: batches}, {}, normalized
    raise ValueError(f"SOURCE must be one of {SOURCES}, got {source!r}")


def split_batches(images: torch.Tensor, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """The first n_batches * batch_size images as batches; fails if there are not enough."""
    if n_batches * batch_size > len(images):
        raise ValueError(f"{n_batches} batches of {batch_size} need {n_batches * batch_size} images, "
                         f"the distillation run made {len(images)}: raise its NUM_IMAGES")
    return list(images[: n_batches * batch_size].float().split(batch_size))




def first_batches(detector: runs.Run, model: torch.nn.Module, seed: int = 0, batch_size: int = 8,
                  sources: tuple[str, ...] = ("real", "distilled", "gaussian"),
                  **distilled_match) -> dict[str, tuple[torch.Tensor | list, bool]]:
    """Batch 0 of each source exactly as notebook 04 builds it: {source: (images, normalized)}.
    The distilled batch comes from the 03 run matching `distilled_match` (final iteration)."""
    out = {}
    for source in sources:
        distilled = None
        if source == "distilled":
            distilled = upstream.distilled_run(detector.params["STAGE"], seed, detector.params["DATA_ROOT"],
                                               **distilled_match)
        batches, _, normalized = calibration_batches(source, detector, model, 1, batch_size, seed, distilled)
        out[source] = (next(iter(batches.values()))[0], normalized)
    return out


def calibrated_ranges(model: torch.nn.Module, batch, normalized: bool, a_bits: int = 8,
                      calibrator: str = "percentile", percentile: float = 99.99) -> dict[str, float]:
    """Clipping value (amax) of every layer input after calibrating a copy of `model` on `batch`."""
    q = quant.QuantSetting(8, a_bits, calibrator, percentile).quantize(model)
    quant.calibrate(q, [batch], normalized=normalized, progress=False)
    return {name: float(quantizer.hi) for name, quantizer in quant.input_quantizers(q).items()}


def first_layer_range(model: torch.nn.Module) -> float:
    """Calibrated clipping value of the first conv's input quantizer (the distilled-pixel-range check)."""
    name, quantizer = next(iter(quant.input_quantizers(model).items()))
    return float(quantizer.hi)


def quantized_copy(model, setting: str, calibrator: str = "percentile", percentile: float = 99.99,
                   symmetric: bool = True) -> torch.nn.Module:
    """A copy of `model` with weights quantized to `setting` ("W8A4"); activations still to calibrate."""
    return quant.QuantSetting.parse(setting, calibrator, percentile, symmetric).quantize(model)


def quantized_map(model, batch, normalized: bool, val_set, setting: quant.QuantSetting | str,
                  quantized: torch.nn.Module | None = None) -> dict:
    """Quantize a copy of `model` to `setting`, calibrate it on one batch, and measure mAP on `val_set`.

    `setting`: a `quant.QuantSetting` (a "W8A4" string means the default calibration).
    `quantized`: a `setting.quantize(model)` copy to reuse (calibration starts fresh histograms and
    overwrites every range, so a reused copy gives the same result as a new one).
    """
    q = quant.QuantSetting.of(setting).quantize(model) if quantized is None else quantized
    quant.calibrate(q, [batch], normalized=normalized, progress=False)
    metrics = evaluate.evaluate_detector(q, val_set, progress=False)
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "APs": metrics["APs"],
            "per_class_AP": metrics["per_class_AP"], "first_layer_amax": first_layer_range(q)}


def done_keys(rows: list[dict]) -> set[tuple]:
    return {(r["setting"], r["iteration"], r["batch"]) for r in rows}


def run_grid(model, batches_by_iteration: dict[int | None, list], normalized: bool, val_set,
             settings: list[quant.QuantSetting | str], rows_path: Path, progress: bool | None = None) -> list[dict]:
    """Evaluate every (setting, iteration, batch) not yet in `rows_path`, appending one row each.

    `settings`: `quant.QuantSetting`s (a "W8A4" string means the default calibration), all checked
    before any row. `batches_by_iteration` maps a distillation iteration (None for real/noise
    sources) to its batches. A row is keyed by the setting's name and names its calibration
    (`QuantSetting.labels`). Returns all rows, old and new, in grid order.

    Under torchrun (`python -m helpers.zsq`) the missing cells go out in rounds of one per rank
    (`distributed.map_sharded`), and rank 0 appends each round's rows in grid order: the file holds
    the rows one process writes, in its order, and an interrupted run loses at most one round. A
    cell's row is the same on any rank: each cell calibrates from fresh histograms (a reused copy
    calibrates like a new one) and evaluates the same images. Every rank returns every row.
    """
    settings = [quant.QuantSetting.of(s) for s in settings]
    by_name = {s.name: s for s in settings}
    rows = runs.read_jsonl(rows_path)
    done = done_keys(rows)
    grid = [(s.name, it, b) for s in settings for it, batches in batches_by_iteration.items() for b in range(len(batches))]
    todo = [key for key in grid if key not in done]
    show = bool(todo) and distributed.is_writer() and progress is not False
    val_set = data.Preloaded(val_set) if todo else val_set  # every row evaluates the same images
    copies: dict[str, torch.nn.Module] = {}  # the grid is setting-major: quantize weights once per setting (and rank)

    def cell(key: tuple) -> dict:
        name, iteration, b = key
        setting = by_name[name]
        if name not in copies:
            copies.clear()
            copies[name] = setting.quantize(model)
        result = quantized_map(model, batches_by_iteration[iteration][b], normalized, val_set, setting,
                               quantized=copies[name])
        return {"setting": name, "iteration": iteration, "batch": b, **result, **setting.labels}

    step = distributed.world_size()
    with tqdm(total=len(todo), desc="quantize+evaluate", disable=not show) as bar:
        for start in range(0, len(todo), step):
            for row in distributed.map_sharded(cell, todo[start:start + step]):
                if distributed.is_writer():
                    runs.append_jsonl(rows_path, row)
                rows.append(row)
            bar.update(min(step, len(todo) - start))
    distributed.barrier()  # the file is complete before any rank reads it again (the next grid of the run)
    by_key = {(r["setting"], r["iteration"], r["batch"]): r for r in rows}
    return [by_key[key] for key in grid]


def spread(rows: list[dict], by: tuple[str, ...] = ("setting",), value: str = "AP"):
    """mean, std (ddof 1), min, max and count of `value` per group, as a DataFrame in first-seen order."""
    import pandas as pd
    frame = pd.DataFrame(rows)
    keys = list(by)
    table = frame.groupby(keys, sort=False, dropna=False)[value].agg(
        mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, min="min", max="max", n="count")
    return table.reset_index()


# --------------------------------------------------------------------------- the stage under torchrun (notebook 04)
NOTEBOOK = "04_quantize_evaluate"


def quantize_batch_run(run: dict, device: torch.device) -> None:
    """Evaluate the grid of one resolved batch run (`helpers.batch.load_batch`) into its run folder's
    rows.jsonl, from the inputs notebook 04 builds (same helpers, same order); under torchrun the
    cells are sharded over the ranks (`run_grid`). The notebook, run afterwards, finds every row done."""
    p = run["params"]
    settings = [quant.QuantSetting.parse(s, p["CALIBRATOR"], p["PERCENTILE"], p["SYMMETRIC"]) for s in p["SETTINGS"]]
    folder = runs.results_dir() / NOTEBOOK / run["run_id"]
    target = runs.open_run(NOTEBOOK, p) if distributed.is_writer() else runs.Run(NOTEBOOK, p, folder)
    distributed.barrier()
    config.seed_everything(p["SEED"])
    detector = upstream.detector_run(p["STAGE"], PROFILE=p["PROFILE"], SEED=p["SEED"], DATA_ROOT=p["DATA_ROOT"])
    val_set = upstream.validation_set(detector, p["VAL_LIMIT"])
    model = upstream.load_detector(detector, val_set.num_classes)
    model = model.to(device) if distributed.active() else model  # alone: the profile's device, as in notebook 04
    distilled = (upstream.distilled_run(p["STAGE"], p["SEED"], p["DATA_ROOT"], LOSS=p["DISTILL_LOSS"],
                                        CLAMP=p["DISTILL_CLAMP"]) if p["SOURCE"] == "distilled" else None)
    batches, sweep, normalized = calibration_batches(p["SOURCE"], detector, model, p["N_BATCHES"], p["CALIB_BATCH"],
                                                     p["SEED"], distilled, p["SWEEP_ITERATIONS"], p["SWEEP_BATCHES"])
    run_grid(model, batches, normalized, val_set, settings, target.path("rows.jsonl"))
    if sweep:
        run_grid(model, sweep, normalized, val_set, settings[:1], target.path("rows.jsonl"))


def main(argv: list[str] | None = None) -> int:
    """`[torchrun --nproc-per-node N] python -m helpers.zsq BATCH.yaml [--run K ...]`.

    For each unfinished notebook-04 run of the batch (or the runs numbered K as `helpers.batch BATCH
    --list` prints them): evaluate its missing grid cells over every process of the group (`run_grid`:
    each rank every N-th cell, rank 0 appending the rows in grid order), then rank 0 executes notebook
    04 for it in one process, which finds every row done and finishes the run exactly as in the batch.
    """
    from helpers import batch
    return batch.distributed_main(argv, NOTEBOOK, quantize_batch_run, main.__doc__, "--grid-only")


if __name__ == "__main__":
    raise SystemExit(main())
