"""Speed and size of the exported detector, side by side in one run: `python -m tools.benchmarks_onnx`.

backbone + FPN + head (the exported graph, batch 1, 128x160 normalised input) of the tiny fine-tuned
detector (random weights with randomised norm statistics when no run exists): PyTorch FP32, PyTorch
fake-quant W8A8, onnxruntime FP32, onnxruntime int8 faithful QDQ, onnxruntime int8 with its own placement
and our scales, onnxruntime quantize_static; at 1 and 2 threads; rounds interleaved in alternating order
(tools.benchmarks_zsq._interleaved), best-of and paired-median ratios over ORT FP32; ONNX file sizes;
the CPU's ISA flags and the load average (other processes share this CPU: ratios, not absolute times).
A speedup counts only as measured here, on this CPU. Writes `results/benchmarks/onnx.json`.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from helpers import export, models, quant
from tools.benchmarks_zsq import _interleaved, _paired_median
from helpers.runs import atomic_write_json, cpu_info, results_dir

GOALS = {"size_ratio_min": 3.9, "int8_over_fp32_speed_avx2_min": 1.0, "int8_over_fp32_speed_vnni_min": 2.0}


def _detector(seed: int):
    try:
        from helpers import upstream
        run = upstream.detector_run("finetune", PROFILE="tiny", SEED=seed, DATA_ROOT="data/tiny")
        val = upstream.validation_set(run, 8)
        return upstream.load_detector(run, val.num_classes).cpu(), "fine-tuned " + run.id
    except FileNotFoundError:
        import sys
        sys.path.insert(0, str(export.Path(__file__).resolve().parents[1] / "tests" / "unit"))
        from test_export import _randomised
        return _randomised(seed), "random (norm statistics randomised)"


def measure(repeats: int = 7, threads: tuple[int, ...] = (1, 2), seed: int = 0) -> dict:
    load_before = os.getloadavg()[0]
    model, weights = _detector(seed)
    x = export.example_input(model, 1, seed)
    q = quant.quantize_model(model, 8, 8, "percentile", 99.99)
    quant.calibrate(q, [export.example_input(model, 8, seed + 1)], normalized=True, progress=False)
    out = {"setup": {"graph": "backbone+fpn+head", "batch": 1, "input": list(x.shape), "weights": weights,
                     "repeats": repeats}, "cpu": cpu_info(), "goals": GOALS}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"ort_fp32": export.export_float(model, f"{tmp}/fp32.onnx"),
                 "ort_int8_qdq": export.export_qdq(q, f"{tmp}/qdq.onnx")}
        export.export_float(q, f"{tmp}/fq.onnx")
        calib = [export.example_input(model, 8, seed + 1)]
        files["ort_int8_ort_placement"] = export.quantize_ort(f"{tmp}/fq.onnx", f"{tmp}/pin.onnx", calib, q, pin_scales=True)
        files["ort_int8_quantize_static"] = export.quantize_ort(f"{tmp}/fp32.onnx", f"{tmp}/st.onnx", calib)
        out["bytes"] = {k: v["bytes"] for k, v in files.items()}
        out["size_ratio_vs_fp32"] = {k: files["ort_fp32"]["bytes"] / v["bytes"] for k, v in files.items()}
        out["int8_convs"] = {k: export.int8_conv_count(v["path"]) for k, v in files.items() if k != "ort_fp32"}
        by_threads = {}
        for t in threads:
            torch.set_num_threads(t)
            sessions = {k: export.session(v["path"], t) for k, v in files.items()}
            fns = {"torch_fp32": lambda: export.torch_outputs(model, x),
                   "torch_fakequant": lambda: export.torch_outputs(q, x)}
            fns.update({k: (lambda s=s: export.run_session(s, x)) for k, s in sessions.items()})
            timings = _interleaved(fns, repeats)
            for v in timings.values():
                v.pop("rounds_s_cpu", None)
            by_threads[str(t)] = {
                "best_ms": {k: v["best_s"] * 1e3 for k, v in timings.items()},
                "speed_over_ort_fp32_best": {k: timings["ort_fp32"]["best_s"] / v["best_s"] for k, v in timings.items()},
                "speed_over_ort_fp32_paired_median": {k: 1 / _paired_median(timings, k, "ort_fp32") for k in timings}}
        out["threads"] = by_threads
    vnni = any(f in out["cpu"]["isa"] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    best = max(min(r["speed_over_ort_fp32_best"]["ort_int8_ort_placement"],
                   r["speed_over_ort_fp32_paired_median"]["ort_int8_ort_placement"]) for r in by_threads.values())
    goal = GOALS["int8_over_fp32_speed_vnni_min" if vnni else "int8_over_fp32_speed_avx2_min"]
    out["verdict"] = {"vnni": vnni, "int8_speedup_measured": best, "speed_goal": goal, "speed_goal_met": best >= goal,
                      "size_goal_met": max(out["size_ratio_vs_fp32"].values()) >= GOALS["size_ratio_min"]}
    out["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count(),
                                "contended": max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: results/benchmarks/onnx.json")
    args = parser.parse_args(argv)
    result = measure(args.repeats, tuple(args.threads), args.seed)
    path = atomic_write_json(args.out or results_dir() / "benchmarks" / "onnx.json", result, digits=4)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
