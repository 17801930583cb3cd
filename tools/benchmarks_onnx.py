"""Speed and size of the exported detector, side by side in one run: `python -m tools.benchmarks_onnx`.

backbone + FPN + head (the exported network) and the backbone alone (ResNet body + FPN), batch 1, 128x160
normalised input, of the tiny fine-tuned detector (random weights with randomised norm statistics when no run exists): PyTorch FP32, PyTorch
fake-quant W8A8, onnxruntime FP32, onnxruntime int8 faithful QDQ, onnxruntime int8 with its own placement
and our scales, onnxruntime quantize_static; at 1 and 2 threads; rounds interleaved in alternating order
(tools.benchmarks_zsq._interleaved), best-of and paired-median ratios over ORT FP32; ONNX file sizes;
the CPU's ISA flags and the load average (other processes share this CPU: ratios, not absolute times).
Also the file sizes of the paper's RetinaNet R50-FPN v2 at 512x640 (sizes depend on the architecture, not
on the weights). A speedup counts only as measured here, on this CPU. Writes `results/benchmarks/onnx.json`.
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


def _files(model, q, calib, tmp: str, part: str, example=None) -> dict:
    """The four ONNX files of one part of the detector: FP32, faithful QDQ, ORT placement with our scales, ORT's own."""
    files = {"ort_fp32": export.export_float(model, f"{tmp}/{part}_fp32.onnx", example, part),
             "ort_int8_qdq": export.export_qdq(q, f"{tmp}/{part}_qdq.onnx", example, part)}
    export.export_float(q, f"{tmp}/{part}_fq.onnx", example, part)
    files["ort_int8_ort_placement"] = export.quantize_ort(f"{tmp}/{part}_fq.onnx", f"{tmp}/{part}_pin.onnx", calib, q,
                                                          pin_scales=True)
    files["ort_int8_quantize_static"] = export.quantize_ort(f"{tmp}/{part}_fp32.onnx", f"{tmp}/{part}_st.onnx", calib)
    return files


def _sizes(files: dict) -> dict:
    return {"bytes": {k: v["bytes"] for k, v in files.items()},
            "size_ratio_vs_fp32": {k: files["ort_fp32"]["bytes"] / v["bytes"] for k, v in files.items()}}


def paper_size(seed: int = 0) -> dict:
    """File sizes of the paper's detector (RetinaNet R50-FPN v2, 3 classes + background, 512x640): the sizes
    depend on the architecture only, so random weights calibrated on two random images measure them."""
    torch.manual_seed(seed)
    model = models.build_detector("retinanet_resnet50_fpn_v2", 4, 512, 640).eval()
    q = quant.quantize_model(model, 8, 8, "percentile", 99.99)
    example = torch.randn(1, 3, 512, 640, generator=torch.Generator().manual_seed(seed))
    quant.calibrate(q, [torch.randn(2, 3, 512, 640, generator=torch.Generator().manual_seed(seed + 1))],
                    normalized=True, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"ort_fp32": export.export_float(model, f"{tmp}/fp32.onnx", example),
                 "ort_int8_qdq": export.export_qdq(q, f"{tmp}/qdq.onnx", example)}
        return {"arch": "retinanet_resnet50_fpn_v2", "input": [1, 3, 512, 640],
                "parameters": sum(p.numel() for p in model.parameters()), **_sizes(files)}


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
            by_threads = {}
            for t in threads:
                torch.set_num_threads(t)
                sessions = {k: export.session(v["path"], t) for k, v in files.items()}
                fns = {"torch_fp32": lambda: export.torch_graph_outputs(model, x, part),
                       "torch_fakequant": lambda: export.torch_graph_outputs(q, x, part)}
                fns.update({k: (lambda s=s: s.run(None, {export.INPUT_NAME: x.numpy()})) for k, s in sessions.items()})
                timings = _interleaved(fns, repeats)
                for v in timings.values():
                    v.pop("rounds_s_cpu", None)
                by_threads[str(t)] = {
                    "best_ms": {k: v["best_s"] * 1e3 for k, v in timings.items()},
                    "speed_over_ort_fp32_best": {k: timings["ort_fp32"]["best_s"] / v["best_s"] for k, v in timings.items()},
                    "speed_over_ort_fp32_paired_median": {k: 1 / _paired_median(timings, k, "ort_fp32") for k in timings}}
            out[part] = {**result, "threads": by_threads}
    if paper:
        out["paper_size"] = paper_size(seed)
    vnni = any(f in out["cpu"]["isa"] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    goal = GOALS["int8_over_fp32_speed_vnni_min" if vnni else "int8_over_fp32_speed_avx2_min"]

    def speedup(part: str) -> float:  # the better thread count, each counted at the weaker of best-of and paired median
        return max(min(r["speed_over_ort_fp32_best"]["ort_int8_ort_placement"],
                       r["speed_over_ort_fp32_paired_median"]["ort_int8_ort_placement"])
                   for r in out[part]["threads"].values())
    sizes = {"tiny network": max(out["network"]["size_ratio_vs_fp32"][k] for k in out["network"]["bytes"] if k != "ort_fp32")}
    if paper:
        sizes["paper network"] = out["paper_size"]["size_ratio_vs_fp32"]["ort_int8_qdq"]
    out["verdict"] = {"vnni": vnni, "speed_goal": goal,
                      "int8_speedup_measured": {part: speedup(part) for part in export.PARTS},
                      "speed_goal_met": {part: speedup(part) >= goal for part in export.PARTS},
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
    parser.add_argument("--no-paper-size", action="store_true", help="skip the paper-size file sizes (about a minute)")
    args = parser.parse_args(argv)
    result = measure(args.repeats, tuple(args.threads), args.seed, paper=not args.no_paper_size)
    path = atomic_write_json(args.out or results_dir() / "benchmarks" / "onnx.json", result, digits=4)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
