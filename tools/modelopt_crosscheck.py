"""Our calibration against NVIDIA's toolkit (nvidia-modelopt), on the fine-tuned tiny detector (issue 19).

For each calibration source of notebook 04 (batch 0 of real, distilled mean-only and Gaussian images,
8 each: `zsq.first_batches`), the same detector is quantized to W8A8 by modelopt (histogram calibrator,
percentile 99.99, per-channel max weights: `helpers.modelopt_check`, variants "toolkit",
"toolkit_narrow" and "matched") and by `helpers.quant` (as usual, and with float weights in the
calibration pass), and compared:

- per-layer amax, modelopt / ours: median, range and the layer furthest from 1; split into its two
  causes: the calibration pass with float weights (the toolkit's) instead of 8-bit weights (ours),
  and the histogram's percentile rule (lower bin edge vs interpolation inside the bin);
- COCO mAP of each quantized detector on notebook 04's validation images (the first 100): the chain
  ours -> float-weight calibration -> modelopt's percentile rule ("matched") -> the stem max-pool
  quantized ("toolkit_narrow") -> the full range [-128, 127] ("toolkit") attributes the gap;
- how far each source's ranges lie from the real images' ranges, by either toolkit.

    python -m tools.modelopt_crosscheck          # -> results/crosscheck/modelopt.json

Needs the optional dependency (pip install -e '.[crosscheck]'). About 1.5 minutes on 2 busy cores, one torch thread (`--threads`).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm.auto import tqdm

from helpers import config, data, evaluate, modelopt_check, quant, runs, upstream, zsq

SOURCES = ("real", "distilled", "gaussian")
SETTING = "W8A8"  # the paper's
RESULT = ("crosscheck", "modelopt.json")  # under runs.results_dir()


def source_ratios(ranges: dict[str, dict[str, float]], reference: str = "real") -> dict:
    """For each non-reference source: its amax / the reference's, per shared layer, summarised."""
    return {source: modelopt_check.summary(modelopt_check.compare_ranges(ranges[reference], r))
            for source, r in ranges.items() if source != reference}


def check_source(model, images, normalized: bool, val_set, percentile: float, all_maps: bool) -> dict:
    """Everything measured on one calibration batch (see the module docstring)."""
    setting = quant.QuantSetting.parse(SETTING, "percentile", percentile)
    ours_q = setting.quantize(model)
    ours_metrics = zsq.quantized_map(model, images, normalized, val_set, setting, quantized=ours_q)
    ours = {name: float(qz.hi) for name, qz in quant.input_quantizers(ours_q).items()}
    facts = modelopt_check.histogram_facts(ours_q)
    float_q = modelopt_check.float_weight_calibrated(model, images, normalized, percentile, SETTING)
    float_weights = {name: float(qz.hi) for name, qz in quant.input_quantizers(float_q).items()}
    float_metrics = evaluate.evaluate_detector(float_q, val_set, progress=False)
    out = {"ours": {"AP": ours_metrics["AP"], "AP50": ours_metrics["AP50"]},
           "ours_float_weights": {"AP": float_metrics["AP"], "AP50": float_metrics["AP50"]}, "modelopt": {}}
    amax = {"ours": ours, "ours_float_weights": float_weights}
    for variant in modelopt_check.VARIANTS:
        q = modelopt_check.modelopt_quantized(model, images, normalized, percentile, variant)
        amax[variant] = modelopt_check.modelopt_ranges(q)
        if variant == "toolkit":
            out["weights"] = modelopt_check.weight_agreement(q, model)
            out["toolkit_layer_types"] = sorted(set(modelopt_check.quantized_layer_types(q).values()))
        if variant == "toolkit" or all_maps:
            metrics = evaluate.evaluate_detector(modelopt_check.fold_for_eval(q), val_set, progress=False)
            out["modelopt"][variant] = {"AP": metrics["AP"], "AP50": metrics["AP50"]}
    compare = modelopt_check.compare_ranges
    comparisons = {"toolkit_vs_ours": compare(ours, amax["toolkit"]),
                   "matched_vs_ours": compare(ours, amax["matched"]),
                   "float_weights_vs_ours": compare(ours, float_weights),  # cause 1: weights during calibration
                   "matched_vs_float_weights": compare(float_weights, amax["matched"])}  # cause 2: percentile rule
    out["ratios"] = {k: modelopt_check.summary(v) for k, v in comparisons.items()}
    layers = list(amax["toolkit"]) + [name for name in ours if name not in amax["toolkit"]]
    out["layers"] = {name: {**{k: v.get(name) for k, v in amax.items()}, **facts.get(name, {})} for name in layers}
    out["max_bin_width"] = max(f["bin_width"] for f in facts.values())
    out["nonnegative_inputs"] = sum(f["nonnegative"] for f in facts.values())
    out["AP_gap_toolkit_minus_ours"] = out["modelopt"]["toolkit"]["AP"] - out["ours"]["AP"]
    return out, amax


def crosscheck(seed: int = 0, data_root: str = "data/tiny", val_limit: int = 100, percentile: float = 99.99,
               all_maps: bool = True, threads: int = 1, progress: bool | None = None) -> dict:
    modelopt_check.require_modelopt()  # before any work: the clear install hint
    start = time.time()
    torch.set_num_threads(threads)
    config.seed_everything(seed)
    detector = upstream.detector_run("finetune", PROFILE="tiny", SEED=seed, DATA_ROOT=data_root)
    val_raw = upstream.validation_set(detector, val_limit)
    model = upstream.load_detector(detector, val_raw.num_classes)
    batches = zsq.first_batches(detector, model, seed, sources=SOURCES, LOSS="mean", CLAMP=True)
    val_set = data.Preloaded(val_raw)
    fp32 = evaluate.evaluate_detector(model, val_set, progress=False)
    results, ranges = {}, {"ours": {}, "toolkit": {}}
    bar = {} if progress is None else {"disable": not progress}
    for source in tqdm(SOURCES, desc="modelopt cross-check", **bar):
        images, normalized = batches[source]
        results[source], amax = check_source(model, images, normalized, val_set, percentile, all_maps)
        results[source]["stored_notebook04"] = modelopt_check.stored_row(source, seed, data_root, SETTING,
                                                                         percentile=percentile)
        ranges["ours"][source], ranges["toolkit"][source] = amax["ours"], amax["toolkit"]
    toolkit_gaps = [abs(r["AP_gap_toolkit_minus_ours"]) for r in results.values()]
    return {
        "what": "W8A8 calibration of the fine-tuned tiny detector by helpers.quant vs nvidia-modelopt "
                "(histogram calibrator, percentile, per-channel max weights) on notebook 04's batch 0 per source",
        "versions": modelopt_check.versions(), "cpu": runs.cpu_info(),
        "setup": {"detector_run": detector.id, "seed": seed, "data_root": data_root, "setting": SETTING,
                  "percentile": percentile, "batch_size": 8, "histogram_bins": 2048, "val_images": len(val_set),
                  "variants": modelopt_check.VARIANTS, "all_variant_maps": all_maps,
                  "torch_threads": threads},
        "fp32": {"AP": fp32["AP"], "AP50": fp32["AP50"]},
        "sources": results,
        "source_vs_real": {tool: source_ratios(r) for tool, r in ranges.items()},
        "max_abs_AP_gap_toolkit_vs_ours": max(toolkit_gaps),
        "runtime_s": time.time() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="detector seed (selects the 02/03 runs) and Gaussian seed")
    parser.add_argument("--data-root", default="data/tiny")
    parser.add_argument("--val-limit", type=int, default=100, help="first N val images (notebook 04: 100), 0 for all")
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--toolkit-map-only", action="store_true",
                        help="evaluate only the 'toolkit' variant, not 'matched' and 'toolkit_narrow' (~2.5 min less)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 (default) ran 8x faster than 2 on 2 cores shared with other jobs "
                             "(66 s vs 572 s; AP equal to 1e-4, the float reduction order)")
    parser.add_argument("--out", default=None, help="default: results/crosscheck/modelopt.json")
    args = parser.parse_args(argv)
    if args.val_limit < 0:
        parser.error("--val-limit must be >= 0")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    quant.QuantSetting.parse(SETTING, "percentile", args.percentile)  # a bad percentile fails before any work
    result = crosscheck(args.seed, args.data_root, args.val_limit, args.percentile, not args.toolkit_map_only,
                        args.threads)
    out = args.out or str(runs.results_dir().joinpath(*RESULT))
    runs.atomic_write_json(out, result, digits=6)
    for source, r in result["sources"].items():
        t = r["ratios"]["toolkit_vs_ours"]
        print(f"{source:>9}: amax modelopt/ours median {t['median']:.4f} [{t['min']:.4f}, {t['max']:.4f}] | "
              f"W8A8 AP ours {r['ours']['AP']:.4f} modelopt {r['modelopt']['toolkit']['AP']:.4f}")
    print(f"wrote {out} ({result['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
