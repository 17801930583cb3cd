"""Cross-check of the bundle's calibration against NVIDIA's toolkit, `nvidia-modelopt` (issue 19).

The core paper calibrates with TensorRT's pytorch-quantization (histogram calibrator, percentile
99.99, section 4.2.2); `nvidia-modelopt` is that library's successor and runs on the CPU. This
module quantizes a detector with modelopt's own modules and calibrators and reads back what they
chose, so that `helpers.quant` can be compared with the toolkit layer by layer and in mAP
(`python -m tools.modelopt_crosscheck`).

modelopt is an optional dependency (`pip install -e '.[crosscheck]'`; `modelopt.torch.quantization`
imports huggingface_hub without declaring it, hence the extra package); everything that needs it
imports it lazily through `require_modelopt`, and the comparison logic (`compare_ranges`,
`modelopt_config`, the tables over the stored result) is plain Python.

The recipe is pytorch-quantization's, in modelopt's API: `mtq.quantize` with an INT8 config whose
weight quantizers are per output channel (axis 0, max calibrator) and whose input quantizers are per
tensor with `calibrator: "histogram"` (2048 bins), and `algorithm: None`; then one calibration pass
with every quantizer collecting and not quantizing (weights stay float, as in the toolkit), after
which each input quantizer loads `compute_amax("percentile", percentile=99.99)` and each weight
quantizer its max (modelopt's own `max` algorithm cannot do this: it calls `compute_amax()` without
a method, which the histogram calibrator rejects).

Variants (`VARIANTS`):
- "toolkit": the layout of modelopt's `INT8_DEFAULT_CFG` (what a toolkit user gets): full signed
  range [-128, 127] (`narrow_range=False`, the default), signed inputs, and every module modelopt
  registers gets an input quantizer, so ResNet's stem `nn.MaxPool2d` is quantized too;
- "toolkit_narrow": the same with the narrow range [-127, 127] (ours), to separate the two;
- "matched": our grid and layer set: narrow range [-127, 127] and pooling left in float, so that
  only the calibrators' arithmetic and the float-weight calibration pass remain as differences.
Calibration runs in float in every variant, so the three give the same amax on the shared layers;
they differ only in how the calibrated model quantizes.
"""
from __future__ import annotations

import copy
import statistics
from contextlib import nullcontext

import torch

from helpers import quant

INSTALL_HINT = ("pip install -e '.[crosscheck]'  (nvidia-modelopt==0.47.0 with requests and huggingface_hub; "
                "it runs on the CPU)")
INPUT_SUFFIX = ".input_quantizer"
VARIANTS = {
    "toolkit": {"narrow_range": False, "quantize_pooling": True},
    "toolkit_narrow": {"narrow_range": True, "quantize_pooling": True},
    "matched": {"narrow_range": True, "quantize_pooling": False},
}
_POOLING = ("nn.MaxPool1d", "nn.MaxPool2d", "nn.MaxPool3d", "nn.AvgPool1d", "nn.AvgPool2d", "nn.AvgPool3d",
            "nn.AdaptiveAvgPool1d", "nn.AdaptiveAvgPool2d", "nn.AdaptiveAvgPool3d")
_NORMS = ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")  # INT8_DEFAULT_CFG leaves them in float


def require_modelopt():
    """`modelopt.torch.quantization`, or an ImportError that says how to install it."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as error:
        raise ImportError(f"the modelopt cross-check needs nvidia-modelopt: {INSTALL_HINT}") from error
    return mtq


def versions() -> dict:
    import modelopt
    return {"modelopt": modelopt.__version__, "torch": torch.__version__}


def modelopt_config(narrow_range: bool = False, quantize_pooling: bool = True, w_bits: int = 8,
                    a_bits: int = 8) -> dict:
    """An `mtq.quantize` config: per-channel max weights, per-tensor histogram inputs (modelopt's
    `"histogram"` calibrator: 2048 bins, as `quant.InputQuantizer`), no algorithm (calibration runs in
    `calibrate_percentile`). The list format of modelopt 0.47's `INT8_DEFAULT_CFG`."""
    quant.check_bits(w_bits, "w_bits")
    quant.check_bits(a_bits, "a_bits")
    weights = {"num_bits": w_bits, "axis": 0, "narrow_range": narrow_range}
    inputs = {"num_bits": a_bits, "axis": None, "narrow_range": narrow_range,
              "calibrator": "histogram"}
    cfg = [{"quantizer_name": "*", "enable": False},
           {"quantizer_name": "*weight_quantizer", "cfg": weights},
           {"quantizer_name": "*input_quantizer", "cfg": inputs}]
    float_parents = _NORMS + (() if quantize_pooling else _POOLING)
    cfg += [{"quantizer_name": "*", "parent_class": parent, "enable": False} for parent in float_parents]
    return {"quant_cfg": cfg, "algorithm": None}


def _quantizers(model: torch.nn.Module):
    from modelopt.torch.quantization.nn import TensorQuantizer
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


@torch.no_grad()
def calibrate_percentile(model: torch.nn.Module, batch, normalized: bool, percentile: float = 99.99) -> int:
    """One calibration pass over `batch` (images as `quant.calibrate` takes them), then every enabled
    input quantizer loads its histogram's percentile and every weight quantizer its max.
    Returns how many quantizers were calibrated."""
    quant.check_calibrator("percentile", True, percentile)
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    enabled = {name: q for name, q in _quantizers(model).items() if not q._disabled}
    if not enabled:
        raise ValueError("the model has no enabled modelopt quantizers: build it with modelopt_quantized")
    model.eval()
    enable_stats_collection(model)
    with quant.skip_normalization(model) if normalized else nullcontext():
        quant._features_forward(model, quant._images(batch))
    for name, quantizer in enabled.items():
        if isinstance(quantizer._calibrator, HistogramCalibrator):
            quantizer.load_calib_amax("percentile", percentile=percentile)
        else:
            quantizer.load_calib_amax()
        quantizer.enable_quant()
        quantizer.disable_calib()
    return len(enabled)


def modelopt_quantized(model: torch.nn.Module, batch, normalized: bool, percentile: float = 99.99,
                       variant: str = "toolkit", w_bits: int = 8, a_bits: int = 8) -> torch.nn.Module:
    """A copy of `model` quantized by modelopt (see `VARIANTS`) and calibrated on one batch."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    mtq = require_modelopt()
    config = modelopt_config(w_bits=w_bits, a_bits=a_bits, **VARIANTS[variant])
    q = mtq.quantize(copy.deepcopy(model).eval(), config)
    calibrate_percentile(q, batch, normalized, percentile)
    return q.eval()


def modelopt_ranges(model: torch.nn.Module) -> dict[str, float]:
    """amax of every enabled input quantizer, keyed by its layer's name (as `quant.input_quantizers`)."""
    return {name[: -len(INPUT_SUFFIX)]: float(q.amax) for name, q in _quantizers(model).items()
            if name.endswith(INPUT_SUFFIX) and not q._disabled}


def weight_amax(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per-channel weight amax of every enabled weight quantizer (read it before `fold_for_eval`)."""
    suffix = ".weight_quantizer"
    return {name[: -len(suffix)]: q.amax.detach().flatten().float() for name, q in _quantizers(model).items()
            if name.endswith(suffix) and not q._disabled}


def fold_for_eval(model: torch.nn.Module) -> torch.nn.Module:
    """modelopt's own `mtq.fold_weight`: each fake-quantized weight is stored once and its quantizer
    disabled (the same numbers; evaluation about 3x faster on the CPU, the weights are otherwise
    fake-quantized again in every forward)."""
    require_modelopt().fold_weight(model)
    return model


def weight_agreement(model: torch.nn.Module, float_model: torch.nn.Module) -> dict:
    """modelopt's per-channel weight amax against the channel's max|w| (what `quant.weight_range`
    uses for symmetric "max" weights): the largest relative difference and how many layers."""
    worst = 0.0
    amax = weight_amax(model)
    for name, value in amax.items():
        w = float_model.get_submodule(name).weight.detach()
        ours = w.reshape(w.shape[0], -1).abs().amax(1).float()
        worst = max(worst, float(((value - ours).abs() / ours.clamp(min=1e-12)).max()))
    return {"layers": len(amax), "max_rel_diff": worst}


def quantized_layer_types(model: torch.nn.Module) -> dict[str, str]:
    """Layer name -> module class of every layer whose input modelopt quantizes."""
    return {layer: type(model.get_submodule(layer)).__name__ for layer in modelopt_ranges(model)}


def float_weight_calibrated(model: torch.nn.Module, batch, normalized: bool, percentile: float = 99.99,
                            setting: str = "W8A8") -> torch.nn.Module:
    """Our quantizer, but its calibration pass runs with float weights (the toolkit's way) instead of
    `quant.calibrate`'s quantized weights; evaluation then uses the quantized weights as usual.
    Isolates that one difference from the histogram's."""
    from helpers import zsq
    q = zsq.quantized_copy(model, setting, "percentile", percentile)
    layers = quant.quant_layers(q)
    quantized = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.copy_(model.get_submodule(name).weight)
        quant.calibrate(q, [batch], normalized=normalized, progress=False)
        for name, layer in layers.items():
            layer.weight.copy_(quantized[name])
    return q


def float_weight_ranges(model: torch.nn.Module, batch, normalized: bool, percentile: float = 99.99) -> dict[str, float]:
    """amax of every layer input from `float_weight_calibrated`."""
    q = float_weight_calibrated(model, batch, normalized, percentile)
    return {name: float(qz.hi) for name, qz in quant.input_quantizers(q).items()}


def histogram_facts(calibrated: torch.nn.Module) -> dict[str, dict]:
    """Per layer input of a model calibrated by `quant.calibrate` (histograms kept): whether the input
    never went negative (after a ReLU: both toolkits still use a signed grid, so half of it is unused),
    and the histogram's resolution relative to the amax, (max|x| / bins) / amax. With one batch both
    histograms span [0, max|x|] in 2048 bins; modelopt takes the lower edge of the bin where the CDF
    crosses the percentile and we interpolate inside it, so theirs can be lower by up to that fraction."""
    facts = {}
    for name, qz in quant.input_quantizers(calibrated).items():
        if qz.hist is None:
            raise RuntimeError(f"{name} has no calibration histogram: run quant.calibrate first")
        facts[name] = {"nonnegative": qz.hist.min >= 0.0,
                       "bin_width": qz.hist.absmax / qz.hist.num_bins / max(float(qz.hi), 1e-12)}
    return facts


def compare_ranges(ours: dict[str, float], theirs: dict[str, float]) -> dict:
    """Layer-by-layer ratio theirs / ours over the layers both quantize, its median and range, the
    layer furthest from 1, and the layers only one side quantizes."""
    shared = [name for name in ours if name in theirs]
    if not shared:
        raise ValueError("the two range maps share no layer: are both keyed by layer name "
                         "(quant.input_quantizers / modelopt_ranges)?")
    for name in shared:
        if not ours[name] > 0:
            raise ValueError(f"our amax of {name} is {ours[name]!r}; ratios need positive ranges")
    ratio = {name: theirs[name] / ours[name] for name in shared}
    worst = max(shared, key=lambda name: abs(ratio[name] - 1.0))
    values = list(ratio.values())
    return {"layers": len(shared), "ratio": ratio, "median": statistics.median(values), "min": min(values),
            "max": max(values), "worst_layer": worst, "worst_ratio": ratio[worst],
            "only_ours": sorted(set(ours) - set(theirs)), "only_theirs": sorted(set(theirs) - set(ours))}


def summary(comparison: dict) -> dict:
    """`compare_ranges` without the per-layer map (for tables)."""
    return {k: v for k, v in comparison.items() if k != "ratio"}


def stored_row(source: str, seed: int = 0, data_root: str = "data/tiny", setting: str = "W8A8", batch: int = 0,
               stage: str = "finetune", percentile: float = 99.99) -> dict | None:
    """Notebook 04's stored row for (source, setting, batch 0) of its default symmetric percentile run
    (distilled: mean-only loss, clamped, final iteration), or None when no single such run exists.
    The cross-check recomputes our mAP and compares it with this, to show the batches are the same."""
    from helpers import runs
    match = {"STAGE": stage, "SOURCE": source, "SEED": seed, "DATA_ROOT": data_root, "CALIBRATOR": "percentile",
             "PERCENTILE": percentile}
    if source == "distilled":
        match.update(DISTILL_LOSS="mean", DISTILL_CLAMP=True)
    found = [r for r in runs.list_runs("04_quantize_evaluate", **match)
             if r.params.get("SYMMETRIC", True) is True and setting in r.params.get("SETTINGS", [])]
    if len(found) != 1:
        return None
    rows = [r for r in runs.read_jsonl(found[0].path("rows.jsonl"))
            if r.get("setting") == setting and r.get("batch") == batch and r.get("scheme", "symmetric") == "symmetric"]
    if not rows:
        return None
    final = max((r["iteration"] for r in rows if r["iteration"] is not None), default=None)
    row = next(r for r in rows if r["iteration"] == final)
    by_batch = {r["batch"]: r["AP"] for r in runs.read_jsonl(found[0].path("rows.jsonl"))  # a repeated row counts once
                if r.get("setting") == setting and r.get("iteration") == final and r.get("scheme", "symmetric") == "symmetric"}
    spread = list(by_batch.values())
    return {"run": found[0].id, "AP": row["AP"], "AP50": row["AP50"], "first_layer_amax": row["first_layer_amax"],
            "batches": len(spread), "batch_std": statistics.stdev(spread) if len(spread) > 1 else 0.0}


# --------------------------------------------------------------------------- tables (stored result only)
RESULT_NAME = "crosscheck/modelopt.json"  # under runs.results_dir()
_AP_COLUMNS = {"ours": "ours", "ours_float_weights": "ours, float-weight calibration",
               "matched": "modelopt matched", "toolkit_narrow": "modelopt toolkit, narrow range",
               "toolkit": "modelopt toolkit"}
_RANGE_ROWS = {"toolkit_vs_ours": "modelopt toolkit / ours", "float_weights_vs_ours": "float-weight calibration / ours",
               "matched_vs_float_weights": "modelopt percentile rule / ours (both float weights)"}


def load_result(path: str | None = None) -> dict:
    """The stored cross-check (`python -m tools.modelopt_crosscheck` writes it); needs no modelopt."""
    import json
    from helpers import runs
    file = runs.resolve_path(path) if path else runs.results_dir() / RESULT_NAME
    if not path and not file.exists():  # a redirected results tree (smoke runs) reads the committed cross-check
        file = runs.ROOT / "results" / RESULT_NAME
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: run `python -m tools.modelopt_crosscheck` (needs {INSTALL_HINT})")
    return json.loads(file.read_text())


def _by_source(result: dict) -> list[tuple[str, dict]]:
    """Sources in notebook 04's order (the JSON stores keys sorted)."""
    order = ("real", "distilled", "gaussian")
    return sorted(result["sources"].items(), key=lambda item: (order.index(item[0]) if item[0] in order else 9, item[0]))


def ap_table(result: dict):
    """W8A8 mAP in points per calibration source and quantizer, the toolkit's gap to ours, and notebook
    04's spread over its batches (the scale a gap must exceed to mean anything)."""
    import pandas as pd
    rows = []
    for source, r in _by_source(result):
        values = {"ours": r["ours"], "ours_float_weights": r.get("ours_float_weights"), **r["modelopt"]}
        row = {"source": source, **{label: 100 * values[k]["AP"] for k, label in _AP_COLUMNS.items() if values.get(k)}}
        row["toolkit - ours"] = 100 * r["AP_gap_toolkit_minus_ours"]
        stored = r.get("stored_notebook04")
        row["notebook 04 batch std"] = 100 * stored["batch_std"] if stored else float("nan")
        # recomputed on the same batch: equal up to the float reduction order (threads, kernels)
        row["same as notebook 04"] = bool(stored) and abs(stored["AP"] - r["ours"]["AP"]) < 1e-4
        rows.append(row)
    return pd.DataFrame(rows)


def range_table(result: dict):
    """Per-layer amax ratios per source as deviations from 1 in percent (median, min and max over the
    shared layers) and the layer furthest from 1."""
    import pandas as pd
    rows = [{"source": source, "ratio": label, "layers": c["layers"], "median %": 100 * (c["median"] - 1),
             "min %": 100 * (c["min"] - 1), "max %": 100 * (c["max"] - 1), "worst layer": c["worst_layer"]}
            for source, r in _by_source(result) for key, label in _RANGE_ROWS.items()
            for c in [r["ratios"][key]]]
    return pd.DataFrame(rows)


def source_table(result: dict):
    """Each source's amax / real images' amax per layer, as our quantizer and as modelopt calibrate."""
    import pandas as pd
    return pd.DataFrame([{"source": source, "calibrated by": tool, "median": c["median"], "min": c["min"],
                          "max": c["max"], "worst layer": c["worst_layer"]}
                         for tool, by_source in result["source_vs_real"].items() for source, c in by_source.items()])
