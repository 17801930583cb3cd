"""DF-MPC: data-free mixed-precision compensation (Chen et al., Pattern Recognition 2023).

Implements `shared/research/dfmpc.md`: in each `conv_low -> BN -> ReLU -> conv_high` link the low
conv is ternarized (TWN, layer-wise) or uniformly quantized, the high conv is quantized to
`high_bits` with the paper's Eq. 6, and a per-channel factor c >= 0 (closed form of spec 4.4, no
data, no gradients) rescales the high conv's input channels, either folded into the BN
(`gamma, beta *= c`, the paper's deployment form) or multiplied into the high conv's weight slice.

Pairing for torchvision ResNets (spec 3, Fig. 2): BasicBlock conv1 -> conv2, Bottleneck
conv2 -> conv3. Every other conv / linear (stem, downsample, bottleneck conv1, fc) is "other":
`high_bits` uniform without compensation, or FP32 with `quantize_other=False`.
Only weights are quantized (activations stay FP32), and weights are stored de-quantized (simulation).
The layer-wise quantizers (TWN, Eq. 6), the bit checks and the size count are `helpers.quant`'s.

Beyond the method: `scale_diagnostics` measures, data-free, how much of a low-bit layer's error a
per-channel scale can remove at all (the only thing c can change), and `data_fit_coefficients` fits
c on real activations (NOT data-free: a diagnostic upper bound for any per-channel c, used to tell
a failure of the data-free step from a failure of the compensation form). `Setting` and
`evaluate_settings` produce the paper's Table 1/2 rows, cached in a JSONL file so reruns resume.

Where we deviate from `shared/research/dfmpc.md` (each also said at the place in the code):
- degenerate channels are detected relative to the layer's largest denominator, not by an absolute
  1e-12 (layers with tiny weights would otherwise be declared degenerate);
- lambda1 and lambda2 must be >= 0 (the spec implies it: negative values can make the denominator
  vanish or the problem non-convex).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from helpers import quant, references, runs
from helpers.quant import LowBits, layerwise_quantize, uniform_quantize
MODES = ("dfmpc", "naive")
SETTING_MODES = ("fp32", "naive", "dfmpc", "data-fit")
APPLY = ("bn", "weight")


# --------------------------------------------------------------------------- closed form
def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, y) in float64: BN(x) = g x + y, g = gamma/sigma, y = beta - gamma mu / sigma, sigma = sqrt(var + eps)."""
    sigma = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    g = bn.weight.detach().double() / sigma
    return g, bn.bias.detach().double() - g * bn.running_mean.detach().double()


def _xy(w: torch.Tensor, w_hat: torch.Tensor, bn: nn.Module, bn_hat: nn.Module | None):
    if w.shape != w_hat.shape or w.shape[0] != bn.running_mean.numel():
        raise ValueError(f"shape mismatch: w {tuple(w.shape)}, w_hat {tuple(w_hat.shape)}, "
                         f"bn {bn.running_mean.numel()} channels")
    g, y = _bn_affine(bn)
    gh, yh = _bn_affine(bn_hat) if bn_hat is not None else (g, y)
    x = g[:, None] * w.detach().double().flatten(1)
    xh = gh[:, None] * w_hat.detach().double().flatten(1)
    return x, xh, y, yh


def compensation_coefficients(w: torch.Tensor, w_hat: torch.Tensor, bn: nn.Module, lambda1: float = 0.5,
                              lambda2: float = 0.0, bn_hat: nn.Module | None = None) -> torch.Tensor:
    """Per-channel closed form (spec 4.4), float64, shape (out_channels,):

        c_j = (<x_hat_j, x_j> + lambda1 y_hat_j y_j) / (|x_hat_j|^2 + lambda1 y_hat_j^2 + lambda2),

    clamped at 0; a degenerate channel (denominator 0) gets c_j = 1. `w` is the FP weight of the
    low conv, `w_hat` its de-quantized low-bit weight, `bn` the BN after it. `bn_hat` (default: `bn`,
    the spec's recommended choice, which absorbs the quantizer scale) gives the quantized branch's
    BN parameters when they differ.
    """
    x, xh, y, yh = _xy(w, w_hat, bn, bn_hat)
    num = (xh * x).sum(1) + lambda1 * yh * y
    den = (xh * xh).sum(1) + lambda1 * yh * yh + lambda2
    # Deviation from the spec's absolute 1e-12 threshold: relative to the largest denominator, so
    # that layers with tiny weights are not declared degenerate; an exact 0 is always degenerate.
    degenerate = den <= 1e-12 * float(den.abs().max().clamp_min(torch.finfo(torch.float64).tiny))
    c = torch.where(degenerate, torch.ones_like(num), num / torch.where(degenerate, torch.ones_like(den), den))
    return c.clamp_min(0.0)


def filter_space_loss(w: torch.Tensor, w_hat: torch.Tensor, bn: nn.Module, c: torch.Tensor | float,
                      lambda1: float = 0.5, lambda2: float = 0.0, bn_hat: nn.Module | None = None) -> float:
    """Data-free loss of spec Eq. 23: sum_j |c_j x_hat_j - x_j|^2 + lambda1 (c_j y_hat_j - y_j)^2 + lambda2 c_j^2.

    c = 1 gives the naive (uncompensated) loss.
    """
    x, xh, y, yh = _xy(w, w_hat, bn, bn_hat)
    c = torch.as_tensor(c, dtype=torch.float64).expand(x.shape[0])
    return float(((c[:, None] * xh - x) ** 2).sum() + lambda1 * ((c * yh - y) ** 2).sum() + lambda2 * (c ** 2).sum())


# --------------------------------------------------------------------------- pairing
class Pair(NamedTuple):
    """One compensated link `low -> bn -> ReLU -> high` inside a residual block called `block`."""
    block: str
    low: str
    bn: str
    high: str


def find_pairs(module: nn.Module) -> list[Pair]:
    """Pairs of a torchvision ResNet (classifier, or a detector body such as an IntermediateLayerGetter).

    BasicBlock: conv1 -> bn1 -> ReLU -> conv2; Bottleneck: conv2 -> bn2 -> ReLU -> conv3 (Fig. 2a/b).
    Names are relative to `module`, in module order.
    """
    pairs = []
    for name, m in module.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, Bottleneck):  # checked first: neither class derives from the other, but be explicit
            pairs.append(Pair(name, p + "conv2", p + "bn2", p + "conv3"))
        elif isinstance(m, BasicBlock):
            pairs.append(Pair(name, p + "conv1", p + "bn1", p + "conv2"))
    return pairs


# --------------------------------------------------------------------------- compensation
@torch.no_grad()
def compensate_pair(low: nn.Module, bn: nn.Module, high: nn.Module, low_bits: LowBits = "ternary",
                    high_bits: int = 6, lambda1: float = 0.5, lambda2: float = 0.0, mode: str = "dfmpc",
                    apply: str = "bn", c: torch.Tensor | None = None) -> dict:
    """Quantize one `low -> bn -> ReLU -> high` link IN PLACE and compensate it (mode="dfmpc").

    c is computed from the ORIGINAL low weight and BN (before anything is changed), unless given
    (`c`, e.g. from `data_fit_coefficients`; it must be >= 0). apply="bn" folds c into the BN
    (gamma, beta *= c; valid because ReLU(c z) = c ReLU(z) for c >= 0, so the activation must be
    ReLU); apply="weight" multiplies high.weight[:, j] (on its `high_bits` grid) by c_j.
    Returns c (float64), its mean / min / max / standard deviation, and the Eq. 23 loss at c = 1
    (naive) and at c (compensated).
    """
    w = low.weight.detach().clone()
    w_hat = layerwise_quantize(w, low_bits)
    if c is None:
        c = compensation_coefficients(w, w_hat, bn, lambda1, lambda2)
    else:
        c = torch.as_tensor(c, dtype=torch.float64).flatten()
        if c.numel() != w.shape[0] or bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
            raise ValueError(f"given c must hold {w.shape[0]} finite values >= 0")
    out = {"c": c, "mean_c": float(c.mean()), "min_c": float(c.min()), "max_c": float(c.max()),
           "sd_c": float(c.std(unbiased=False)),
           "loss_naive": filter_space_loss(w, w_hat, bn, 1.0, lambda1, lambda2),
           "loss_compensated": filter_space_loss(w, w_hat, bn, c, lambda1, lambda2)}
    low.weight.copy_(w_hat)
    high.weight.copy_(uniform_quantize(high.weight, high_bits))
    if mode == "dfmpc":
        if apply == "bn":
            bn.weight.mul_(c.to(bn.weight.dtype))
            bn.bias.mul_(c.to(bn.bias.dtype))
        else:
            shape = (1, -1) + (1,) * (high.weight.dim() - 2)
            high.weight.mul_(c.to(high.weight.dtype).view(shape))
    return out


def _check_args(low_bits, high_bits, mode, apply, lambda1: float = 0.0, lambda2: float = 0.0) -> None:
    quant.check_bits(low_bits, "low_bits", ternary=True)
    quant.check_bits(high_bits, "high_bits")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if apply not in APPLY:
        raise ValueError(f"apply must be one of {APPLY}, got {apply!r}")
    # Not in the spec, which only uses lambda >= 0: a negative lambda can zero the denominator.
    if not (float(lambda1) >= 0 and float(lambda2) >= 0):
        raise ValueError(f"lambda1 and lambda2 must be >= 0, got {lambda1!r}, {lambda2!r}")


@torch.no_grad()
def compensate(module: nn.Module, low_bits: LowBits = "ternary", high_bits: int = 6, lambda1: float = 0.5,
               lambda2: float = 0.0, mode: str = "dfmpc", apply: str = "bn", quantize_other: bool = True,
               coefficients: dict[str, torch.Tensor] | None = None) -> dict:
    """DF-MPC (mode="dfmpc") or naive mixed precision (mode="naive", c = 1) on a torchvision ResNet, IN PLACE.

    The module is modified: callers that need the FP model must pass `copy.deepcopy(model)`.
    Works on a ResNet classifier or a detector backbone body (no fc). Arguments are validated before
    anything is touched. low_bits: "ternary" (paper's 2-bit) or an int 2..8 (Eq. 6); high_bits: int 2..8.
    quantize_other: stem / downsample / bottleneck conv1 / fc to `high_bits` (default) or left FP32.
    coefficients: {low conv name: c} replaces the closed form (mode="dfmpc" only), e.g. the data-fit
    diagnostic of `data_fit_coefficients`; every pair must be present.

    Returns a dict: `pairs` (names, mean/min/max/sd c, Eq. 23 loss naive vs compensated), loss totals,
    `c` (mean / sd / min / max over every channel of every pair; computed but not applied when mode="naive"),
    `layers` (conv/linear name -> assigned bits, "ternary" or "fp32"), and `size`: weight storage in
    MiB at the assigned widths (params * bits / 8 / 2**20, ternary = 2 bits; conv/linear weights only)
    plus the remaining parameters (BN, biases) at 32 bits, against the all-FP32 size.
    """
    _check_args(low_bits, high_bits, mode, apply, lambda1, lambda2)
    modules = dict(module.named_modules())
    pairs = find_pairs(module)
    if not pairs:
        raise ValueError("no ResNet BasicBlock/Bottleneck found: find_pairs() returned nothing")
    if coefficients is not None:
        missing = [p.low for p in pairs if p.low not in coefficients]
        if mode != "dfmpc" or missing:
            raise ValueError(f"coefficients need mode='dfmpc' and one entry per pair; missing {missing[:3]}")
    layers: dict[str, LowBits] = {}
    reports, all_c = [], []
    for pair in pairs:
        low, bn, high = modules[pair.low], modules[pair.bn], modules[pair.high]
        if not (isinstance(low, nn.Conv2d) and isinstance(high, nn.Conv2d)):
            raise TypeError(f"{pair.block}: expected Conv2d layers")
        given = None if coefficients is None else coefficients[pair.low]
        r = compensate_pair(low, bn, high, low_bits, high_bits, lambda1, lambda2, mode, apply, given)
        all_c.append(r.pop("c"))
        reports.append({**pair._asdict(), **r})
        layers[pair.low], layers[pair.high] = low_bits, high_bits
    for name, m in modules.items():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in layers:
            if quantize_other:
                m.weight.copy_(uniform_quantize(m.weight, high_bits))
            layers[name] = high_bits if quantize_other else "fp32"

    weights_mib, total_mib = quant.model_size(module, layers, weights_only=True), quant.model_size(module, layers)
    size = {"weights_mib": weights_mib, "other_params_fp32_mib": total_mib - weights_mib,
            "fp32_mib": quant.model_size(module), "params": sum(p.numel() for p in module.parameters()),
            "quantized_weights": sum(modules[n].weight.numel() for n in layers), "total_mib": total_mib}
    size["ratio"] = size["fp32_mib"] / size["total_mib"]
    return {"mode": mode, "apply": apply, "low_bits": low_bits, "high_bits": high_bits, "lambda1": lambda1,
            "lambda2": lambda2, "quantize_other": quantize_other, "pairs": reports,
            "loss_naive": sum(r["loss_naive"] for r in reports),
            "loss_compensated": sum(r["loss_compensated"] for r in reports),
            "c": {"mean": float(torch.cat(all_c).mean()), "sd": float(torch.cat(all_c).std(unbiased=False)),
                  "min": float(torch.cat(all_c).min()), "max": float(torch.cat(all_c).max())},
            "layers": layers, "size": size}




# --------------------------------------------------------------------------- diagnostics
def scale_diagnostics(module: nn.Module, low_bits: LowBits = "ternary") -> dict:
    """How much of each low conv's quantization error a per-channel scale can remove at all (data-free).

    c can only rescale whole channels, so in the slope term of Eq. 23 (lambda1 = lambda2 = 0) the
    best it can do is project x_j on x_hat_j. Per pair and in total: `relative_error` =
    sum_j |x_hat_j - x_j|^2 / sum_j |x_j|^2 (naive), `removable` = the share of that error the
    optimal per-channel scale removes, `cosine` = mean cos(W_hat_j, W_j), `sd_c` = spread of that
    scale (the closed form at lambda = 0: for TWN, per-channel alpha_j / layer alpha). A removable
    share near 0 means the error is in the filters' directions, which no c can touch.
    """
    modules = dict(module.named_modules())
    pairs, totals = [], {"err": 0.0, "scaled": 0.0, "energy": 0.0}
    cosines, scales = [], []
    for pair in find_pairs(module):
        w, bn = modules[pair.low].weight.detach(), modules[pair.bn]
        w_hat = layerwise_quantize(w, low_bits)
        x, xh, _, _ = _xy(w, w_hat, bn, None)
        c0 = compensation_coefficients(w, w_hat, bn, 0.0, 0.0)
        err, scaled = float(((xh - x) ** 2).sum()), float(((c0[:, None] * xh - x) ** 2).sum())
        energy = float((x ** 2).sum())
        wf, whf = w.double().flatten(1), w_hat.double().flatten(1)
        cos = (wf * whf).sum(1) / (wf.norm(dim=1) * whf.norm(dim=1)).clamp_min(1e-300)
        pairs.append({"low": pair.low, "relative_error": err / energy, "removable": 1 - scaled / err if err else 0.0,
                      "cosine": float(cos.mean()), "sd_c": float(c0.std(unbiased=False))})
        totals["err"] += err
        totals["scaled"] += scaled
        totals["energy"] += energy
        cosines.append(cos)
        scales.append(c0)
    return {"low_bits": low_bits, "pairs": pairs, "relative_error": totals["err"] / totals["energy"],
            "removable": 1 - totals["scaled"] / totals["err"], "cosine": float(torch.cat(cosines).mean()),
            "sd_c": float(torch.cat(scales).std(unbiased=False))}


@torch.no_grad()
def data_fit_coefficients(module: nn.Module, low_bits: LowBits, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Per-channel c fitted on real activations: a diagnostic that USES DATA, so it is not DF-MPC.

    For every pair, while `run()` pushes calibration data through the FP32 model that contains
    `module` (eval mode), the low conv's own input X is captured and
    c_j = <A_hat_j, A_j> / |A_hat_j|^2 with A = ReLU(BN(W * X)) and A_hat = ReLU(BN(W_hat * X)),
    summed over samples and positions: the least-squares minimiser of the paper's Assumption 1
    objective sum |c_j A_hat_j - A_j|^2 (Eqs. 9-10) measured on data instead of its data-free
    bound (Lemma 2, Eq. 17). Any per-channel c, closed form included, can at best match it, so it
    separates "the data-free step loses the information" from "a per-channel c cannot help".
    Channels never activated get c = 1. Returns {low conv name: c (float64, >= 0)}.
    """
    if module.training:
        raise ValueError("data_fit_coefficients needs the model in eval mode (BN running statistics)")
    modules = dict(module.named_modules())
    pairs = find_pairs(module)
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str, conv: nn.Conv2d, bn: nn.Module, w_hat: torch.Tensor):
        def fn(_, inputs, output):
            a = torch.relu(bn(output)).double()
            xq = nn.functional.conv2d(inputs[0], w_hat, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            a_hat = torch.relu(bn(xq)).double()
            num, den = sums.get(name, (0.0, 0.0))
            sums[name] = (num + (a * a_hat).sum((0, 2, 3)), den + (a_hat * a_hat).sum((0, 2, 3)))
        return fn

    handles = [modules[p.low].register_forward_hook(
        hook(p.low, modules[p.low], modules[p.bn], layerwise_quantize(modules[p.low].weight, low_bits))) for p in pairs]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [p.low for p in pairs if p.low not in sums]
    if missing:
        raise ValueError(f"run() did not pass data through {missing[:3]}")
    return {name: torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num)).clamp_min(0.0)
            for name, (num, den) in sums.items()}


# --------------------------------------------------------------------------- experiment rows
@dataclass(frozen=True)
class Setting:
    """One row of the paper's Table 1/2: "fp32"; or a (low, high) bit pair with c = 1 ("naive"), the
    closed form ("dfmpc", with its lambdas) or c fitted on data ("data-fit", a diagnostic).

    Build it with `Setting.make`, which validates and drops the fields a mode does not use (so
    equal settings have equal keys).
    """
    mode: str
    low_bits: LowBits | None = None
    high_bits: int | None = None
    lambda1: float | None = None
    lambda2: float | None = None

    @classmethod
    def make(cls, mode: str, low_bits: LowBits = "ternary", high_bits: int = 6, lambda1: float = 0.5,
             lambda2: float = 0.0) -> "Setting":
        if mode not in SETTING_MODES:
            raise ValueError(f"mode must be one of {SETTING_MODES}, got {mode!r}")
        if mode == "fp32":
            return cls("fp32")
        _check_args(low_bits, high_bits, "dfmpc", "bn", lambda1, lambda2)
        if mode == "dfmpc":
            return cls(mode, low_bits, high_bits, float(lambda1), float(lambda2))
        return cls(mode, low_bits, high_bits)

    @property
    def label(self) -> str:
        if self.mode == "fp32":
            return "FP32"
        name = {"naive": "naive", "dfmpc": "DF-MPC", "data-fit": "data-fit c"}[self.mode]
        return f"{name} {quant.storage_bits(self.low_bits)}/{self.high_bits}" + (" (TWN)" if self.low_bits == "ternary" else "")

    def key(self) -> dict:
        """JSON-ready identity: bit widths as "fp32" / "ternary" / "3" and 6 (int), lambdas or None."""
        return {"mode": self.mode, "low_bits": "fp32" if self.low_bits is None else str(self.low_bits),
                "high_bits": "fp32" if self.high_bits is None else self.high_bits,
                "lambda1": self.lambda1, "lambda2": self.lambda2}


def table_settings(low_bits_list, high_bits: int = 6, lambda1: float = 0.5, lambda2: float = 0.0,
                   modes=("naive", "dfmpc")) -> list[Setting]:
    """The paper's Table 1/2 rows: FP32, then `modes` for every low bit width (validated here)."""
    return [Setting.make("fp32")] + [Setting.make(m, low, high_bits, lambda1, lambda2)
                                     for low in low_bits_list for m in modes]


def _identity(model: nn.Module) -> nn.Module:
    return model


def evaluate_settings(model: nn.Module, settings: list[Setting], evaluate: Callable[[nn.Module], dict],
                      metric: str, target: Callable[[nn.Module], nn.Module] | None = None,
                      calibrate: Callable[[nn.Module], object] | None = None, rows_path: str | Path | None = None,
                      part: str = "", quantize_other: bool = True, keep: tuple[str, ...] | None = None) -> list[dict]:
    """Measure every setting on a quantized COPY of `model` (the input model is never modified).

    evaluate(model) -> {metric name: float, ...}; `metric` names the headline one, also stored as
    "metric"; `keep` limits the stored metrics to those names. target(model) picks the ResNet that is quantized (default: the model itself;
    `lambda m: m.backbone.body` for a detector, whose other parts then stay FP32). calibrate(model)
    pushes data through the FP32 model, needed only by "data-fit" settings. Each row holds the key of
    its setting, its label, the metrics, `size_mb` (the quantized part's weights at their widths plus
    its other parameters at FP32, in MiB = 2**20 bytes as the paper's "MB"; FP32 row: all FP32) and
    the applied c (`mean_c`, `sd_c`; 1 and 0 when nothing is compensated). With `rows_path`, rows are
    appended to that JSONL file as they are measured and rows already there (same `part` and key) are
    reused, so a rerun resumes and repeats nothing.
    """
    target = target or _identity
    if any(s.mode == "data-fit" for s in settings) and calibrate is None:
        raise ValueError("'data-fit' settings need calibrate(model)")
    done = {json.dumps({k: r[k] for k in ("part", "mode", "low_bits", "high_bits", "lambda1", "lambda2")},
                       sort_keys=True): r for r in (runs.read_jsonl(rows_path) if rows_path else [])}
    fitted: dict[str, dict] = {}
    rows = []
    for s in settings:
        key = {"part": part, **s.key()}
        cached = done.get(json.dumps(key, sort_keys=True))
        if cached is not None:
            rows.append(cached)
            continue
        q = copy.deepcopy(model)
        c_stats = {"mean": 1.0, "sd": 0.0}
        if s.mode == "fp32":
            size_mb = quant.model_size(target(q))
        else:
            coefficients = None
            if s.mode == "data-fit":
                if key["low_bits"] not in fitted:
                    fitted[key["low_bits"]] = data_fit_coefficients(target(model), s.low_bits, lambda: calibrate(model))
                coefficients = fitted[key["low_bits"]]
            report = compensate(target(q), s.low_bits, s.high_bits, s.lambda1 or 0.0, s.lambda2 or 0.0,
                                "naive" if s.mode == "naive" else "dfmpc", "bn", quantize_other, coefficients)
            size_mb = report["size"]["total_mib"]
            if s.mode != "naive":
                c_stats = report["c"]
        metrics = evaluate(q)
        metrics = {k: float(v) for k, v in metrics.items() if keep is None or k in keep or k == metric}
        row = {**key, "setting": s.label, **metrics, "metric": metrics[metric], "size_mb": size_mb,
               "mean_c": c_stats["mean"], "sd_c": c_stats["sd"]}
        if rows_path:
            runs.append_jsonl(rows_path, row)
        rows.append(row)
    return rows


def recovered_fraction(rows: list[dict], metric: str = "metric") -> dict[str, dict[str, float | None]]:
    """Per low bit width and compensated mode: (mode - naive) / (FP32 - naive), the share of the naive
    drop won back (1 = back to FP32, 0 = no better than naive, < 0 = worse). None when naive did not
    drop. `rows` must hold one FP32 row and at most one row per (low bits, mode)."""
    fp32 = [r[metric] for r in rows if r["mode"] == "fp32"]
    if len(fp32) != 1:
        raise ValueError(f"need exactly one FP32 row, got {len(fp32)}")
    by: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["mode"] != "fp32":
            if (r["low_bits"], r["mode"]) in by:
                raise ValueError(f"two rows for {(r['low_bits'], r['mode'])}: pass one row per setting")
            by[(r["low_bits"], r["mode"])] = r[metric]
    out: dict[str, dict[str, float | None]] = {}
    for (low, mode), value in by.items():
        naive = by.get((low, "naive"))
        if mode == "naive" or naive is None:
            continue
        drop = fp32[0] - naive
        out.setdefault(low, {})[mode] = (value - naive) / drop if drop > 0 else None
    return out


def summarize(rows: list[dict], data_fit_rows: list[dict], diagnostics: dict[str, dict], metric: str) -> dict:
    """The JSON-small record of one model for metrics.json: the Table rows, the data-fit rows, the
    recovered share per low bit width and mode, and the totals of `scale_diagnostics` per low bit width."""
    return {"metric": metric, "rows": rows, "data_fit": data_fit_rows,
            "recovered": recovered_fraction(rows + data_fit_rows, metric),
            "diagnostics": {low: {k: d[k] for k in ("relative_error", "removable", "cosine", "sd_c")}
                            for low, d in diagnostics.items()}}


def ablation_rows(rows: list[dict], which: str, metric: str) -> list[dict]:
    """[{which: lambda, "low_bits": ..., metric: ...}] from DF-MPC rows (for metrics.json and plots)."""
    return [{which: r[which], "low_bits": r["low_bits"], metric: r[metric]} for r in rows if r["mode"] == "dfmpc"]


def paper_line(model: str) -> str:
    """The paper's closest numbers for `model` ("thermal_patches", "resnet18", "resnet50"), as one line."""
    ref = PAPER_REFERENCE
    if model in ref["imagenet"]:
        r = ref["imagenet"][model]
        return (f"paper, ImageNet {model} (pytorchcv weights): FP32 {r['fp32']} ({r['fp32_mb']} MB) | "
                f"DF-MPC 2/6 {r['dfmpc_2_6']} ({r['dfmpc_2_6_mb']} MB); no naive row reported")
    fp, naive, ours = ref["cifar10_mp2_6"]["resnet18"]
    return (f"paper, CIFAR-10 ResNet-18 (closest to a small ResNet-18 classifier): FP32 {fp} | naive 2/6 {naive} | "
            f"DF-MPC 2/6 {ours} (top-1 %)")


def format_rows(rows: list[dict], columns: list[str], digits: int = 3) -> str:
    """A fixed-width text table of `columns` (floats rounded), for stable notebook prints."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else ("-" if v is None else str(v))
    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


# --------------------------------------------------------------------------- the paper's numbers
PAPER_REFERENCE = references.paper("df_mpc")  # references/papers.yaml
