"""Cost of zero-shot quantization on this CPU, side by side in one run: `python -m helpers.benchmarks_zsq`.

On the tiny detector at batch 8, 128x160 (random weights unless a checkpoint is given; speed does
not depend on their values), three ratios with their targets:

- (a) one distillation iteration (`helpers.distill.distill`, per iteration) over one forward +
  backward of the backbone body on the same batch (parameters frozen, gradient to the input):
  target <= 1.05. Both sides are averaged over `--distill-iterations` (24) iterations / passes per
  timing, so the distillation's one-time setup (noise, optimizer, BN patching) is spread over them
  as over the 100 iterations of a real run, and neither side gets a best-of advantage;
- (b) evaluation of the W8A8 fake-quantized detector over the float detector: target <= 1.2;
- (c) one calibration pass (`helpers.quant.calibrate`, histograms + percentile ranges) over plain
  float inference of the same batch: target <= 1.5.

Measurements are interleaved (A, B, A, B, ...) and the best of N is kept, because another process
may load the CPU meanwhile. Writes `results/benchmarks/zsq.json` atomically.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch

from helpers import distill, models, quant
from helpers.runs import atomic_write_json, results_dir

TARGETS = {"distill_over_body_fwd_bwd": 1.05, "fakequant_over_fp32_eval": 1.2, "calibration_over_fp32_inference": 1.5}


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int, divide: dict[str, int] | None = None,
                 sync: Callable[[], None] = lambda: None) -> dict:
    """Best and median wall seconds, and best process CPU seconds, of each function, timed in turn
    after one warm-up call each. CPU time does not count time spent descheduled, so with one
    thread it is the measure least disturbed by other processes. `sync` waits for queued GPU work
    (torch.cuda.synchronize), so a timing covers the kernels, not just their launch."""
    divide = divide or {}
    for fn in fns.values():
        fn()
    sync()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append((time.perf_counter() - start) / divide.get(name, 1))
            cpu[name].append((time.process_time() - start_cpu) / divide.get(name, 1))
    return {name: {"best_s": min(wall[name]), "median_s": statistics.median(wall[name]),
                   "best_cpu_s": min(cpu[name]), "repeats": repeats} for name in fns}


def measure(checkpoint: str | None = None, repeats: int = 7, batch: int = 8, height: int = 128, width: int = 160,
            distill_iters: int = 24, seed: int = 0, arch: str = models.TINY_ARCH,
            device: str = "cpu") -> dict:
    load_before = os.getloadavg()[0]
    torch.manual_seed(seed)
    device = torch.device(device)
    model = models.build_detector(arch, 4, height, width, weights=checkpoint or "none").to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, height, width, generator=g).to(device) for _ in range(batch)]

    # (a) distillation vs the body's forward + backward
    body = model.backbone.body
    x = torch.randn(batch, 3, height, width, generator=g).to(device)

    def body_fwd_bwd():  # as many passes as a distillation timing has iterations, so both are averages
        flags = [p.requires_grad for p in body.parameters()]
        for p in body.parameters():
            p.requires_grad_(False)
        for _ in range(distill_iters):
            inp = x.clone().requires_grad_(True)
            sum(f.mean() for f in body(inp).values()).backward()
        for p, flag in zip(body.parameters(), flags):
            p.requires_grad_(flag)

    def distill_run(loss):
        return lambda: distill.distill(model, num_images=batch, batch_size=batch, iterations=distill_iters,
                                       loss=loss, progress=False, seed=seed)

    a = _interleaved({"body_fwd_bwd": body_fwd_bwd, "distill_mean": distill_run("mean"),
                      "distill_mean_std": distill_run("mean+std")}, repeats,
                     {"body_fwd_bwd": distill_iters, "distill_mean": distill_iters, "distill_mean_std": distill_iters},
                     sync)

    # (b) W8A8 evaluation vs float evaluation, (c) calibration pass vs float inference
    q = quant.quantize_model(model, 8, 8, calibrator="percentile", percentile=99.99)
    quant.calibrate(q, [images], progress=False)

    @torch.inference_mode()
    def fp32_eval():
        model(images)

    @torch.inference_mode()
    def fakequant_eval():
        q(images)

    def calibration_pass():
        quant.calibrate(q, [images], progress=False)

    bc = _interleaved({"fp32_eval": fp32_eval, "fakequant_eval": fakequant_eval,
                       "calibration_pass": calibration_pass}, repeats, sync=sync)
    range_seconds = {}
    for calibrator in quant.CALIBRATORS:  # one-off cost after the pass, per model
        start = time.perf_counter()
        quant.set_ranges(q, calibrator)
        range_seconds[calibrator] = time.perf_counter() - start

    def ratios_of(key: str) -> dict:
        return {
            "distill_over_body_fwd_bwd": a["distill_mean"][key] / a["body_fwd_bwd"][key],
            "distill_mean_std_over_body_fwd_bwd": a["distill_mean_std"][key] / a["body_fwd_bwd"][key],
            "fakequant_over_fp32_eval": bc["fakequant_eval"][key] / bc["fp32_eval"][key],
            "calibration_over_fp32_inference": bc["calibration_pass"][key] / bc["fp32_eval"][key],
        }

    ratios, cpu_ratios = ratios_of("best_s"), ratios_of("best_cpu_s")
    return {
        "setup": {"model": arch, "device": str(device), "weights": checkpoint or "random", "batch": batch,
                  "height": height, "width": width, "distill_iterations_per_timing": distill_iters},
        "timings": {**a, **bc}, "set_ranges_s": range_seconds, "ratios": ratios, "cpu_time_ratios": cpu_ratios,
        "targets": TARGETS, "within_target": {k: ratios[k] <= v for k, v in TARGETS.items()},
        "within_target_cpu_time": {k: cpu_ratios[k] <= v for k, v in TARGETS.items()},
        "size": quant.size_report(model, q),
        "note": ("best of interleaved repeats after one warm-up; the distill ratio uses the paper's 'mean' loss "
                 "(mean+std reported beside it); calibration = histograms of every conv/linear layer input + percentile "
                 "ranges, running transform, backbone and head (no box decoding/NMS, which it does not need)"),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other processes share the CPU
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="weights saved by helpers.train (default: random init)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--distill-iterations", type=int, default=24,
                        help="iterations per distillation timing (and body passes per reference timing); "
                             "the one-time setup of a distillation is spread over them, as over a real run's")
    parser.add_argument("--arch", default=models.TINY_ARCH, choices=models.ARCHS[1:],
                        help="tiny detector to time")
    parser.add_argument("--out", default=None, help="JSON to write (default: results/benchmarks/zsq.json)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="torch threads; the first count gives the main result, others only their ratios")
    args = parser.parse_args(argv)
    runs = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs[threads] = measure(args.checkpoint, args.repeats, distill_iters=args.distill_iterations, arch=args.arch)
    result = runs[args.threads[0]]
    if len(runs) > 1:
        result["ratios_by_threads"] = {str(t): {"wall": r["ratios"], "cpu_time": r["cpu_time_ratios"]}
                                       for t, r in runs.items()}
    path = atomic_write_json(args.out or results_dir() / "benchmarks" / "zsq.json", result, digits=4)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
