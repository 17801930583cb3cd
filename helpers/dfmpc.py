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
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

LowBits = str | int
MODES = ("dfmpc", "naive")
APPLY = ("bn", "weight")


# --------------------------------------------------------------------------- quantizers
def check_bits(bits, allow_ternary: bool = False) -> int | str:
    """Validate a bit width: an int in 2..8, or "ternary" when `allow_ternary`; raise ValueError otherwise.

    Ternary (TWN) is the paper's "2-bit". An int k means the uniform quantizer of Eq. 6 (so low_bits=2
    is a 4-level grid without zero, not TWN).
    """
    if allow_ternary and bits == "ternary":
        return bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        allowed = '"ternary" or an int in 2..8' if allow_ternary else "an int in 2..8"
        raise ValueError(f"bit width must be {allowed}, got {bits!r}")
    return bits


def storage_bits(bits: LowBits) -> int:
    """Bits per stored weight: ternary counts as 2."""
    return 2 if bits == "ternary" else int(bits)


def twn_quantize(w: torch.Tensor) -> torch.Tensor:
    """TWN (spec 2.1, Eqs. 3-4), layer-wise: Delta = 0.7 mean|W|, alpha = mean |W| over |W| > Delta.

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
    """Eq. 6 (DoReFa-style, linear: no tanh), layer-wise max|W|, de-quantized: 2**bits levels in [-max, max]."""
    bits = check_bits(bits)
    s = w.abs().max()
    if float(s) == 0.0:
        return torch.zeros_like(w)
    n = 2 ** bits - 1
    return s * (2.0 / n * torch.round(n * (w / (2 * s) + 0.5)) - 1.0)


def quantize(w: torch.Tensor, bits: LowBits) -> torch.Tensor:
    """"ternary" -> `twn_quantize`, int k -> `uniform_quantize(w, k)`."""
    return twn_quantize(w) if check_bits(bits, allow_ternary=True) == "ternary" else uniform_quantize(w, bits)


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
                    apply: str = "bn") -> dict:
    """Quantize one `low -> bn -> ReLU -> high` link IN PLACE and compensate it (mode="dfmpc").

    c is computed from the ORIGINAL low weight and BN (before anything is changed). apply="bn" folds
    c into the BN (gamma, beta *= c; valid because ReLU(c z) = c ReLU(z) for c >= 0, so the activation
    must be ReLU); apply="weight" multiplies high.weight[:, j] (on its `high_bits` grid) by c_j.
    Returns c (float64), its mean, and the Eq. 23 loss at c = 1 (naive) and at c (compensated).
    """
    w = low.weight.detach().clone()
    w_hat = quantize(w, low_bits)
    c = compensation_coefficients(w, w_hat, bn, lambda1, lambda2)
    out = {"c": c, "mean_c": float(c.mean()), "min_c": float(c.min()), "max_c": float(c.max()),
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


def _check_args(low_bits, high_bits, mode, apply) -> None:
    check_bits(low_bits, allow_ternary=True)
    check_bits(high_bits)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if apply not in APPLY:
        raise ValueError(f"apply must be one of {APPLY}, got {apply!r}")


@torch.no_grad()
def compensate(module: nn.Module, low_bits: LowBits = "ternary", high_bits: int = 6, lambda1: float = 0.5,
               lambda2: float = 0.0, mode: str = "dfmpc", apply: str = "bn", quantize_other: bool = True) -> dict:
    """DF-MPC (mode="dfmpc") or naive mixed precision (mode="naive", c = 1) on a torchvision ResNet, IN PLACE.

    The module is modified: callers that need the FP model must pass `copy.deepcopy(model)`.
    Works on a ResNet classifier or a detector backbone body (no fc). Arguments are validated before
    anything is touched. low_bits: "ternary" (paper's 2-bit) or an int 2..8 (Eq. 6); high_bits: int 2..8.
    quantize_other: stem / downsample / bottleneck conv1 / fc to `high_bits` (default) or left FP32.

    Returns a dict: `pairs` (names, mean/min/max c, Eq. 23 loss naive vs compensated), loss totals,
    `layers` (conv/linear name -> assigned bits, "ternary" or "fp32"), and `size`: weight storage in
    MiB at the assigned widths (params * bits / 8 / 2**20, ternary = 2 bits; conv/linear weights only)
    plus the remaining parameters (BN, biases) at 32 bits, against the all-FP32 size.
    """
    _check_args(low_bits, high_bits, mode, apply)
    modules = dict(module.named_modules())
    pairs = find_pairs(module)
    if not pairs:
        raise ValueError("no ResNet BasicBlock/Bottleneck found: find_pairs() returned nothing")
    layers: dict[str, LowBits] = {}
    reports = []
    for pair in pairs:
        low, bn, high = modules[pair.low], modules[pair.bn], modules[pair.high]
        if not (isinstance(low, nn.Conv2d) and isinstance(high, nn.Conv2d)):
            raise TypeError(f"{pair.block}: expected Conv2d layers")
        r = compensate_pair(low, bn, high, low_bits, high_bits, lambda1, lambda2, mode, apply)
        r.pop("c")
        reports.append({**pair._asdict(), **r})
        layers[pair.low], layers[pair.high] = low_bits, high_bits
    for name, m in modules.items():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in layers:
            if quantize_other:
                m.weight.copy_(uniform_quantize(m.weight, high_bits))
            layers[name] = high_bits if quantize_other else "fp32"

    weight_bits = sum(modules[n].weight.numel() * (32 if b == "fp32" else storage_bits(b)) for n, b in layers.items())
    n_weights = sum(modules[n].weight.numel() for n in layers)
    n_params = sum(p.numel() for p in module.parameters())
    mib = 8 * 2 ** 20
    size = {"weights_mib": weight_bits / mib, "other_params_fp32_mib": (n_params - n_weights) * 32 / mib,
            "fp32_mib": n_params * 32 / mib, "params": n_params, "quantized_weights": n_weights}
    size["total_mib"] = size["weights_mib"] + size["other_params_fp32_mib"]
    size["ratio"] = size["fp32_mib"] / size["total_mib"]
    return {"mode": mode, "apply": apply, "low_bits": low_bits, "high_bits": high_bits, "lambda1": lambda1,
            "lambda2": lambda2, "quantize_other": quantize_other, "pairs": reports,
            "loss_naive": sum(r["loss_naive"] for r in reports),
            "loss_compensated": sum(r["loss_compensated"] for r in reports),
            "layers": layers, "size": size}
