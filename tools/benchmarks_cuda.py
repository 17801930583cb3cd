"""Paper-size run on one CUDA GPU: `python -m tools.benchmarks_cuda` -> results/benchmarks/paper_cuda.json.

The paper's detector (torchvision RetinaNet ResNet-50-FPN v2; random init, since no weights can be
downloaded where this was written) at FLIR's native 640x512, on synthetic thermal images written in
the FLIR ADAS layout, through the same helpers the notebooks call, so the `paper` profile's code
path is exercised on CUDA end to end:

1. training (`train.fit`): seconds per iteration and peak GPU memory at batch 8;
2. evaluation (`evaluate.evaluate_detector`, pycocotools): seconds per image, FP32 mAP;
3. zero-shot quantization: distillation (`distill.distill`), W8A8 calibration on distilled, real
   and Gaussian batches, W8A8 mAP of each;
4. the cost ratios of `tools.benchmarks_zsq` at batch 8, 512x640 on the GPU;
5. CUDA against the CPU on the same weights and images: FP32 head outputs, W8A8 head outputs after
   the same calibration batch, and the distillation loss over the first iterations.

Without a GPU it runs on the CPU at a small size (`--smoke`), which is how the tests check it.
Not yet run on a GPU: no machine with one was lent while it was written (see README, "GPU").
"""
from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from helpers import data, distill, evaluate, models, quant, synth, train, zsq
from tools import benchmarks_zsq
from helpers.runs import atomic_write_json, results_dir

PAPER = {"arch": "retinanet_resnet50_fpn_v2", "height": 512, "width": 640, "scale": 4.0}
SMOKE = {"arch": models.TINY_ARCH, "height": 128, "width": 160, "scale": 1.0}


def thermal_spec(height: int, width: int, scale: float) -> synth.SceneSpec:
    """The tiny thermal scenes drawn `scale` times larger (objects, clutter and all)."""
    base = synth.default_spec("flir")
    return replace(base, height=height, width=width, near_height=base.near_height * scale,
                   min_height=base.min_height * scale, min_box=base.min_box * scale)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def head_outputs(model: torch.nn.Module, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw classification logits and box regressions (before decoding and NMS), on the CPU."""
    device = models.device_of(model)
    with torch.inference_mode():
        batch, _ = model.transform([image.to(device) for image in images])
        features = list(model.backbone(batch.tensors).values())
        return {k: v.float().cpu() for k, v in model.head(features).items()}


def agreement(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Largest absolute difference relative to the reference's largest magnitude, per output."""
    return {k: float((reference[k] - other[k]).abs().max() / reference[k].abs().max().clamp_min(1e-12))
            for k in reference}


def _timed_epoch(model, loader, schedule, run_dir, seed, device) -> dict:
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    log = train.fit(model, loader, schedule, run_dir, seed, progress=False)
    _sync(device)
    return {"seconds": time.perf_counter() - start, "log": log, "peak_mib": _peak_mib(device)}


def measure(device: str = "cuda", smoke: bool = False, n_train: int = 256, n_val: int = 64, epochs: int = 6,
            batch: int = 8, distill_images: int = 16, distill_iterations: int = 100, repeats: int = 5,
            workers: int = 8, seed: int = 0, work_dir: str | Path | None = None, ratios: bool = True) -> dict:
    device = torch.device(device)
    size = SMOKE if smoke else PAPER
    arch, height, width = size["arch"], size["height"], size["width"]
    work = Path(work_dir or tempfile.mkdtemp(prefix="irzsq_cuda_"))
    torch.manual_seed(seed)
    out: dict = {"setup": {"arch": arch, "height": height, "width": width, "batch": batch, "device": str(device),
                           "train_images": n_train, "val_images": n_val, "epochs": epochs, "seed": seed,
                           "weights": "random init (no COCO weights on this machine)"}}

    # data in the FLIR ADAS v1.3 layout, read by the same loader as the real set
    start = time.perf_counter()
    spec = thermal_spec(size["height"], size["width"], size["scale"])
    synth.write_dataset(work / "FLIR_ADAS_1_3", "flir", n_train, n_val, seed, spec)
    train_set = data.CocoDetectionSet(work, "flir", "train", ["person", "bicycle", "car"], "contiguous", train=True)
    val_set = data.CocoDetectionSet(work, "flir", "val", ["person", "bicycle", "car"], "contiguous")
    calibration_pool = data.CocoDetectionSet(work, "flir", "train", ["person", "bicycle", "car"], "contiguous")
    out["data"] = {"generate_seconds": time.perf_counter() - start, "train": train_set.summary(), "val": val_set.summary()}

    # 1. training: a first epoch (cuDNN autotuning, allocator warm-up), then the timed rest
    model = models.build_detector(arch, train_set.num_classes, height, width).to(device)
    loader = data.make_loader(train_set, batch, train=True, seed=seed, num_workers=workers)
    schedule = train.Schedule(epochs, "sgd", 0.01, 1e-4, 0.9, "cosine", warmup_iters=20, grad_clip=10.0)
    first = _timed_epoch(model, loader, replace(schedule, epochs=1), work / "train", seed, device)
    rest = _timed_epoch(model, loader, schedule, work / "train", seed, device)
    iters = len(loader) * (epochs - 1)
    out["train"] = {"first_epoch_seconds": first["seconds"], "seconds_per_iteration": rest["seconds"] / max(iters, 1),
                    "images_per_second": iters * batch / rest["seconds"], "peak_gpu_mib": rest["peak_mib"],
                    "loss_by_epoch": [round(r["loss"], 4) for r in rest["log"]]}

    # 2. evaluation with pycocotools
    model.eval()
    _sync(device)
    start = time.perf_counter()
    fp32 = evaluate.evaluate_detector(model, val_set, batch_size=batch, progress=False)
    _sync(device)
    out["eval"] = {"seconds_per_image": (time.perf_counter() - start) / len(val_set),
                   **{k: fp32[k] for k in ("AP", "AP50", "detections")}}

    # 3. zero-shot quantization on the GPU: distilled vs real vs Gaussian calibration at W8A8
    _reset_peak(device)
    start = time.perf_counter()
    distilled = distill.distill(model, num_images=distill_images, batch_size=batch, iterations=distill_iterations,
                                loss="mean", clamp=True, seed=seed, progress=False)
    _sync(device)
    sources = {"distilled": (distilled.images[:batch], True),
               "real": (zsq.real_batches(calibration_pool, 1, batch)[0], False),
               "gaussian": (zsq.gaussian_batches(1, batch, (height, width), seed)[0], True)}
    out["zsq"] = {"distill_seconds": time.perf_counter() - start, "distill_peak_gpu_mib": _peak_mib(device),
                  "distill_loss_first_last": [float(distilled.loss[:, 0].mean()), distilled.final_loss],
                  "W8A8_AP": {name: zsq.quantized_map(model, images, normalized, val_set, "W8A8")["AP"]
                              for name, (images, normalized) in sources.items()},
                  "fp32_AP": fp32["AP"]}

    # 4. cost ratios at paper size
    state = copy.deepcopy(model.state_dict())
    out["ratios"] = None if not ratios else benchmarks_zsq.measure(None, repeats, batch, height, width, distill_iters=min(6, distill_iterations),
                                           seed=seed, arch=arch, device=str(device))

    # 5. the same weights and images on the CPU
    images = [val_set[i][0] for i in range(min(2, len(val_set)))]
    cpu_model = models.build_detector(arch, train_set.num_classes, height, width)
    cpu_model.load_state_dict({k: v.cpu() for k, v in state.items()})
    cpu_model.eval()
    out["cpu_agreement"] = {"fp32_head": agreement(head_outputs(cpu_model, images), head_outputs(model, images))}
    calibration = sources["real"][0]
    quantized = {}
    for name, m in (("cpu", cpu_model), ("device", model)):
        quantized[name] = quant.quantize_model(m, 8, 8)
        quant.calibrate(quantized[name], [calibration], progress=False)
    ranges = [(float(a.hi), float(b.hi)) for a, b in zip(quant.input_quantizers(quantized["cpu"]).values(),
                                                         quant.input_quantizers(quantized["device"]).values())]
    out["cpu_agreement"]["w8a8_head"] = agreement(head_outputs(quantized["cpu"], images),
                                                  head_outputs(quantized["device"], images))
    out["cpu_agreement"]["w8a8_range_max_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in ranges)
    losses = {name: distill.distill(m, num_images=2, batch_size=2, iterations=5, seed=seed, progress=False).loss
              for name, m in (("cpu", cpu_model), ("device", model))}
    out["cpu_agreement"]["distill_loss_max_rel_diff"] = float(abs(losses["cpu"] - losses["device"]).max()
                                                              / abs(losses["cpu"]).max())
    out["env"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "tf32_conv": torch.backends.cudnn.allow_tf32, "cpu": platform.processor() or platform.machine()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model and images (CPU check of this script)")
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="paper 4.2.3: 8")
    parser.add_argument("--distill-iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each cost-ratio timing")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", default=str(results_dir() / "benchmarks" / "paper_cuda.json"))
    args = parser.parse_args(argv)
    result = measure(args.device, args.smoke, args.train_images, args.val_images, args.epochs,
                     batch=args.batch, distill_images=2 * args.batch, distill_iterations=args.distill_iterations, repeats=args.repeats, workers=args.workers)
    print(atomic_write_json(Path(args.out), result, digits=5).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
