"""Speed and size of the exported detector, side by side in one run: `python -m tools.benchmarks_onnx`.

backbone + FPN + head (the exported network) and the backbone alone (ResNet body + FPN), batch 1, 128x160
normalised input, of the tiny fine-tuned detector (random weights with randomised norm statistics when no run exists): PyTorch FP32, PyTorch
fake-quant W8A8, onnxruntime FP32, onnxruntime int8 faithful QDQ, onnxruntime int8 with its own placement
and our scales, onnxruntime quantize_static; at 1 and 2 threads; rounds interleaved in alternating order
(tools.benchmarks_zsq._interleaved), best-of and paired-median ratios over ORT FP32; ONNX file sizes;
the CPU's ISA flags and the load average (other processes share this CPU: ratios, not absolute times).
Also the paper's RetinaNet R50-FPN v2 at FLIR's 512x640 (`paper_detector`): file sizes, all convs int8 or not, and
ORT FP32 against ORT int8 (sizes and kernel speed depend on the architecture, not on the weights' values). A
speedup counts only as measured here, on this CPU. Writes `results/benchmarks/onnx.json`.
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
        torch.manual_seed(seed)
        model = models.build_detector(models.TINY_ARCH, 4, 128, 160).eval()
        return models.randomise_norm_layers(model), "random (norm statistics randomised)"


BENCHMARK_NAMES = {"fp32": "ort_fp32", "qdq": "ort_int8_qdq", "qdq_ort": "ort_int8_ort_placement",
                   "ort_static": "ort_int8_quantize_static"}  # export.export_all's files, as onnx.json names them


def _files(model, q, calib, tmp: str, part: str, example=None, reference: bool = True) -> dict:
    """The ONNX files of one part of the detector (`export.export_all`) under the benchmark's names."""
    files = export.export_all(model, q, calib, f"{tmp}/{part}", part, example, reference=reference)
    return {BENCHMARK_NAMES[k]: v for k, v in files.items()}


def _sizes(files: dict) -> dict:
    return {"bytes": {k: v["bytes"] for k, v in files.items()},
            "size_ratio_vs_fp32": {k: files["ort_fp32"]["bytes"] / v["bytes"] for k, v in files.items()}}


PAPER_ARCH, PAPER_INPUT = "retinanet_resnet50_fpn_v2", (1, 3, 512, 640)


def paper_detector(seed: int = 0, repeats: int = 7, threads: tuple[int, ...] = (1, 2), timed: bool = True,
                   shape: tuple[int, int, int, int] = PAPER_INPUT) -> dict:
    """The paper's detector (RetinaNet R50-FPN v2, 3 classes + background) at FLIR's 512x640: file sizes and,
    when `timed`, ORT FP32 against ORT int8 (its placement, our scales) and PyTorch FP32, interleaved as for
    the tiny network. Sizes and kernel speed depend on the architecture, not on the weights' values, so
    random weights (norm layers randomised, `models.randomise_norm_layers`) calibrated on two random
    images stand in for the trained ones; no accuracy is read from them."""
    torch.manual_seed(seed)
    model = models.build_detector(PAPER_ARCH, 4, *shape[2:]).eval()
    models.randomise_norm_layers(model, torch.Generator().manual_seed(seed))
    q = quant.quantize_model(model, 8, 8, "percentile", 99.99)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    calib = [torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(seed + 1))]
    quant.calibrate(q, calib, normalized=True, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(model, q, calib, tmp, "network", example, reference=False)
        out = {"arch": PAPER_ARCH, "input": list(shape), "weights": "random, norm layers randomised",
               "parameters": sum(p.numel() for p in model.parameters()), **_sizes(files),
               "int8_convs": {k: export.int8_conv_count(v["path"]) for k, v in files.items() if k != "ort_fp32"}}
        if timed:
            timed_files = {k: files[k] for k in ("ort_fp32", "ort_int8_ort_placement")}
            out["threads"] = {str(t): _timings(timed_files, {"torch_fp32": lambda: export.torch_graph_outputs(
                model, example, "network")}, example, t, repeats) for t in threads}
    return out


def _timings(files: dict, torch_fns: dict, x: torch.Tensor, threads: int, repeats: int) -> dict:
    """Every file's onnxruntime session and the PyTorch callables at `threads`, rounds interleaved: best-of
    milliseconds, and best-of and paired-median speed over ORT FP32."""
    torch.set_num_threads(threads)
    sessions = {k: export.session(v["path"], threads) for k, v in files.items()}
    fns = dict(torch_fns)
    fns.update({k: (lambda s=s: s.run(None, {export.INPUT_NAME: x.numpy()})) for k, s in sessions.items()})
    timings = _interleaved(fns, repeats)
    for v in timings.values():
        v.pop("rounds_s_cpu", None)
    return {"best_ms": {k: v["best_s"] * 1e3 for k, v in timings.items()},
            "speed_over_ort_fp32_best": {k: timings["ort_fp32"]["best_s"] / v["best_s"] for k, v in timings.items()},
            "speed_over_ort_fp32_paired_median": {k: 1 / _paired_median(timings, k, "ort_fp32") for k in timings}}


def measure(repeats: int = 7, threads: tuple[int, ...] = (1, 2), seed: int = 0, paper: bool = True) -> dict:
    load_before = os.getloadavg()[0]
    model, weights = _detector(seed)
    x = export.example_input(model, 1, seed)
    q = quant.quantize_model(model, 8, 8, "percentile", 99.99)
    calib = [export.example_input(model, 8, seed + 1)]
    quant.calibrate(q, calib, normalized=True, progress=False)
    out = {"setup": {"graphs": {"network": "backbone+fpn+head", "backbone": "resnet body+fpn"}, "batch": 1,
                     "input": list(x.shape), "weights": weights, "repeats": repeats}, "cpu": cpu_info(), "goals": GOALS}
    with tempfile.TemporaryDirectory() as tmp:
        for part, wrap in export.PARTS.items():
            files = _files(model, q, calib, tmp, part)
            result = {**_sizes(files),
                      "int8_convs": {k: export.int8_conv_count(v["path"]) for k, v in files.items() if k != "ort_fp32"}}
            torch_fns = {"torch_fp32": lambda: export.torch_graph_outputs(model, x, part),
                         "torch_fakequant": lambda: export.torch_graph_outputs(q, x, part)}
            out[part] = {**result, "threads": {str(t): _timings(files, torch_fns, x, t, repeats) for t in threads}}
    if paper:
        out["paper"] = paper_detector(seed, repeats, threads)
    vnni = any(f in out["cpu"]["isa"] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    goal = GOALS["int8_over_fp32_speed_vnni_min" if vnni else "int8_over_fp32_speed_avx2_min"]

    def speedup(result: dict) -> float:  # the better thread count, each counted at the weaker of best-of and paired median
        return max(min(r["speed_over_ort_fp32_best"]["ort_int8_ort_placement"],
                       r["speed_over_ort_fp32_paired_median"]["ort_int8_ort_placement"])
                   for r in result["threads"].values())
    speeds = {f"tiny {part}": speedup(out[part]) for part in export.PARTS}
    sizes = {"tiny network": max(out["network"]["size_ratio_vs_fp32"][k] for k in out["network"]["bytes"] if k != "ort_fp32")}
    if paper:
        speeds["paper network"] = speedup(out["paper"])
        sizes["paper network"] = max(v for k, v in out["paper"]["size_ratio_vs_fp32"].items() if k != "ort_fp32")
    out["verdict"] = {"vnni": vnni, "speed_goal": goal,
                      "int8_speedup_measured": speeds,
                      "speed_goal_met": {k: v >= goal for k, v in speeds.items()},
                      "size_ratio": sizes, "size_goal_met": {k: v >= GOALS["size_ratio_min"] for k, v in sizes.items()}}
    out["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count(),
                                "contended": max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: results/benchmarks/onnx.json")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-size detector (sizes and speed, 2-3 minutes)")
    args = parser.parse_args(argv)
    result = measure(args.repeats, tuple(args.threads), args.seed, paper=not args.no_paper)
    path = atomic_write_json(args.out or results_dir() / "benchmarks" / "onnx.json", result, digits=4)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
