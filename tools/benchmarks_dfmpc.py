"""Cost of DF-MPC on this CPU: `python -m tools.benchmarks_dfmpc [--repeats 5] [--threads 1]`.

Times `helpers.dfmpc.compensate` (ternary / 6-bit, lambda1=0.5, BN folding, other layers 6-bit) on
torchvision resnet18 and resnet50 built with `weights=None`: random weights, which is fine because
the method does one data-free pass over the weights and its cost does not depend on their values.
Each repeat works on a fresh deepcopy made outside the timed region; the naive mode (same quantizers,
no c) is timed beside it to show what the closed form costs. Best and median of `repeats` after one
warm-up. The paper reports about 2 s for ResNet-18 on a GTX 1080 Ti. Writes
`results/benchmarks/dfmpc.json` atomically.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
import torchvision

from helpers import dfmpc
from helpers.runs import atomic_write_json, results_dir


def _time_compensate(model: torch.nn.Module, repeats: int, **kwargs) -> dict:
    times, report = [], None
    for i in range(repeats + 1):  # the first call is a warm-up
        m = copy.deepcopy(model)
        start = time.perf_counter()
        report = dfmpc.compensate(m, **kwargs)
        elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
        del m
    return {"best_s": min(times), "median_s": statistics.median(times), "repeats": repeats, "report": report}


def measure(repeats: int = 5, threads: int = 1, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    out = {"models": {}}
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(weights=None).eval()
        entry = {}
        for mode in ("dfmpc", "naive"):
            r = _time_compensate(model, repeats, mode=mode)
            rep = r.pop("report")
            entry[mode] = r
            if mode == "dfmpc":
                entry["pairs"] = len(rep["pairs"])
                entry["size"] = rep["size"]
                entry["loss_naive"], entry["loss_compensated"] = rep["loss_naive"], rep["loss_compensated"]
                entry["mean_c"] = statistics.fmean(p["mean_c"] for p in rep["pairs"])
        entry["dfmpc_over_naive"] = entry["dfmpc"]["best_s"] / entry["naive"]["best_s"]
        out["models"][arch] = entry
    out.update({
        "setup": {"weights": "None (random init; cost does not depend on values)", "low_bits": "ternary",
                  "high_bits": 6, "lambda1": 0.5, "lambda2": 0.0, "apply": "bn", "quantize_other": True,
                  "timed": "compensate() only, on a fresh deepcopy per repeat; one warm-up"},
        "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.machine(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "paper_reference": "about 2 s for ResNet-18 on one GTX 1080 Ti",
    })
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    parser.add_argument("--out", default=None, help="default: results/benchmarks/dfmpc.json")
    args = parser.parse_args(argv)
    result = measure(args.repeats, args.threads)
    path = atomic_write_json(args.out or results_dir() / "benchmarks" / "dfmpc.json", result, digits=4)
    for arch, e in result["models"].items():
        print(f"{arch}: dfmpc best {e['dfmpc']['best_s']:.3f} s, median {e['dfmpc']['median_s']:.3f} s; "
              f"naive best {e['naive']['best_s']:.3f} s; {e['pairs']} pairs; "
              f"{e['size']['weights_mib']:.2f} MiB weights vs {e['size']['fp32_mib']:.2f} MiB fp32")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
