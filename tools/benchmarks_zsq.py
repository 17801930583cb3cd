"""Cost of zero-shot quantization on this CPU, side by side in one run: `python -m tools.benchmarks_zsq`.

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

Measurements are interleaved in rounds of alternating order (A B, B A, ...), because another
process may load the CPU meanwhile; each ratio is reported as best of N over best of N and as the
median over rounds of the two sides' paired ratio, and a target counts as met only if both are.
Writes `results/benchmarks/zsq.json` atomically.
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
RATIO_SIDES = {  # ratio -> (timed function, its reference)
    "distill_over_body_fwd_bwd": ("distill_mean", "body_fwd_bwd"),
    "distill_mean_std_over_body_fwd_bwd": ("distill_mean_std", "body_fwd_bwd"),
    "fakequant_over_fp32_eval": ("fakequant_eval", "fp32_eval"),
    "calibration_over_fp32_inference": ("calibration_pass", "fp32_eval"),
}


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int, divide: dict[str, int] | None = None,
                 sync: Callable[[], None] = lambda: None) -> dict:
    """Wall and process CPU seconds of each function, timed in turn after one warm-up call each, in
    rounds whose order alternates (A B C, C B A, ...) so that neither side always runs first. Returns
    best, median and every round's seconds. CPU time does not count time spent descheduled, so with
    one thread it is the measure least disturbed by other processes. `sync` waits for queued GPU work
    (torch.cuda.synchronize), so a timing covers the kernels, not just their launch."""
    divide = divide or {}
    for fn in fns.values():
        fn()
    sync()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    order = list(fns)
    for round_ in range(repeats):
        for name in (order if round_ % 2 == 0 else order[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            wall[name].append((time.perf_counter() - start) / divide.get(name, 1))
            cpu[name].append((time.process_time() - start_cpu) / divide.get(name, 1))
    return {name: {"best_s": min(wall[name]), "median_s": statistics.median(wall[name]),
                   "best_cpu_s": min(cpu[name]), "repeats": repeats, "rounds_s": wall[name]} for name in fns}


def _paired_median(timings: dict, numerator: str, denominator: str) -> float:
    """Median over rounds of numerator / denominator, each pair timed next to each other (same load)."""
    return statistics.median(n / d for n, d in zip(timings[numerator]["rounds_s"], timings[denominator]["rounds_s"]))


def measure(checkpoint: str | None = None, repeats: int = 9, batch: int = 8, height: int = 128, width: int = 160,
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

    timings = {**a, **bc}

    def ratios_of(key: str) -> dict:
        return {name: timings[num][key] / timings[den][key] for name, (num, den) in RATIO_SIDES.items()}

    ratios, cpu_ratios = ratios_of("best_s"), ratios_of("best_cpu_s")
    paired = {name: _paired_median(timings, num, den) for name, (num, den) in RATIO_SIDES.items()}
    return {
        "setup": {"model": arch, "device": str(device), "weights": checkpoint or "random", "batch": batch,
                  "height": height, "width": width, "distill_iterations_per_timing": distill_iters},
        "timings": timings, "set_ranges_s": range_seconds, "ratios": ratios, "cpu_time_ratios": cpu_ratios,
        "median_paired_ratios": paired, "targets": TARGETS,
        # met only if both the best-of ratio and the median of the paired rounds are within the target
        "within_target": {k: max(ratios[k], paired[k]) <= v for k, v in TARGETS.items()},
        "within_target_cpu_time": {k: cpu_ratios[k] <= v for k, v in TARGETS.items()},
        "size": quant.size_report(model, q),
        "note": ("ratios: best of interleaved repeats after one warm-up; median_paired_ratios: median over rounds "
                 "of the two sides timed next to each other, rounds in alternating order; a target counts as met "
                 "only if both are within it; the distill ratio uses the paper's 'mean' loss "
                 "(mean+std reported beside it); calibration = histograms of every conv/linear layer input + percentile "
                 "ranges, running transform, backbone and head (no box decoding/NMS, which it does not need)"),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other processes share the CPU
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="weights saved by helpers.train (default: random init)")
    parser.add_argument("--repeats", type=int, default=9)
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
        result["ratios_by_threads"] = {str(t): {"wall": r["ratios"], "cpu_time": r["cpu_time_ratios"],
                                                "median_paired": r["median_paired_ratios"],
                                                "within_target": r["within_target"]} for t, r in runs.items()}
    path = atomic_write_json(args.out or results_dir() / "benchmarks" / "zsq.json", result, digits=4)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
