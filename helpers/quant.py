"""Simulated (fake) integer quantization of every conv and linear layer, in plain torch ops.

The paper quantizes all of RetinaNet (backbone, FPN, heads) to W8A8 with TensorRT's
pytorch-quantization toolkit (section 4.2.2). This module reproduces that scheme without the
toolkit:

- weights: per output channel, quantized ONCE when the model is wrapped (the layer stores the
  fake-quantized weight, so evaluation costs one extra elementwise op per layer input);
- activations: each conv/linear layer's input, per tensor, with a range from a calibrator;
- symmetric signed narrow range by default (integers in [-(2^(b-1)-1), 2^(b-1)-1], zero point 0,
  scale amax / (2^(b-1)-1)), or asymmetric (the paper's Formula 1: the range [a, c] is split into
  2^b - 1 steps, integers in [-2^(b-1), 2^(b-1)-1] with a zero point). pytorch-quantization's
  `TensorQuantizer` uses the same scale but defaults to `narrow_range=False`, i.e. [-128, 127] at
  8 bits: the extra level -128 is reached only by inputs below -amax (128/127 of it), so the two
  differ only on the negative tail beyond the clipping value, never for inputs that follow a ReLU
  (32 of the tiny detector's 38 quantized layer inputs);
- the rounding is torch's `fake_quantize_per_channel_affine` for weights; activations use the
  same arithmetic as `fake_quantize_per_tensor_affine`, bit for bit, in in-place ops that run
  about 5x faster on the CPU (`fake_quant_per_tensor`; torch's op is used when gradients flow).

Calibration is one pass. Each input quantizer keeps a running histogram of fixed size
(`num_bins` bins, so memory is O(bins), never O(activations)): of |x| on [0, R] when symmetric,
of x on [-R, R] (2 x `num_bins` bins) when asymmetric. R starts at the first batch's max|x| and,
when a larger value arrives, doubles as often as needed; each doubling merges neighbouring bins in
pairs, which is exact because the old edges are a subset of the new ones. So the bin width is at
most 2 max|x| / num_bins and no second pass over the data is needed. The exact running min and max
are tracked beside the histogram. From one histogram every calibrator can be evaluated
(`set_ranges` switches calibrator without rerunning the data):

- "max": the exact max|x| (min and max when asymmetric);
- "percentile": the given percentile of |x| (of x at p and 100 - p when asymmetric), linearly
  interpolated inside the bin where the CDF crosses (TensorRT takes that bin's lower edge);
- "entropy": TensorRT's KL-divergence search (`_compute_amax_entropy`: 2^(b-1) levels, candidates
  from bin 128 on, zero bin replaced by its neighbour, last minimum wins); symmetric only;
- "mse": the clipping range minimising the histogram-weighted squared quantization error
  (TensorRT's `_compute_amax_mse`; asymmetric: a grid over lower and upper edges).

Calibration collects activations of the weight-quantized network with activations left in
float (pytorch-quantization instead calibrates with float weights; on the random-weight tiny
detector the 99.99th-percentile ranges then differ by at most 0.9% at W8, but by up to 21% at W4). BatchNorm is not folded into the preceding conv, as in pytorch-quantization's
fake-quant graph; a deployed TensorRT engine folds it before quantizing.

Input space. The quantizer of the first conv sees the model's *normalised* input, i.e. after
RetinaNet's `GeneralizedRCNNTransform`. Real images ([0, 1] pixels) are fed as usual. Distilled
images already live in the normalised space: pass `normalized=True` to `calibrate` (or wrap any
forward in `skip_normalization(model)`), which makes the transform's normalisation the identity;
distilled images made at the detector's input size are not resized either, so the first conv
sees exactly the distilled tensor.

Also here, so that every bit width is checked in one place: `QuantSetting` (a "W8A4" setting with
its calibrator, percentile and scheme, checked once when parsed), DF-MPC's layer-wise weight
quantizers (TWN ternary and Eq. 6 uniform, de-quantized), and the sizes: `model_size` counts
parameters at their stored widths (ternary = 2 bits), `size_report` measures serialised state dicts.
"""
from __future__ import annotations

import copy
import io
import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

CALIBRATORS = ("max", "percentile", "entropy", "mse")
WEIGHT_CALIBRATORS = ("max", "mse")
BIT_RANGE = (2, 8)
FLOAT_BITS = 32
LowBits = str | int  # an int in BIT_RANGE, or "ternary" (TWN, DF-MPC's "2-bit")


# --------------------------------------------------------------------------- checks
def check_bits(bits: LowBits, what: str = "bits", ternary: bool = False) -> LowBits:
    """An integer bit width in 2..8 (returned as int), or "ternary" when `ternary`; ValueError otherwise."""
    if ternary and bits == "ternary":
        return bits
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not BIT_RANGE[0] <= bits <= BIT_RANGE[1]:
        allowed = ('"ternary" or ' if ternary else "") + f"an integer in {BIT_RANGE[0]}..{BIT_RANGE[1]}"
        raise ValueError(f"{what} must be {allowed}, got {bits!r}")
    return int(bits)


def check_calibrator(calibrator: str, symmetric: bool, percentile: float) -> None:
    if calibrator not in CALIBRATORS:
        raise ValueError(f"calibrator must be one of {CALIBRATORS}, got {calibrator!r}")
    if calibrator == "entropy" and not symmetric:
        raise ValueError("the entropy calibrator is TensorRT's symmetric KL search; use symmetric=True "
                         "or another calibrator (max, percentile, mse) for asymmetric ranges")
    if not 50.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")


_SETTING = re.compile(r"^W(\d)A(\d)$")


def calibration_labels(calibrator: str, percentile: float, symmetric: bool) -> dict:
    """What a result row records of its calibration: calibrator, percentile (percentile calibrator only,
    else None) and scheme ("symmetric" / "asymmetric")."""
    return {"calibrator": calibrator, "percentile": percentile if calibrator == "percentile" else None,
            "scheme": "symmetric" if symmetric else "asymmetric"}


@dataclass(frozen=True)
class QuantSetting:
    """One bit setting of the whole model ("W8A4": 8-bit weights, 4-bit activations) with its activation
    calibrator, percentile and scheme, checked once when it is made (before any work starts).

    `QuantSetting.parse("W8A4", calibrator="percentile", percentile=99.99, symmetric=True)`;
    `setting.quantize(model)` is `quantize_model` with these values; `setting.name` is "W8A4".
    """
    w_bits: int
    a_bits: int
    calibrator: str = "percentile"
    percentile: float = 99.99
    symmetric: bool = True

    def __post_init__(self):
        name = f"W{self.w_bits}A{self.a_bits}"
        object.__setattr__(self, "w_bits", check_bits(self.w_bits, f"weight bits of {name}"))
        object.__setattr__(self, "a_bits", check_bits(self.a_bits, f"activation bits of {name}"))
        check_calibrator(self.calibrator, self.symmetric, self.percentile)

    @classmethod
    def parse(cls, setting: str, calibrator: str = "percentile", percentile: float = 99.99,
              symmetric: bool = True) -> "QuantSetting":
        """"W8A4" -> QuantSetting(8, 4, ...); fails with ValueError on anything else or on bits outside 2..8."""
        match = _SETTING.match(str(setting))
        if not match:
            raise ValueError(f"bit setting must look like 'W8A8' (weights, activations), got {setting!r}")
        return cls(int(match[1]), int(match[2]), calibrator, percentile, symmetric)

    @classmethod
    def of(cls, setting: "QuantSetting | str") -> "QuantSetting":
        """A QuantSetting as given, or a "W8A4" string parsed with the default calibration."""
        return setting if isinstance(setting, cls) else cls.parse(setting)

    @property
    def name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def scheme(self) -> str:
        return "symmetric" if self.symmetric else "asymmetric"

    @property
    def labels(self) -> dict:
        """`calibration_labels` of this setting: what its result rows record."""
        return calibration_labels(self.calibrator, self.percentile, self.symmetric)

    def quantize(self, model: nn.Module, **kwargs) -> nn.Module:
        """`quantize_model` at this setting (kwargs: weight_calibrator, num_bins, layer_bits, exclude)."""
        return quantize_model(model, self.w_bits, self.a_bits, self.calibrator, self.percentile, self.symmetric,
                              **kwargs)


# --------------------------------------------------------------------------- integer grid
def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid: narrow signed range when symmetric (pytorch-quantization), full signed range otherwise."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


_MIN_SCALE = 1e-12  # an all-zero channel or tensor still needs a positive scale


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and int32 zero point for the clipping range [lo, hi] (scalars or per-channel vectors).

    Symmetric: scale = max(|lo|, |hi|) / (2^(b-1) - 1), zero point 0. Asymmetric (paper Formula 1):
    the range is widened to contain 0, s = (hi - lo) / (2^b - 1), z = -round(lo / s) - 2^(b-1).
    """
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp(min=_MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=_MIN_SCALE)
    zero_point = (-torch.round(lo / scale) + qmin).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def fake_quant_per_channel(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                           symmetric: bool, axis: int = 0) -> torch.Tensor:
    qmin, qmax = int_range(bits, symmetric)
    return torch.fake_quantize_per_channel_affine(w, scale, zero_point, axis, qmin, qmax)


def fake_quant_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                          symmetric: bool) -> torch.Tensor:
    """Bit for bit `torch.fake_quantize_per_tensor_affine` (same float32 reciprocal, round-half-even,
    clamp), written as in-place elementwise ops because torch's CPU kernel is about 5x slower and
    this runs on every layer input of every forward (tests check the equality)."""
    qmin, qmax = int_range(bits, symmetric)
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    out = x.mul(torch.reciprocal(scale)).round_()
    if symmetric:
        return out.clamp_(qmin, qmax).mul_(scale)
    zero = zero_point.to(out.dtype)
    return out.add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


# --------------------------------------------------------------------------- weights
def weight_range(w: torch.Tensor, bits: int, symmetric: bool = True, method: str = "max",
                 candidates: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel clipping range [lo, hi] of a weight (channel axis 0).

    "max": the channel's min and max. "mse": the channel's range shrunk by the factor in
    (0, 1] (a grid of `candidates`) that minimises that channel's squared quantization error.
    """
    if method not in WEIGHT_CALIBRATORS:
        raise ValueError(f"weight calibrator must be one of {WEIGHT_CALIBRATORS}, got {method!r}")
    flat = w.detach().reshape(w.shape[0], -1).float()
    lo, hi = flat.amin(1), flat.amax(1)
    if method == "max":
        return lo, hi
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for ratio in torch.linspace(1.0 / candidates, 1.0, candidates):
        scale, zp = qparams(lo * ratio, hi * ratio, bits, symmetric)
        err = (fake_quant_per_channel(flat, scale, zp, bits, symmetric) - flat).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * ratio, best_lo), torch.where(better, hi * ratio, best_hi)
    return best_lo, best_hi


def quantize_weight(w: torch.Tensor, bits: int, symmetric: bool = True, method: str = "max"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fake-quantized weight, per-channel scale, per-channel int32 zero point)."""
    scale, zero_point = qparams(*weight_range(w, bits, symmetric, method), bits, symmetric)
    return fake_quant_per_channel(w.detach().float(), scale, zero_point, bits, symmetric), scale, zero_point


# --------------------------------------------------------------------------- layer-wise weights (DF-MPC)
def twn_quantize(w: torch.Tensor) -> torch.Tensor:
    """TWN (DF-MPC spec 2.1, Eqs. 3-4), layer-wise: Delta = 0.7 mean|W|, alpha = mean |W| over |W| > Delta.

    Returns the de-quantized tensor alpha * T (same shape and dtype); all zeros if nothing survives.
    """
    a = w.abs()
    mask = a > 0.7 * a.mean()
    if not bool(mask.any()):
        return torch.zeros_like(w)
    return a[mask].mean() * torch.sign(w) * mask


def twn_scale(w: torch.Tensor) -> torch.Tensor:
    """The layer-wise TWN scale alpha (0 if nothing survives the threshold)."""
    a = w.abs()
    mask = a > 0.7 * a.mean()
    return a[mask].mean() if bool(mask.any()) else a.new_zeros(())


def uniform_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DF-MPC's Eq. 6 (DoReFa-style, linear: no tanh), layer-wise max|W|, de-quantized: 2**bits levels in
    [-max, max], no exact zero (unlike `quantize_weight`'s per-channel integer grid)."""
    bits = check_bits(bits)
    s = w.abs().max()
    if float(s) == 0.0:
        return torch.zeros_like(w)
    n = 2 ** bits - 1
    return s * (2.0 / n * torch.round(n * (w / (2 * s) + 0.5)) - 1.0)


def layerwise_quantize(w: torch.Tensor, bits: LowBits) -> torch.Tensor:
    """"ternary" -> `twn_quantize`, int k -> `uniform_quantize(w, k)`."""
    return twn_quantize(w) if check_bits(bits, ternary=True) == "ternary" else uniform_quantize(w, bits)


# --------------------------------------------------------------------------- histogram
class RunningHistogram:
    """Fixed-size histogram whose range [0, R] (|x|) or [-R, R] (x) doubles when a larger value comes.

    Counts are float64 (float32 counts stop being exact above 2^24 per bin).
    """

    def __init__(self, num_bins: int = 2048, signed: bool = False):
        if num_bins < 4 or num_bins % 4:
            raise ValueError(f"num_bins must be a positive multiple of 4, got {num_bins}")
        self.num_bins = num_bins * 2 if signed else num_bins
        self.signed = signed
        self.counts = torch.zeros(self.num_bins, dtype=torch.float64)
        self.range = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def edges(self) -> np.ndarray:
        lo = -self.range if self.signed else 0.0
        return np.linspace(lo, self.range, self.num_bins + 1)

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(1)
        fresh = torch.zeros_like(self.counts)
        if self.signed:
            quarter = self.num_bins // 4  # old [-R, R] becomes the middle half of [-2R, 2R]
            fresh[quarter:3 * quarter] = merged
        else:
            fresh[: self.num_bins // 2] = merged
        self.counts = fresh
        self.range *= 2.0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"non-finite values (min {lo}, max {hi}) reached a quantizer during calibration")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        peak = max(abs(lo), abs(hi))
        if self.range == 0.0:  # zeros counted while the range was empty stay in the zero bin
            self.range = peak
        while peak > self.range > 0.0:
            self._double()
        if self.range == 0.0:
            self.counts[self.num_bins // 2 if self.signed else 0] += x.numel()
            return
        # bincount of truncated int32 indices is ~4x faster than torch.histc on the CPU; the extra
        # bin B catches x == R (histc's closed last edge) and is folded back into bin B - 1
        if self.signed:
            index = x.mul(self.num_bins / (2 * self.range)).add_(self.num_bins / 2)
        else:
            index = x.abs().mul_(self.num_bins / self.range)
        counts = torch.bincount(index.to(torch.int32).flatten(), minlength=self.num_bins + 1).double()
        counts[self.num_bins - 1] += counts[self.num_bins:].sum()
        if self.counts.device != counts.device:  # first batch on a GPU: keep the running counts there
            self.counts = self.counts.to(counts.device)
        self.counts += counts[: self.num_bins]


def _percentile_from_hist(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction q of the mass lies, assuming uniform density inside a bin."""
    cdf = np.cumsum(counts) / counts.sum()
    idx = int(min(np.searchsorted(cdf, q), len(counts) - 1))
    below = cdf[idx - 1] if idx > 0 else 0.0
    inside = (q - below) / (cdf[idx] - below) if cdf[idx] > below else 1.0
    return float(edges[idx] + np.clip(inside, 0.0, 1.0) * (edges[idx + 1] - edges[idx]))


def entropy_amax(counts: np.ndarray, edges: np.ndarray, bits: int, start_bin: int = 128, stride: int = 1) -> float:
    """TensorRT's KL-divergence threshold search on a histogram of |x| (bins from 0).

    For each candidate i, bins [0, i) are merged into 2^(bits-1) groups (np.digitize on
    linspace(0, i) edges, as TensorRT), every non-empty bin gets its group's mean, the tail beyond
    i is added to bin i-1 of the reference, and KL(reference || expanded) is computed. All
    candidates at once: with prefix sums, KL = sum p log p - sum_groups P_g log q_g + log(S_i / T),
    O(groups) per candidate instead of O(bins) (the loop took seconds per detector calibration).
    Candidates stop one bin past the last non-empty bin: our histogram may extend to 2 max|x|,
    TensorRT's ends at max|x|.
    """
    bins = np.asarray(counts, dtype=np.float64).copy()
    bins[0] = bins[1]  # the zero bin (ReLU zeros) would dominate the distribution
    nonzero = np.flatnonzero(bins)
    stop = min(len(bins), int(nonzero[-1]) + 1) if len(nonzero) else 0
    if stop <= start_bin:
        return float(edges[max(stop, 1)])
    levels = 1 << (bits - 1)
    cand = np.arange(start_bin, stop + 1, stride)
    total = bins.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(bins)])          # sum of bins[:j]
    used_before = np.concatenate([[0], np.cumsum(bins != 0)])        # non-empty bins in [:j]
    with np.errstate(divide="ignore", invalid="ignore"):
        blogb = np.where(bins > 0, bins * np.log(bins), 0.0)
    blogb_before = np.concatenate([[0.0], np.cumsum(blogb)])
    # group k of candidate i holds bins j with edge_k <= j < edge_k+1, i.e. j in [ceil(edge_k), ceil(edge_k+1))
    bounds = np.ceil(np.linspace(0, cand, num=levels + 1, axis=1)).astype(np.int64)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    group_mass = mass_before[hi] - mass_before[lo]
    group_used = used_before[hi] - used_before[lo]
    last = cand - 1
    tail = total - mass_before[cand]
    reference_last = bins[last] + tail                               # bin i-1 of the reference
    # the reference's mass per group: the tail joins the last group (bin i-1 lies in it)
    reference_mass = group_mass.copy()
    reference_mass[:, -1] += tail
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.where(group_used > 0, np.log(group_mass / np.maximum(group_used, 1)), 0.0)
        sum_plogp = (blogb_before[last] + np.where(reference_last > 0, reference_last * np.log(reference_last), 0.0)) / total
        kl = sum_plogp - np.log(total) + np.log(mass_before[cand]) - (reference_mass * log_q).sum(1) / total
    kl = np.where((bins[last] == 0) & (tail > 0), np.inf, kl)  # reference mass where the expansion has none
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))  # the last minimum, as TensorRT keeps it
    return float(edges[cand[best]])


def _mse_best(centers: np.ndarray, counts: np.ndarray, lows: np.ndarray, highs: np.ndarray, bits: int,
              symmetric: bool, chunk: int = 256) -> int:
    """Index of the candidate range [lows[k], highs[k]] with least histogram-weighted squared error."""
    x = torch.as_tensor(centers, dtype=torch.float64)
    w = torch.as_tensor(counts, dtype=torch.float64)
    qmin, qmax = int_range(bits, symmetric)
    errors = []
    for start in range(0, len(lows), chunk):
        lo = torch.as_tensor(lows[start:start + chunk], dtype=torch.float64)[:, None]
        hi = torch.as_tensor(highs[start:start + chunk], dtype=torch.float64)[:, None]
        if symmetric:
            scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp(min=_MIN_SCALE)
            zero = torch.zeros_like(scale)
        else:
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=_MIN_SCALE)
            zero = (-torch.round(lo / scale) + qmin).clamp(qmin, qmax)
        q = (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale
        errors.append(((q - x) ** 2 * w).sum(1))
    return int(torch.cat(errors).argmin())


def mse_range(hist: RunningHistogram, bits: int, symmetric: bool, start_bin: int = 128,
              grid: int = 64) -> tuple[float, float]:
    counts, edges = hist.counts.cpu().numpy(), hist.edges()
    centers = (edges[1:] + edges[:-1]) / 2
    nonzero = np.flatnonzero(counts)
    if symmetric:
        stop = min(len(centers), int(nonzero[-1]) + 2) if len(nonzero) else 1
        cand = np.arange(min(start_bin, stop - 1), stop)
        k = _mse_best(centers, counts, -centers[cand], centers[cand], bits, True)
        return 0.0, float(centers[cand[k]])
    # asymmetric: a grid of lower edges (left of 0) times upper edges (right of 0), inside the data
    middle = len(counts) // 2
    first, last = (int(nonzero[0]), int(nonzero[-1])) if len(nonzero) else (middle, middle)
    lows = np.unique(np.linspace(min(first, middle), middle, grid).round().astype(int))
    highs = np.unique(np.linspace(middle, max(last + 1, middle), grid).round().astype(int))
    lo_grid, hi_grid = np.meshgrid(edges[lows], edges[highs], indexing="ij")
    k = _mse_best(centers, counts, lo_grid.ravel(), hi_grid.ravel(), bits, False)
    return float(lo_grid.ravel()[k]), float(hi_grid.ravel()[k])


def histogram_range(hist: RunningHistogram, calibrator: str, bits: int, symmetric: bool,
                    percentile: float = 99.99) -> tuple[float, float]:
    """Clipping range [lo, hi] of one quantizer from its calibration histogram (lo = -hi when symmetric)."""
    check_calibrator(calibrator, symmetric, percentile)
    if hist.total == 0:
        raise RuntimeError("this quantizer saw no data during calibration")
    counts, edges = hist.counts.cpu().numpy(), hist.edges()
    if calibrator == "max":
        return (-hist.absmax, hist.absmax) if symmetric else (hist.min, hist.max)
    if calibrator == "percentile":
        if symmetric:
            amax = min(_percentile_from_hist(counts, edges, percentile / 100), hist.absmax)
            return -amax, amax
        lo = max(_percentile_from_hist(counts, edges, 1 - percentile / 100), hist.min)
        hi = min(_percentile_from_hist(counts, edges, percentile / 100), hist.max)
        return lo, hi
    if calibrator == "entropy":
        amax = entropy_amax(counts, edges, bits)
        return -amax, amax
    lo, hi = mse_range(hist, bits, symmetric)
    return (-hi, hi) if symmetric else (lo, hi)


# --------------------------------------------------------------------------- modules
class InputQuantizer(nn.Module):
    """Per-tensor fake quantization of a layer's input, calibrated from a running histogram.

    States: collecting (pass-through, histogram updated), calibrated (fake-quantizes), or
    neither (raises: an uncalibrated W8A8 model must not be mistaken for a quantized one).
    """

    def __init__(self, bits: int, symmetric: bool = True, calibrator: str = "percentile",
                 percentile: float = 99.99, num_bins: int = 2048):
        super().__init__()
        self.bits, self.symmetric = check_bits(bits, "a_bits"), symmetric
        check_calibrator(calibrator, symmetric, percentile)
        self.calibrator, self.percentile, self.num_bins = calibrator, float(percentile), num_bins
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("calibrated", torch.tensor(False))
        self.collecting = False
        self.hist: RunningHistogram | None = None

    def start_collecting(self) -> None:
        self.hist = RunningHistogram(self.num_bins, signed=not self.symmetric)
        self.collecting = True

    def set_range(self, lo: float, hi: float) -> None:
        scale, zero_point = qparams(torch.tensor(lo), torch.tensor(hi), self.bits, self.symmetric)
        self.lo.fill_(lo)
        self.hi.fill_(hi)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.calibrated.fill_(True)

    def compute_range(self, calibrator: str | None = None, percentile: float | None = None) -> tuple[float, float]:
        if self.hist is None:
            raise RuntimeError("no calibration histogram: run helpers.quant.calibrate first")
        lo, hi = histogram_range(self.hist, calibrator or self.calibrator, self.bits, self.symmetric,
                                 self.percentile if percentile is None else percentile)
        self.set_range(lo, hi)
        return lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collecting:
            self.hist.update(x)
            return x
        if not self.calibrated:
            raise RuntimeError("activation ranges are not calibrated: run helpers.quant.calibrate(model, batches) "
                               "before evaluating the quantized model")
        return fake_quant_per_tensor(x, self.scale, self.zero_point, self.bits, self.symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, calibrator={self.calibrator!r}"


class _QuantLayer:
    """Shared part of QuantConv2d and QuantLinear: fake-quantized weight stored in `weight`."""

    input_quantizer: InputQuantizer | None

    def _setup(self, float_layer: nn.Module, w_bits: int, a_bits: int | None, symmetric: bool,
               weight_calibrator: str, act_kwargs: dict) -> None:
        w_q, scale, zero_point = quantize_weight(float_layer.weight, w_bits, symmetric, weight_calibrator)
        self.weight = nn.Parameter(w_q.to(float_layer.weight.dtype), requires_grad=False)
        self.bias = None if float_layer.bias is None else nn.Parameter(float_layer.bias.detach().clone(),
                                                                       requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.w_bits, self.symmetric = w_bits, symmetric
        self.input_quantizer = (None if a_bits is None else
                                InputQuantizer(a_bits, symmetric, **act_kwargs).to(float_layer.weight.device))

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def int_weight(self) -> torch.Tensor:
        """The stored weight as int8 integers (exact: it already lies on the integer grid)."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        qmin, qmax = int_range(self.w_bits, self.symmetric)
        q = torch.round(self.weight.detach() / self.weight_scale.reshape(shape)) + self.weight_zero_point.reshape(shape)
        return q.clamp(qmin, qmax).to(torch.int8)


class QuantConv2d(_QuantLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int | None, symmetric: bool,
                   weight_calibrator: str, **act_kwargs) -> "QuantConv2d":
        new = torch.nn.utils.skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size,
                                       stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                       groups=conv.groups, bias=conv.bias is not None,
                                       padding_mode=conv.padding_mode, device=conv.weight.device)
        new._setup(conv, w_bits, a_bits, symmetric, weight_calibrator, act_kwargs)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.weight, self.bias)


class QuantLinear(_QuantLayer, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int | None, symmetric: bool,
                   weight_calibrator: str, **act_kwargs) -> "QuantLinear":
        new = torch.nn.utils.skip_init(cls, linear.in_features, linear.out_features, bias=linear.bias is not None,
                                       device=linear.weight.device)
        new._setup(linear, w_bits, a_bits, symmetric, weight_calibrator, act_kwargs)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.weight, self.bias)


QUANT_LAYERS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def trainable_conv_copy(cls: type, float_conv: nn.Conv2d) -> nn.Conv2d:
    """A `cls` (an nn.Conv2d subclass for quantization-aware training) with `float_conv`'s geometry and a
    trainable copy of its float weight and bias, built without initialising weights it overwrites."""
    new = torch.nn.utils.skip_init(cls, float_conv.in_channels, float_conv.out_channels, float_conv.kernel_size,
                                   stride=float_conv.stride, padding=float_conv.padding, dilation=float_conv.dilation,
                                   groups=float_conv.groups, bias=float_conv.bias is not None,
                                   padding_mode=float_conv.padding_mode, device=float_conv.weight.device)
    new.weight = nn.Parameter(float_conv.weight.detach().clone())
    new.bias = None if float_conv.bias is None else nn.Parameter(float_conv.bias.detach().clone())
    return new


def quant_layers(model: nn.Module) -> dict[str, _QuantLayer]:
    """Every quantized layer by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _QuantLayer)}


def input_quantizers(model: nn.Module) -> dict[str, InputQuantizer]:
    return {name: m.input_quantizer for name, m in quant_layers(model).items() if m.input_quantizer is not None}


def quantize_model(model: nn.Module, w_bits: int = 8, a_bits: int | None = 8, calibrator: str = "percentile",
                   percentile: float = 99.99, symmetric: bool = True, weight_calibrator: str = "max",
                   num_bins: int = 2048, layer_bits: Mapping[str, tuple[int, int | None]] | None = None,
                   exclude: Iterable[str] = ()) -> nn.Module:
    """A copy of `model` whose every nn.Conv2d / nn.Linear is a fake-quantized QuantConv2d / QuantLinear.

    Weights are quantized here, once (per output channel); activations need `calibrate` next.
    `a_bits=None` leaves activations in float (weight-only). `layer_bits` maps a layer name to its
    own (w_bits, a_bits); `exclude` lists layer names kept in float. Everything is checked before
    the model is copied. The input model is not modified; the copy is returned in eval mode.
    """
    check_bits(w_bits, "w_bits")
    if a_bits is not None:
        check_bits(a_bits, "a_bits")
    check_calibrator(calibrator, symmetric, percentile)
    if weight_calibrator not in WEIGHT_CALIBRATORS:
        raise ValueError(f"weight_calibrator must be one of {WEIGHT_CALIBRATORS}, got {weight_calibrator!r}")
    if num_bins < 4 or num_bins % 4:
        raise ValueError(f"num_bins must be a positive multiple of 4, got {num_bins}")
    layer_bits, exclude = dict(layer_bits or {}), set(exclude)
    targets = {name for name, m in model.named_modules() if type(m) in QUANT_LAYERS}
    unknown = (set(layer_bits) | exclude) - targets
    if unknown:
        raise ValueError(f"no conv/linear layers named {sorted(unknown)[:5]} in the model")
    for name, (wb, ab) in layer_bits.items():
        check_bits(wb, f"w_bits of {name}")
        if ab is not None:
            check_bits(ab, f"a_bits of {name}")

    q = copy.deepcopy(model)
    act = {"calibrator": calibrator, "percentile": percentile, "num_bins": num_bins}
    for name, module in list(q.named_modules()):
        if name not in targets or name in exclude:
            continue
        wb, ab = layer_bits.get(name, (w_bits, a_bits))
        new = QUANT_LAYERS[type(module)].from_float(module, wb, ab, symmetric, weight_calibrator, **act)
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, child, new)
    return q.eval()


# --------------------------------------------------------------------------- calibration
@contextmanager
def skip_normalization(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the detector's transform does not normalise: feed normalised (distilled) images.

    Works on torchvision detectors (`model.transform.image_mean/std`); a no-op for models without.
    """
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "image_mean"):
        yield model
        return
    saved = transform.image_mean, transform.image_std
    transform.image_mean = [0.0] * len(saved[0])
    transform.image_std = [1.0] * len(saved[1])
    try:
        yield model
    finally:
        transform.image_mean, transform.image_std = saved


def _images(batch) -> list[torch.Tensor] | torch.Tensor:
    """Images from a list of CxHxW tensors, an NxCxHxW tensor, or an (images, targets) loader batch."""
    if (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], (tuple, list))
            and len(batch[1]) and isinstance(batch[1][0], dict)):
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        return list(batch.unbind(0)) if batch.dim() == 4 else [batch]
    return list(batch)


def _features_forward(model: nn.Module, images: list[torch.Tensor]) -> None:
    """What calibration needs from a detector: every conv input, without anchors, decoding or NMS."""
    device = next(model.parameters()).device
    images = [image.to(device, non_blocking=True) for image in images]
    if all(hasattr(model, a) for a in ("transform", "backbone", "head")):
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        features = list(features.values()) if isinstance(features, dict) else [features]
        model.head(features)
    else:
        model(torch.stack(images))


@torch.inference_mode()
def calibrate(model: nn.Module, batches: Iterable, progress: bool | None = None, normalized: bool = False,
              calibrator: str | None = None, percentile: float | None = None) -> dict:
    """Collect activation histograms over `batches` in one pass, then set every input quantizer's range.

    batches: an iterable of image batches, each a list of 3xHxW tensors, an Nx3xHxW tensor, or an
    (images, targets) pair from `helpers.data.make_loader` (targets ignored). Images are [0, 1]
    pixels unless `normalized=True` (distilled images, already in the model's normalised input
    space; see `skip_normalization`). For detectors only transform, backbone and head run.
    calibrator / percentile override the ones given to `quantize_model`.
    Each call starts fresh histograms. Returns {"layers", "batches", "images", "calibrator",
    "ranges": {layer: [lo, hi]}}.
    """
    quantizers = input_quantizers(model)
    if not quantizers:
        raise ValueError("the model has no activation quantizers: build it with quantize_model(..., a_bits=...)")
    if calibrator is not None:
        check_calibrator(calibrator, next(iter(quantizers.values())).symmetric,
                         99.99 if percentile is None else percentile)
    model.eval()
    for quantizer in quantizers.values():
        quantizer.start_collecting()
    n_batches = n_images = 0
    kwargs = {} if progress is None else {"disable": not progress}
    try:
        with skip_normalization(model) if normalized else nullcontext():
            for batch in tqdm(batches, desc="calibrate", leave=False, **kwargs):
                images = _images(batch)
                _features_forward(model, images)
                n_batches, n_images = n_batches + 1, n_images + len(images)
    finally:
        for quantizer in quantizers.values():
            quantizer.collecting = False
    if n_images == 0:
        raise ValueError("calibrate got no images")
    result = set_ranges(model, calibrator, percentile)
    return {"batches": n_batches, "images": n_images, **result}


def set_ranges(model: nn.Module, calibrator: str | None = None, percentile: float | None = None) -> dict:
    """(Re)compute every activation range from the histograms already collected (no new data pass)."""
    quantizers = input_quantizers(model)
    ranges = {name: [float(v) for v in qz.compute_range(calibrator, percentile)] for name, qz in quantizers.items()}
    first = next(iter(quantizers.values()))
    return {"layers": len(ranges), "calibrator": calibrator or first.calibrator, "ranges": ranges}


# --------------------------------------------------------------------------- size
SIZE_UNITS = {"MiB": 2 ** 20, "KiB": 2 ** 10}  # MiB is the papers' "MB"


def storage_bits(bits: LowBits | None) -> int:
    """Bits per stored value: ternary counts as 2, "fp32" (or None: left in float) as 32."""
    if bits == "ternary":
        return 2
    return FLOAT_BITS if bits in ("fp32", None) else int(bits)


def size_in(bits: float, unit: str = "MiB") -> float:
    """A number of stored bits in `unit` ("MiB" = 2**20 bytes, "KiB" = 1024 bytes)."""
    if unit not in SIZE_UNITS:
        raise ValueError(f"unit must be one of {tuple(SIZE_UNITS)}, got {unit!r}")
    return bits / 8 / SIZE_UNITS[unit]


def model_size(model: nn.Module, layer_bits: Mapping[str, LowBits | None] | None = None, bits: LowBits = FLOAT_BITS,
               weights_only: bool = False, unit: str = "MiB") -> float:
    """Parameter storage at the given widths (the papers' Table 1 "Model Size (MB)"): the weight of every
    layer named in `layer_bits` at its width (`storage_bits`: ternary = 2, "fp32" = 32), every other
    parameter (biases, norm layers, unlisted layers) at `bits`; `weights_only`: the listed weights alone.
    `model_size(model)` is the float model's size. Counted, not serialised (see `size_report`).
    """
    layer_bits = dict(layer_bits or {})
    modules = dict(model.named_modules())
    unknown = [name for name in layer_bits if not isinstance(getattr(modules.get(name), "weight", None), torch.Tensor)]
    if unknown:
        raise ValueError(f"no layers with a weight named {unknown[:5]} in the model")
    listed = sum(modules[name].weight.numel() * storage_bits(b) for name, b in layer_bits.items())
    if weights_only:
        return size_in(listed, unit)
    rest = sum(p.numel() for p in model.parameters()) - sum(modules[name].weight.numel() for name in layer_bits)
    return size_in(listed + rest * storage_bits(bits), unit)


def _pack_bits(q: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Integers in [qmin, qmin + 2^bits) packed densely, `bits` per value, into uint8 bytes."""
    offset = (q.to(torch.int16) - qmin).to(torch.uint8).flatten().cpu().numpy()
    bit_planes = np.unpackbits(offset[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bit_planes.ravel(), bitorder="little"))


def integer_state_dict(model: nn.Module, packed: bool = False) -> dict[str, torch.Tensor]:
    """State dict as deployed: quantized weights as integers plus per-channel scales (and zero points
    when asymmetric); everything else (biases, norm layers, activation scales) as stored.

    packed=False stores int8 tensors; packed=True packs `w_bits` bits per weight into bytes.
    """
    layers = quant_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf == "weight":
            ints = layer.int_weight()
            if packed and layer.w_bits < 8:
                state[key] = _pack_bits(ints, layer.w_bits, int_range(layer.w_bits, layer.symmetric)[0])
                state[key + "_shape"] = torch.tensor(ints.shape, dtype=torch.int32)
            else:
                state[key] = ints
        elif layer is not None and leaf == "weight_zero_point":
            if not layer.symmetric:
                state[key] = value.to(torch.int8)
        elif leaf in ("lo", "hi", "calibrated") and owner.endswith("input_quantizer"):
            continue  # bookkeeping, not needed to run the model
        else:
            state[key] = value
    return state


def serialized_mib(state: Mapping[str, torch.Tensor]) -> float:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getbuffer().nbytes / 2 ** 20


def size_report(float_model: nn.Module, quantized: nn.Module) -> dict:
    """Serialised sizes in MiB (torch.save into memory): float state dict vs integer state dict.

    The paper's Table 1 (145.7 MB -> 36.4 MB) counts 4 bytes vs 1 byte per parameter; here biases,
    norm layers and scales stay float32, so the measured ratio is a little under 4.
    """
    fp32 = serialized_mib(float_model.state_dict())
    int8 = serialized_mib(integer_state_dict(quantized))
    packed = serialized_mib(integer_state_dict(quantized, packed=True))
    layers = quant_layers(quantized)
    return {"fp32_mib": fp32, "int_mib": int8, "ratio": fp32 / int8, "packed_mib": packed,
            "packed_ratio": fp32 / packed, "quantized_layers": len(layers),
            "quantized_weights": sum(m.weight.numel() for m in layers.values())}
