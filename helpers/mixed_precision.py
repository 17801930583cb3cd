"""Mixed-precision quantization per block (companion paper 4, SPMix-Q; research page spmixq.md sections 3-4).

A *block* is a named group of conv/linear layers (a U-Net level, a ResNet stage, an FPN level, a head).
Everything quantizes through `helpers.quant.quantize_model(layer_bits=...)`, so the quantizers and
calibrators are notebook 04's.

- Sizes are measured, not declared: `block_stats` runs one forward and records, per layer, its
  weight count, the element count of its (quantized) input per image and its MACs.
  `average_bits(qmodel, stats)` reads the bit widths back from the quantized layers: weights
  parameter-weighted (the size ratio is 32 / W-bar, so the paper's 2.42 is most likely this one),
  activations element-weighted (and, beside it, the plain mean over blocks, the paper's 3.82 is
  probably that).
- Sensitivity: one block at a time at a low bit width, everything else in float (`block_sensitivity`);
  the caller's `evaluate(qmodel)` gives the task metric with real labels, or a label-free output
  discrepancy on distilled images; `rank_correlation` compares the two profiles.
- Policies, each returning {block: (w_bits, a_bits)} and never above its budget: `uniform`; SPMix-Q's
  symmetric progressive decreasing schedule (`spmixq_search`, and `increasing=True`, the reversed
  control); `greedy` on a measured sensitivity table; HAWQ-V3 (`hawq_v3`: Hessian-trace-weighted
  quantization perturbation, HAWQ-V2's Omega, minimised exactly under the budget, as HAWQ-V3's integer
  program; traces by Hutchinson's estimator, `hutchinson_trace`); `random_allocation` (control).
- QAT: `qat_student` swaps each calibrated QuantConv2d for a straight-through fake-quant conv with
  float latent weights (`STEConv2d`); `to_quantized` turns the trained student back into a quant.py
  model (same bits, same activation ranges), so it is measured by the same `average_bits`.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from helpers import quant

BIT_LADDER = (8, 6, 5, 4, 3, 2)  # the greedy's moves: one rung down at a time
MODES = ("W", "A", "WA")
FLOAT_BITS = quant.FLOAT_BITS
Allocation = dict[str, tuple[int, int | None]]


class MixedPrecisionError(ValueError):
    pass


# --------------------------------------------------------------------------- checks (before any work)
def check_block_names(blocks: Mapping[str, list[str]], names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise MixedPrecisionError(f"unknown block name(s) {unknown}; the model's blocks are {list(blocks)}")
    return names


def check_allocation(blocks: Mapping[str, list[str]], allocation: Mapping[str, tuple[int, int | None]]) -> Allocation:
    check_block_names(blocks, allocation)
    out = {}
    for name, (wb, ab) in allocation.items():
        out[name] = (quant.check_bits(wb, f"w_bits of block {name}"),
                     None if ab is None else quant.check_bits(ab, f"a_bits of block {name}"))
    return out


def check_budget(budget: float | None, what: str = "weight bit budget") -> float | None:
    """A budget is an average bit width in [2, 8] (None: unconstrained)."""
    if budget is None:
        return None
    lo, hi = quant.BIT_RANGE
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise MixedPrecisionError(f"{what} must be a number, got {budget!r}")
    if budget < lo:
        raise MixedPrecisionError(f"{what} {budget} is below the lowest bit width {lo}: no allocation can meet it; "
                                  f"use a budget in {lo}..{hi}")
    if budget > hi:
        raise MixedPrecisionError(f"{what} {budget} is above the highest bit width {hi}; use a budget in {lo}..{hi}")
    return float(budget)


def check_bit_list(bits: Iterable[int], what: str = "bits") -> list[int]:
    bits = [quant.check_bits(b, what) for b in bits]
    if not bits:
        raise MixedPrecisionError(f"{what} is empty")
    return bits


# --------------------------------------------------------------------------- sizes, measured
def block_stats(model: nn.Module, blocks: Mapping[str, list[str]], example: torch.Tensor | Callable) -> dict:
    """Per layer and per block: weights, input elements per image and MACs per image, from one forward.

    `example`: an input batch (the model is called on it) or a callable running the model. Returns
    {"layers": {layer: {"block", "params", "elements", "macs"}}, "blocks": {block: same sums}}.
    """
    owner = {layer: b for b, layers in blocks.items() for layer in layers}
    modules = dict(model.named_modules())
    missing = [layer for layer in owner if layer not in modules or type(modules[layer]) not in quant.QUANT_LAYERS]
    if missing:
        raise MixedPrecisionError(f"no conv/linear layers named {missing[:5]} in the model")
    seen: dict[str, dict] = {}

    def hook(name):
        def record(module, args, out):
            batch = args[0].shape[0]
            per_output = module.weight[0].numel()  # MACs per output element
            seen[name] = {"block": owner[name], "params": int(module.weight.numel()),
                          "elements": int(args[0].numel() // batch), "macs": int(out.numel() // batch * per_output)}
        return record

    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in owner]
    try:
        with torch.no_grad():
            example(model) if callable(example) else model(example)
    finally:
        for h in handles:
            h.remove()
    never = [layer for layer in owner if layer not in seen]
    if never:
        raise MixedPrecisionError(f"layers {never[:5]} never ran in the example forward")
    layers = {layer: seen[layer] for layer in owner}
    sums = {b: {k: sum(layers[layer][k] for layer in ls) for k in ("params", "elements", "macs")} for b, ls in blocks.items()}
    return {"layers": layers, "blocks": sums}


def average_bits(qmodel: nn.Module, stats: dict, scope: Iterable[str] | None = None) -> dict:
    """Average bits read from a quantized model over the blocks in `scope` (default: all).

    w_bits: sum_l P_l b^W_l / sum_l P_l; a_bits: sum_l E_l b^A_l / sum_l E_l (E = input elements);
    a_bits_block: the plain mean over blocks of each block's element-weighted activation bits.
    A layer left in float counts as 32 bits; size_kib = weights' bits / 8 / 1024.
    """
    scope = set(stats["blocks"] if scope is None else scope)
    qlayers = quant.quant_layers(qmodel)
    w_num = w_den = a_num = a_den = 0.0
    block_a: dict[str, list[float]] = {}
    for name, s in stats["layers"].items():
        if s["block"] not in scope:
            continue
        layer = qlayers.get(name)
        wb = FLOAT_BITS if layer is None else layer.w_bits
        ab = FLOAT_BITS if layer is None or layer.input_quantizer is None else layer.input_quantizer.bits
        w_num, w_den = w_num + s["params"] * wb, w_den + s["params"]
        a_num, a_den = a_num + s["elements"] * ab, a_den + s["elements"]
        acc = block_a.setdefault(s["block"], [0.0, 0.0])
        acc[0], acc[1] = acc[0] + s["elements"] * ab, acc[1] + s["elements"]
    if not w_den:
        raise MixedPrecisionError(f"no layers of blocks {sorted(scope)} in the stats")
    return {"w_bits": w_num / w_den, "a_bits": a_num / a_den,
            "a_bits_block": float(np.mean([n / d for n, d in block_a.values()])), "size_kib": quant.size_in(w_num, "KiB")}


def allocation_bits(allocation: Mapping[str, tuple[int, int | None]], stats: dict) -> dict:
    """The same averages from a declared allocation over its blocks (used inside the searches; tests check it
    equals `average_bits` of the quantized model)."""
    w = sum(stats["blocks"][b]["params"] * wb for b, (wb, _) in allocation.items())
    a = sum(stats["blocks"][b]["elements"] * (FLOAT_BITS if ab is None else ab) for b, (_, ab) in allocation.items())
    params = sum(stats["blocks"][b]["params"] for b in allocation)
    elements = sum(stats["blocks"][b]["elements"] for b in allocation)
    return {"w_bits": w / params, "a_bits": a / elements,
            "a_bits_block": float(np.mean([FLOAT_BITS if ab is None else ab for _, ab in allocation.values()])),
            "size_kib": quant.size_in(w, "KiB")}


def layer_bits(blocks: Mapping[str, list[str]], allocation: Mapping[str, tuple[int, int | None]]) -> dict:
    return {layer: bits for b, bits in allocation.items() for layer in blocks[b]}


def quantize_allocation(model: nn.Module, blocks: Mapping[str, list[str]], allocation: Mapping,
                        rest: str = "int8", **quant_kwargs) -> nn.Module:
    """quant.quantize_model with each block at its (w_bits, a_bits); other layers at W8A8 (`rest="int8"`) or
    left in float (`rest="float"`, the sensitivity study's one-block-at-a-time models)."""
    allocation = check_allocation(blocks, allocation)
    if rest not in ("int8", "float"):
        raise MixedPrecisionError(f"rest must be 'int8' or 'float', got {rest!r}")
    bits = layer_bits(blocks, allocation)
    exclude = []
    if rest == "float":
        exclude = [n for n, m in model.named_modules() if type(m) in quant.QUANT_LAYERS and n not in bits]
    return quant.quantize_model(model, 8, 8, layer_bits=bits, exclude=exclude, **quant_kwargs)


def calibrate_if_needed(qmodel: nn.Module, batches, normalized: bool = False) -> None:
    if quant.input_quantizers(qmodel):
        quant.calibrate(qmodel, batches, progress=False, normalized=normalized)


# --------------------------------------------------------------------------- sensitivity
def sensitivity_settings(blocks: Mapping[str, list[str]], names: Iterable[str] | None, bits: Iterable[int],
                         modes: Iterable[str]) -> list[tuple[str, str, int]]:
    """(block, mode, bits) of the study, every argument checked first. Mode W: weights at b, activations
    float; A: activations at b, weights at 8 (quant.py always quantizes a wrapped layer's weights); WA: both."""
    names = check_block_names(blocks, list(blocks) if names is None else names)
    bits = check_bit_list(bits)
    modes = list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise MixedPrecisionError(f"modes must be among {MODES}, got {bad}")
    return [(n, m, b) for n in names for m in modes for b in bits]


def mode_bits(mode: str, bits: int) -> tuple[int, int | None]:
    return {"W": (bits, None), "A": (8, bits), "WA": (bits, bits)}[mode]


def block_sensitivity(model: nn.Module, blocks: Mapping[str, list[str]], evaluate: Callable[[nn.Module], dict],
                      calibration, bits: Iterable[int] = (2, 4), modes: Iterable[str] = ("W", "A"),
                      names: Iterable[str] | None = None, normalized: bool = False, done: Iterable[dict] = (),
                      on_row: Callable[[dict], None] | None = None, progress: bool | None = None,
                      **quant_kwargs) -> list[dict]:
    """Quantize one block at a time (everything else float), calibrate on `calibration` (batches), and
    record `evaluate(qmodel)` as a row {"block", "mode", "bits", **metrics}. Rows in `done` are kept
    (resume); `on_row` receives each new row (e.g. append to a JSONL file)."""
    settings = sensitivity_settings(blocks, names, bits, modes)
    rows = [r for r in done]
    have = {(r["block"], r["mode"], r["bits"]) for r in rows}
    kwargs = {} if progress is None else {"disable": not progress}
    for block, mode, b in tqdm([s for s in settings if s not in have], desc="sensitivity", leave=False, **kwargs):
        q = quantize_allocation(model, blocks, {block: mode_bits(mode, b)}, rest="float", **quant_kwargs)
        calibrate_if_needed(q, calibration, normalized)
        row = {"block": block, "mode": mode, "bits": b, **evaluate(q)}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def sensitivity_table(rows: list[dict], metric: str, reference: float | None = None, higher_is_better: bool = True
                      ) -> dict[tuple[str, str, int], float]:
    """{(block, mode, bits): sensitivity}: the drop reference - metric (higher_is_better) or metric - reference."""
    out = {}
    for r in rows:
        value = r[metric] if reference is None else (reference - r[metric] if higher_is_better else r[metric] - reference)
        out[(r["block"], r["mode"], r["bits"])] = float(value)
    return out


def rank_correlation(a: Mapping[str, float], b: Mapping[str, float]) -> dict:
    """Spearman rho and Kendall tau (scipy.stats) between two per-block profiles, over their common blocks."""
    from scipy import stats
    keys = [k for k in a if k in b]
    if len(keys) < 3:
        raise MixedPrecisionError(f"need at least 3 common blocks for a rank correlation, got {len(keys)}")
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    rho, p_rho = stats.spearmanr(x, y)
    tau, p_tau = stats.kendalltau(x, y)
    return {"spearman": float(rho), "spearman_p": float(p_rho), "kendall": float(tau), "kendall_p": float(p_tau),
            "blocks": len(keys)}


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of an output in dB."""
    reference, output = reference.detach(), output.detach()
    noise = (output.float() - reference.float()).pow(2).mean().clamp(min=1e-20)
    return float(10 * torch.log10(reference.float().pow(2).mean().clamp(min=1e-20) / noise))


# --------------------------------------------------------------------------- policies
def uniform(names: Iterable[str], w_bits: int, a_bits: int | None) -> Allocation:
    return {n: (quant.check_bits(w_bits, "w_bits"), None if a_bits is None else quant.check_bits(a_bits, "a_bits"))
            for n in names}


def spmixq_schedule(levels: Mapping[str, tuple[int, str]], b0: int, step: int, bmin: int, decoder_offset: int = 0,
                    increasing: bool = False) -> dict[str, int]:
    """Bits per block of the symmetric progressive schedule (research page section 4):
    b(E_l) = max(bmin, b0 - l*step), b(D_l) = max(bmin, b(E_l) - decoder_offset); `levels` maps a block to
    (level, side). increasing=True is the reversed control: level l takes the bits of level L - l."""
    deepest = max(level for level, _ in levels.values())
    out = {}
    for name, (level, side) in levels.items():
        lv = deepest - level if increasing else level
        b = max(bmin, b0 - lv * step)
        out[name] = max(bmin, b - decoder_offset) if side == "decoder" else b
    return out


SPMIXQ_GRID = {"b0": range(2, 9), "step": (1, 2), "bmin": (2, 3), "decoder_offset": (0, 1)}


def _best_schedule(levels, weights: Mapping[str, int], budget: float, increasing: bool) -> tuple[dict, dict]:
    """The schedule of the grid with the largest weighted mean <= budget; ties: largest b0 (most progressive),
    then smallest decoder offset (most symmetric)."""
    best = None
    for b0, step, bmin, off in itertools.product(*SPMIXQ_GRID.values()):
        if bmin > b0:
            continue
        bits = spmixq_schedule(levels, b0, step, bmin, off, increasing)
        mean = sum(weights[n] * b for n, b in bits.items()) / sum(weights.values())
        if mean <= budget + 1e-12:
            key = (mean, b0, -off)
            if best is None or key > best[0]:
                best = (key, bits, {"b0": b0, "step": step, "bmin": bmin, "decoder_offset": off})
    if best is None:
        raise MixedPrecisionError(f"no SPMix-Q schedule meets the budget {budget}")
    return best[1], best[2]


def spmixq_search(levels: Mapping[str, tuple[int, str]], stats: dict, budget_w: float, budget_a: float | None,
                  increasing: bool = False) -> tuple[Allocation, dict]:
    """SPMix-Q under a budget: weights and activations each take the grid's schedule with the largest average
    (parameter- resp. element-weighted) not above the budget. budget_a=None keeps activations at 8."""
    check_budget(budget_w)
    check_budget(budget_a, "activation bit budget")
    check_block_names(stats["blocks"], levels)
    w_bits, w_cfg = _best_schedule(levels, {n: stats["blocks"][n]["params"] for n in levels}, budget_w, increasing)
    if budget_a is None:
        a_bits, a_cfg = {n: 8 for n in levels}, None
    else:
        a_bits, a_cfg = _best_schedule(levels, {n: stats["blocks"][n]["elements"] for n in levels}, budget_a, increasing)
    return {n: (w_bits[n], a_bits[n]) for n in levels}, {"weights": w_cfg, "activations": a_cfg}


def _interpolated(table: Mapping[tuple[str, str, int], float], block: str, mode: str, bits: int) -> float:
    """Sensitivity at `bits`: measured, 0 at 8 bits, else linear in bits between the nearest measured widths
    (below the lowest measured: held at it)."""
    if (block, mode, bits) in table:
        return table[(block, mode, bits)]
    known = sorted([(b, v) for (k, m, b), v in table.items() if k == block and m == mode] + [(8, 0.0)])
    if bits <= known[0][0]:
        return known[0][1]
    for (b1, v1), (b2, v2) in zip(known, known[1:]):
        if b1 <= bits <= b2:
            return v1 + (v2 - v1) * (bits - b1) / (b2 - b1)
    return 0.0


def greedy(table: Mapping[tuple[str, str, int], float], stats: dict, names: Iterable[str], budget_w: float,
           budget_a: float | None, ladder: tuple[int, ...] = BIT_LADDER) -> Allocation:
    """Sensitivity-greedy: from all blocks at 8/8, repeatedly take the move (block, W or A, one rung down the
    ladder) with the least sensitivity increase per bit of average saved (the table as an additive model),
    on the kinds still over budget; then raise blocks one rung, best first, while the budget allows.
    `table` holds (block, "W"|"A", bits) -> sensitivity (missing widths interpolated)."""
    check_budget(budget_w)
    check_budget(budget_a, "activation bit budget")
    names = check_block_names(stats["blocks"], names)
    ladder = sorted(check_bit_list(ladder, "ladder"), reverse=True)
    if ladder[0] != 8:
        raise MixedPrecisionError(f"the ladder must start at 8, got {ladder}")
    weight = {"W": {n: stats["blocks"][n]["params"] for n in names}, "A": {n: stats["blocks"][n]["elements"] for n in names}}
    total = {k: sum(v.values()) for k, v in weight.items()}
    budget = {"W": budget_w, "A": budget_a}
    bits = {"W": {n: 8 for n in names}, "A": {n: 8 for n in names}}

    def mean(kind):
        return sum(weight[kind][n] * bits[kind][n] for n in names) / total[kind]

    def rung(kind, n, direction):
        i = ladder.index(bits[kind][n]) + direction
        return ladder[i] if 0 <= i < len(ladder) else None

    while any(budget[k] is not None and mean(k) > budget[k] + 1e-12 for k in "WA"):
        moves = []
        for kind in [k for k in "WA" if budget[k] is not None and mean(k) > budget[k] + 1e-12]:
            for n in names:
                lower = rung(kind, n, +1)
                if lower is None:
                    continue
                cost = weight[kind][n] * (bits[kind][n] - lower) / total[kind]
                harm = _interpolated(table, n, kind, lower) - _interpolated(table, n, kind, bits[kind][n])
                moves.append((harm / cost, kind, n, lower))
        if not moves:
            raise MixedPrecisionError(f"the budget W {budget_w} / A {budget_a} cannot be met with the ladder {ladder}")
        _, kind, n, lower = min(moves, key=lambda m: m[0])
        bits[kind][n] = lower
    improved = True
    while improved:  # fill the budget back up: the most useful raise that still fits
        improved, raises = False, []
        for kind in [k for k in "WA" if budget[k] is not None]:
            for n in names:
                higher = rung(kind, n, -1)
                if higher is None:
                    continue
                extra = weight[kind][n] * (higher - bits[kind][n]) / total[kind]
                if mean(kind) + extra <= budget[kind] + 1e-12:
                    gain = _interpolated(table, n, kind, bits[kind][n]) - _interpolated(table, n, kind, higher)
                    raises.append((gain / extra, kind, n, higher))
        if raises:
            _, kind, n, higher = max(raises, key=lambda m: m[0])
            bits[kind][n], improved = higher, True
    return {n: (bits["W"][n], bits["A"][n]) for n in names}  # budget_a None: activations stay at 8


def hutchinson_trace(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], blocks: Mapping[str, list[str]],
                     samples: int = 8, seed: int = 0) -> dict[str, float]:
    """Mean Hessian-trace per weight of each block, E[v^T H v] / n with Rademacher v (Hutchinson; HAWQ-V2/V3's
    sensitivity). `loss_fn(model)` returns the scalar task loss on a fixed batch."""
    modules = dict(model.named_modules())
    params = {b: [modules[layer].weight for layer in layers] for b, layers in blocks.items()}
    flat = [p for ps in params.values() for p in ps]
    saved = [p.requires_grad for p in flat]
    g = torch.Generator().manual_seed(seed)
    traces = {b: 0.0 for b in blocks}
    try:
        for p in flat:
            p.requires_grad_(True)
        model.eval()
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, flat, create_graph=True)
        for _ in range(samples):
            vs = [torch.randint(0, 2, p.shape, generator=g).float().mul_(2).sub_(1) for p in flat]
            hv = torch.autograd.grad(grads, flat, grad_outputs=vs, retain_graph=True)
            k = 0
            for b, ps in params.items():
                for _p in ps:
                    traces[b] += float((hv[k] * vs[k]).sum()) / samples
                    k += 1
    finally:
        for p, flag in zip(flat, saved):
            p.requires_grad_(flag)
    return {b: traces[b] / sum(p.numel() for p in params[b]) for b in blocks}


def hawq_omega(model: nn.Module, blocks: Mapping[str, list[str]], traces: Mapping[str, float], bits: Iterable[int],
               symmetric: bool = True) -> dict[tuple[str, int], float]:
    """HAWQ-V2's sensitivity Omega_k(b) = mean Hessian trace of block k x ||Q_b(W_k) - W_k||^2 (quant.py's weight
    quantizer)."""
    modules = dict(model.named_modules())
    out = {}
    for b in check_bit_list(bits):
        for name, layers in blocks.items():
            err = sum(float((quant.quantize_weight(modules[layer].weight, b, symmetric)[0] - modules[layer].weight.detach())
                            .pow(2).sum()) for layer in layers)
            out[(name, b)] = max(traces[name], 0.0) * err  # HAWQ assumes a PSD Hessian; a noisy negative estimate counts as flat
    return out


def hawq_v3(omega: Mapping[tuple[str, int], float], stats: dict, names: Iterable[str], budget_w: float,
            budget_a: float | None, choices: Iterable[int] = (2, 3, 4, 6, 8), tie_activations: bool = True,
            max_grid: int = 2_000_000) -> Allocation:
    """HAWQ-V3's allocation: minimise sum_k Omega_k(b_k) subject to the average-bit budgets, solved exactly by
    enumerating every assignment (HAWQ-V3 states it as an integer linear program; at a dozen blocks the grid is
    small). tie_activations: a block's activations take its weight bits (HAWQ-V3's W4A4/W8A8 pairing);
    otherwise activations stay at 8. Omega at 8 bits is taken as measured (or 0 if absent)."""
    check_budget(budget_w)
    check_budget(budget_a, "activation bit budget")
    names = check_block_names(stats["blocks"], names)
    choices = sorted(check_bit_list(choices, "choices"))
    if len(choices) ** len(names) > max_grid:
        raise MixedPrecisionError(f"{len(choices)}^{len(names)} assignments exceed max_grid={max_grid}; use fewer choices")
    grid = np.array(list(itertools.product(choices, repeat=len(names))), dtype=np.float64)
    params = np.array([stats["blocks"][n]["params"] for n in names], dtype=np.float64)
    elements = np.array([stats["blocks"][n]["elements"] for n in names], dtype=np.float64)
    cost = np.zeros(len(grid))
    for j, n in enumerate(names):
        table = np.array([omega.get((n, b), 0.0) for b in choices])
        cost += table[np.searchsorted(choices, grid[:, j])]
    ok = grid @ params / params.sum() <= budget_w + 1e-12
    if budget_a is not None:
        a_grid = grid if tie_activations else np.full_like(grid, 8.0)
        ok &= a_grid @ elements / elements.sum() <= budget_a + 1e-12
    if not ok.any():
        raise MixedPrecisionError(f"no assignment of {choices} meets W {budget_w} / A {budget_a}")
    w_mean = grid @ params / params.sum()
    # least Omega; among ties the one using most of the budget
    best = int(np.lexsort((-w_mean[ok], cost[ok]))[0])
    row = grid[ok][best].astype(int)
    return {n: (int(b), int(b) if tie_activations and budget_a is not None else 8) for n, b in zip(names, row)}


def random_allocation(stats: dict, names: Iterable[str], budget_w: float, budget_a: float | None, seed: int,
                      ladder: tuple[int, ...] = BIT_LADDER) -> Allocation:
    """Control: random rungs per block and kind, then random blocks one rung down until the budget is met, then
    random blocks one rung up while it still fits."""
    check_budget(budget_w)
    check_budget(budget_a, "activation bit budget")
    names = check_block_names(stats["blocks"], names)
    ladder = sorted(check_bit_list(ladder, "ladder"), reverse=True)
    rng = np.random.default_rng(seed)
    out = {}
    for kind, budget, key in (("W", budget_w, "params"), ("A", budget_a, "elements")):
        if budget is None:
            out[kind] = {n: 8 for n in names}
            continue
        weight = {n: stats["blocks"][n][key] for n in names}
        bits = {n: int(rng.choice(ladder)) for n in names}

        def mean():
            return sum(weight[n] * bits[n] for n in names) / sum(weight.values())
        while mean() > budget + 1e-12:
            n = names[int(rng.integers(len(names)))]
            if bits[n] > ladder[-1]:
                bits[n] = ladder[ladder.index(bits[n]) + 1]
        for n in rng.permutation(names):
            while bits[n] < 8:
                up = ladder[ladder.index(bits[n]) - 1]
                old, bits[n] = bits[n], up
                if mean() > budget + 1e-12:
                    bits[n] = old
                    break
        out[kind] = bits
    return {n: (out["W"][n], out["A"][n]) for n in names}


# --------------------------------------------------------------------------- QAT (straight-through)
class STEConv2d(nn.Conv2d):
    """Fake-quant conv for QAT: float latent weights re-quantized per output channel every forward (max range),
    the input quantized with the calibrated (fixed) range; torch's fake_quantize ops pass gradients straight
    through the rounding (zero outside the clipping range)."""

    @classmethod
    def from_quant(cls, float_conv: nn.Conv2d, qconv: quant.QuantConv2d) -> "STEConv2d":
        new = quant.trainable_conv_copy(cls, float_conv)
        new.w_bits, new.symmetric = qconv.w_bits, qconv.symmetric
        new.input_quantizer = copy.deepcopy(qconv.input_quantizer)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq = self.input_quantizer
        if iq is not None:
            qmin, qmax = quant.int_range(iq.bits, iq.symmetric)
            x = torch.fake_quantize_per_tensor_affine(x, iq.scale, iq.zero_point, qmin, qmax)
        flat = self.weight.detach().flatten(1)
        scale, zero_point = quant.qparams(flat.amin(1), flat.amax(1), self.w_bits, self.symmetric)
        w = quant.fake_quant_per_channel(self.weight, scale, zero_point, self.w_bits, self.symmetric)
        return self._conv_forward(x, w, self.bias)


def qat_student(float_model: nn.Module, qmodel: nn.Module) -> nn.Module:
    """A trainable copy of the calibrated `qmodel`: its QuantConv2d layers become STEConv2d with `float_model`'s
    weights (bits and activation ranges kept)."""
    student = copy.deepcopy(qmodel)
    floats = dict(float_model.named_modules())
    for name, layer in quant.quant_layers(qmodel).items():
        if not isinstance(layer, quant.QuantConv2d):
            raise MixedPrecisionError(f"QAT supports conv layers only; {name} is {type(layer).__name__}")
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, child, STEConv2d.from_quant(floats[name], layer))
    for p in student.parameters():
        p.requires_grad_(True)
    for name in ("mean", "std"):
        if isinstance(getattr(student, name, None), nn.Parameter):
            getattr(student, name).requires_grad_(False)
    return student


def to_quantized(student: nn.Module) -> nn.Module:
    """The trained student as a quant.py model (QuantConv2d with the trained weights quantized once, the same
    bits and activation ranges), for evaluation, sizes and `average_bits`."""
    q = copy.deepcopy(student)
    for name, m in list(q.named_modules()):
        if isinstance(m, STEConv2d):
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                              m.bias is not None)
            plain.weight, plain.bias = nn.Parameter(m.weight.detach()), None if m.bias is None else nn.Parameter(m.bias.detach())
            iq = m.input_quantizer
            new = quant.QuantConv2d.from_float(plain, m.w_bits, None if iq is None else iq.bits, m.symmetric, "max",
                                               **({} if iq is None else {"calibrator": iq.calibrator, "percentile": iq.percentile}))
            if iq is not None:
                new.input_quantizer.load_state_dict(iq.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(q.get_submodule(parent) if parent else q, child, new)
    for p in q.parameters():
        p.requires_grad_(False)
    return q.eval()


# --------------------------------------------------------------------------- the notebook's comparison
def floor_bits(budget: float) -> int:
    """The largest integer width not above a budget (uniform quantization at that budget)."""
    return max(quant.BIT_RANGE[0], int(math.floor(budget + 1e-12)))


def policy_allocations(levels: Mapping[str, tuple[int, str]], stats: dict, budget_w: float, budget_a: float | None,
                       tables: Mapping[str, Mapping], omega: Mapping[tuple[str, int], float], fixed: Allocation,
                       random_seeds: Iterable[int] = (0, 1), hawq_choices: Iterable[int] = (2, 3, 4, 6, 8)
                       ) -> dict[str, Allocation]:
    """Every policy at one budget over the blocks in `levels` ({block: (level, side)}); `fixed` blocks (stem,
    head: 8/8) are added unchanged and are not part of the budget. `tables`: {policy name: sensitivity table}
    for the greedy variants. budget_a=None: activations at 8 everywhere (weight-only mixed precision)."""
    check_budget(budget_w)
    check_budget(budget_a, "activation bit budget")
    names = check_block_names(stats["blocks"], levels)
    a_uniform = 8 if budget_a is None else floor_bits(budget_a)
    out = {"uniform": uniform(names, floor_bits(budget_w), a_uniform),
           "spmixq": spmixq_search(levels, stats, budget_w, budget_a)[0],
           "spmixq_reversed": spmixq_search(levels, stats, budget_w, budget_a, increasing=True)[0]}
    for name, table in tables.items():
        out[name] = greedy(table, stats, names, budget_w, budget_a)
    out["hawq_v3"] = hawq_v3(omega, stats, names, budget_w, budget_a, hawq_choices)
    for seed in random_seeds:
        out[f"random_{seed}"] = random_allocation(stats, names, budget_w, budget_a, seed)
    return {policy: {**dict(fixed), **alloc} for policy, alloc in out.items()}


def allocation_row(qmodel: nn.Module, stats: dict, scope: Iterable[str], allocation: Mapping) -> dict:
    """Averages measured on the quantized model, over the allocated blocks and over the whole model, and the bits."""
    inner, whole = average_bits(qmodel, stats, scope), average_bits(qmodel, stats)
    return {**inner, **{f"{k}_all": v for k, v in whole.items()},
            "bits": {b: [wb, ab] for b, (wb, ab) in allocation.items()}}


# --------------------------------------------------------------------------- the thermal RetinaNet
def detector_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Blocks of a torchvision RetinaNet: stem, C2..C5 (backbone stages), P3..P5 (FPN lateral + output conv of
    that level), P6P7 (extra levels), cls / box (the shared head towers) and out (the final cls/box convs)."""
    convs = [n for n, m in model.named_modules() if type(m) in quant.QUANT_LAYERS]
    prefixes = {"stem": ["backbone.body.conv1"], **{f"C{i + 2}": [f"backbone.body.layer{i + 1}."] for i in range(4)},
                **{f"P{i + 3}": [f"backbone.fpn.inner_blocks.{i}.", f"backbone.fpn.layer_blocks.{i}."] for i in range(3)},
                "P6P7": ["backbone.fpn.extra_blocks."], "cls": ["head.classification_head.conv."],
                "box": ["head.regression_head.conv."],
                "out": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]}
    out = {b: [c for c in convs if any(c == p or c.startswith(p) for p in ps)] for b, ps in prefixes.items()}
    left = [c for c in convs if not any(c in v for v in out.values())]
    if left or not all(out.values()):
        raise MixedPrecisionError(f"unexpected RetinaNet layout: unassigned layers {left[:5]}, empty blocks "
                                  f"{[b for b, v in out.items() if not v]}")
    return out


# SPMix-Q's symmetric map on the detector [I]: C_l (encoder) pairs with P_l (decoder) at the same stride; P6P7 is
# the deepest decoder level; the shared head towers sit at P3's level, where most of their compute runs.
DETECTOR_LEVELS = {"C2": (0, "encoder"), "C3": (1, "encoder"), "C4": (2, "encoder"), "C5": (3, "encoder"),
                   "P3": (1, "decoder"), "P4": (2, "decoder"), "P5": (3, "decoder"), "P6P7": (4, "decoder"),
                   "cls": (1, "decoder"), "box": (1, "decoder")}
DETECTOR_FIXED = {"stem": (8, 8), "out": (8, 8)}


def head_outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The RetinaNet head's raw outputs (class logits and box deltas, all anchors) on normalised images."""
    with torch.no_grad():
        features = list(model.backbone(images).values())
        out = model.head(features)
    return torch.cat([out["cls_logits"].flatten(1), out["bbox_regression"].flatten(1)], 1)


def detector_evaluator(val_set, distilled: torch.Tensor, reference: torch.Tensor, with_map: bool = True):
    """evaluate(qmodel) -> {"AP", "AP50" (on val_set, when with_map), "sqnr_db" and "nsr" (noise-to-signal ratio,
    the label-free discrepancy of the head outputs on distilled images)}."""
    from helpers import evaluate as ev

    def evaluate(qmodel: nn.Module) -> dict:
        out = head_outputs(qmodel, distilled)
        sqnr = sqnr_db(reference, out)
        row = {"sqnr_db": sqnr, "nsr": 10 ** (-sqnr / 10)}
        if with_map:
            m = ev.evaluate_detector(qmodel, val_set, progress=False)
            row.update({"AP": float(m["AP"]), "AP50": float(m["AP50"])})
        return row
    return evaluate


def detector_loss_fn(images: torch.Tensor, targets: list[dict]):
    """The detector's own training loss on a fixed normalised batch (for Hutchinson's Hessian traces)."""
    from helpers import task_zsq

    def loss(model: nn.Module) -> torch.Tensor:
        _, outputs, anchors = task_zsq.head_forward(model, images)
        return task_zsq.detection_loss(model, outputs, anchors, targets)
    return loss


class DetectorStudy:
    """Notebook 08's detector part: the same sensitivity and allocation on the fine-tuned thermal RetinaNet,
    weight bits only (activations at 8, as notebook 04's W8/W6/W4 settings). Sensitivity: one block at a time
    at low weight bits, the mAP drop on the first `val_limit` val images (real) and the head outputs'
    noise-to-signal ratio on distilled images (data-free). Policies are calibrated on one batch of distilled
    images (the bundle's zero-shot setting). Rows are stored; a complete step is read back without the model."""

    def __init__(self, run, detector, distilled_run, val_limit: int = 100, calib_batch: int = 8,
                 symmetric: bool = True, seed: int = 0):
        self.run, self.detector, self.distilled_run = run, detector, distilled_run
        self.val_limit, self.calib_batch, self.symmetric, self.seed = val_limit, calib_batch, symmetric, seed
        self._cache: dict = {}

    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def val_set(self):
        from helpers import upstream
        return self._get("val", lambda: upstream.validation_set(self.detector, self.val_limit))

    @property
    def model(self) -> nn.Module:
        from helpers import upstream
        return self._get("model", lambda: upstream.load_detector(self.detector, self.val_set.num_classes))

    @property
    def distilled(self) -> torch.Tensor:
        from helpers import upstream
        def build():
            by_iteration = upstream.load_distilled(self.distilled_run)
            return by_iteration[max(by_iteration)][:self.calib_batch].float()
        return self._get("distilled", build)

    @property
    def blocks(self) -> dict[str, list[str]]:
        return self._get("blocks", lambda: detector_blocks(self.model))

    @property
    def stats(self) -> dict:
        path = self.run.path("detector_stats.json")
        if path.exists():
            import json
            return json.loads(path.read_text())
        stats = block_stats(self.model, self.blocks, lambda m: quant._features_forward(m, [self.val_set[0][0]]))
        from helpers import runs
        runs.atomic_write_json(path, stats)
        return stats

    def evaluator(self, with_map: bool = True):
        reference = self._get("ref", lambda: head_outputs(self.model, self.distilled))
        return detector_evaluator(self.val_set, self.distilled, reference, with_map)

    def float_metrics(self) -> dict:
        from helpers import runs
        path = self.run.path("detector_float.json")
        if path.exists():
            import json
            return json.loads(path.read_text())
        from helpers import evaluate as ev
        m = ev.evaluate_detector(self.model, self.val_set, progress=False)
        out = {"AP": float(m["AP"]), "AP50": float(m["AP50"]), "val_images": len(self.val_set),
               "params": sum(p.numel() for p in self.model.parameters())}
        runs.atomic_write_json(path, out)
        return out

    def sensitivity(self, bits) -> list[dict]:
        from helpers import runs
        path = self.run.path("detector_sensitivity.jsonl")
        names = [b for b in DETECTOR_LEVELS] + list(DETECTOR_FIXED)
        expected = sensitivity_settings(self.stats["blocks"], names, bits, ("W",))
        rows = runs.read_jsonl(path) if path.exists() else []
        if {(r["block"], r["mode"], r["bits"]) for r in rows} >= set(expected):
            return rows
        return block_sensitivity(self.model, self.blocks, self.evaluator(), [], bits, ("W",), names=names, done=rows,
                                 on_row=lambda r: runs.append_jsonl(path, r), symmetric=self.symmetric)

    def hessian_traces(self, samples: int = 4, images: int = 4) -> dict[str, float]:
        from helpers import runs, task_zsq, upstream
        path = self.run.path("detector_hessian_traces.json")
        if path.exists():
            import json
            return json.loads(path.read_text())
        train = upstream.training_set(self.detector)
        batch = [train[i] for i in range(images)]
        x, targets = task_zsq.normalize_real(self.model, [b[0] for b in batch], [b[1] for b in batch])
        blocks = {b: self.blocks[b] for b in DETECTOR_LEVELS}
        traces = hutchinson_trace(self.model, detector_loss_fn(x, targets), blocks, samples, self.seed)
        runs.atomic_write_json(path, traces)
        return traces

    def policy_rows(self, budgets, uniform_bits, tables: dict, omega: dict, random_seeds=(0,),
                    ladder=(8, 6, 5, 4, 3), choices=(3, 4, 6, 8)) -> list[dict]:
        """Uniform W<b>A8 for each of `uniform_bits`, then every policy at each weight budget (activations 8)."""
        from helpers import runs
        path = self.run.path("detector_policies.jsonl")
        rows = runs.read_jsonl(path) if path.exists() else []
        done = {(r["budget"], r["policy"]) for r in rows}
        todo = [(float(b), "uniform", {**DETECTOR_FIXED, **uniform(DETECTOR_LEVELS, b, 8)}) for b in uniform_bits]
        for budget in budgets:
            allocs = policy_allocations(DETECTOR_LEVELS, self.stats, budget, None, {}, omega, DETECTOR_FIXED,
                                        random_seeds, hawq_choices=choices)
            allocs.pop("uniform")
            for name, table in tables.items():
                allocs[name] = {**DETECTOR_FIXED, **greedy(table, self.stats, list(DETECTOR_LEVELS), budget, None, ladder)}
            todo += [(float(budget), p, a) for p, a in allocs.items()]
        for budget, policy, alloc in todo:
            if (budget, policy) in done:
                continue
            q = quantize_allocation(self.model, self.blocks, alloc, symmetric=self.symmetric)
            calibrate_if_needed(q, [self.distilled], normalized=True)
            row = {"budget": budget, "policy": policy, **allocation_row(q, self.stats, DETECTOR_LEVELS, alloc),
                   **self.evaluator()(q)}
            runs.append_jsonl(path, row)
            rows.append(row)
            done.add((budget, policy))
        return rows


# --------------------------------------------------------------------------- notebook 08's tables and claims
STORED_ROWS = ("float.json", "sensitivity_real.jsonl", "sensitivity_distilled.jsonl", "hessian_traces.json", "policies.jsonl")
DETECTOR_ROWS = ("detector_float.json", "detector_stats.json", "detector_sensitivity.jsonl", "detector_policies.jsonl")


def check_budget_pairs(budgets, bits) -> list[tuple[float, float | None]]:
    """Every (weight, activation) budget and every bit width of the study, checked before any work."""
    check_bit_list(bits, "sensitivity bits")
    out = []
    for pair in budgets:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise MixedPrecisionError(f"a budget is a pair [weight bits, activation bits], got {pair!r}")
        out.append((check_budget(pair[0]), check_budget(pair[1], "activation bit budget")))
    return out


def stats_table(stats: dict):
    import pandas as pd
    frame = pd.DataFrame(stats["blocks"]).T[["params", "elements", "macs"]]
    frame["params_%"] = 100 * frame["params"] / frame["params"].sum()
    frame["elements_%"] = 100 * frame["elements"] / frame["elements"].sum()
    return frame.round(1)


def sensitivity_profile(real: list[dict], distilled: list[dict], fp_iou: float, levels: Mapping, bits: int):
    """Per block and mode at `bits`: IoU drop (real), sym. KL (real), sym. KL (distilled), with level and side."""
    import pandas as pd
    r = {(x["block"], x["mode"]): x for x in real if x["bits"] == bits}
    d = {(x["block"], x["mode"]): x for x in distilled if x["bits"] == bits}
    rows = []
    for (block, mode), x in r.items():
        level, side = levels.get(block, (0, block))
        rows.append({"block": block, "mode": mode, "side": side, "level": level, "IoU_drop": fp_iou - x["IoU"],
                     "kl_real": x["sym_kl"], "kl_distilled": d[(block, mode)]["sym_kl"] if (block, mode) in d else float("nan")})
    return pd.DataFrame(rows).set_index(["block", "mode"])


def profile_correlations(profile):
    """Rank correlations of the data-free profile (sym. KL on distilled images) with the real ones, per mode and pooled."""
    import pandas as pd
    out = []
    for mode, group in [("W+A", profile)] + list(profile.groupby(level="mode")):
        keyed = {f"{b}/{m}": row for (b, m), row in group.iterrows()}
        for real in ("IoU_drop", "kl_real"):
            c = rank_correlation({k: v["kl_distilled"] for k, v in keyed.items()}, {k: v[real] for k, v in keyed.items()})
            out.append({"mode": mode, "distilled vs": real, "spearman": c["spearman"], "kendall": c["kendall"], "n": c["blocks"]})
    return pd.DataFrame(out)


def group_means(profile, levels: Mapping) -> dict:
    """Mean IoU drop (both modes) of encoder vs decoder blocks at the levels they share, and shallow vs deep levels."""
    frame = profile.reset_index()
    frame = frame[frame["side"].isin(["encoder", "decoder"])]
    shared = set(frame[frame["side"] == "decoder"]["level"])
    enc = frame[(frame["side"] == "encoder") & frame["level"].isin(shared)]["IoU_drop"].mean()
    dec = frame[frame["side"] == "decoder"]["IoU_drop"].mean()
    deepest = frame["level"].max()
    return {"encoder": float(enc), "decoder": float(dec),
            "shallow (levels 0-1)": float(frame[frame["level"] <= 1]["IoU_drop"].mean()),
            "deep (levels >= 2)": float(frame[frame["level"] >= 2]["IoU_drop"].mean()),
            "stem": float(profile.reset_index().query("block == 'stem'")["IoU_drop"].mean()),
            "deepest level": int(deepest)}


def policy_table(rows: list[dict]):
    import pandas as pd
    frame = pd.DataFrame(rows)
    frame["budget"] = frame["budget"].map(lambda b: f"W{b[0]}/A{b[1]}")
    frame["Pd"], frame["Fa_1e6"] = frame["Pd"], frame["Fa"] * 1e6
    return frame[["budget", "policy", "stage", "w_bits", "a_bits", "a_bits_block", "size_kib", "IoU", "nIoU", "Pd", "Fa_1e6"]
                 ].rename(columns={"w_bits": "w_avg", "a_bits": "a_elem", "a_bits_block": "a_blk"})


def bits_table(rows: list[dict], budget) -> "object":
    import pandas as pd
    chosen = {r["policy"]: {b: f"{w}/{a}" for b, (w, a) in r["bits"].items()} for r in rows
              if list(r["budget"]) == list(budget) and r["stage"] == "ptq"}
    return pd.DataFrame(chosen).T


# The paper's headline numbers (abstract, research page section 1) and the only FP reference at hand (DNANet's README).
PAPER_HEADLINE = {"w_avg": 2.42, "a_avg": 3.82, "size_ratio": 13.0, "memory_ratio": 4.6, "compute_ratio": 29.0}
DNANET_FP = {"NUAA-SIRST": {"IoU": 0.7747, "Pd": 0.9848, "Fa_1e6": 2.353}, "NUDT-SIRST": {"IoU": 0.8709, "Pd": 0.9873, "Fa_1e6": 4.223}}


def paper_table(table, fp: dict, budget=(2.42, 3.82)):
    """Paper vs ours at the paper's operating point `budget` (after QAT when run, else PTQ): its averages
    (abstract); its IoU/nIoU/Pd/Fa are n/a."""
    import pandas as pd
    ours = table[(table["policy"] == "spmixq") & (table["budget"] == f"W{budget[0]}/A{budget[1]}")]
    best = ours.sort_values("stage").iloc[-1] if len(ours) else None  # "qat" sorts after "ptq"
    rows = [{"quantity": "SPMix-Q average weight bits", "paper": PAPER_HEADLINE["w_avg"], "ours": None if best is None else round(best["w_avg"], 2)},
            {"quantity": "SPMix-Q average activation bits", "paper": PAPER_HEADLINE["a_avg"],
             "ours": None if best is None else f"{best['a_elem']:.2f} (element-weighted), {best['a_blk']:.2f} (block mean)"},
            {"quantity": "model size vs FP32", "paper": "1/13", "ours": None if best is None else f"1/{32 / best['w_avg']:.1f}"},
            {"quantity": "IoU / nIoU / Pd / Fa, FP vs SPMix-Q vs uniform", "paper": "n/a (tables not in sources)",
             "ours": f"FP IoU {fp['IoU']:.3f}, nIoU {fp['nIoU']:.3f}, Pd {fp['Pd']:.3f}, Fa {fp['Fa'] * 1e6:.1f}e-6"},
            {"quantity": f"SPMix-Q IoU / nIoU / Pd / Fa at W{budget[0]}/A{budget[1]}", "paper": "n/a (tables not in sources)",
             "ours": None if best is None else f"{best['stage']}: IoU {best['IoU']:.3f}, nIoU {best['nIoU']:.3f}, Pd {best['Pd']:.3f}, Fa {best['Fa_1e6']:.1f}e-6"},
            {"quantity": "FP reference (DNANet-ResNet-18, NUAA-SIRST; not SPMix-Q)", "paper": "IoU 0.775, Pd 0.985, Fa 2.35e-6",
             "ours": "synthetic set, not comparable"}]
    return pd.DataFrame(rows)


def detector_profile(rows: list[dict], fp: dict):
    import pandas as pd
    frame = pd.DataFrame([{"block": r["block"], "bits": r["bits"], "AP_drop": fp["AP"] - r["AP"], "AP50_drop": fp["AP50"] - r["AP50"],
                           "nsr_distilled": r["nsr"], "sqnr_db_distilled": r["sqnr_db"]} for r in rows])
    return frame[frame["bits"] == frame["bits"].min()].set_index("block")


def detector_table(rows: list[dict]):
    import pandas as pd
    frame = pd.DataFrame(rows)
    return frame[["budget", "policy", "w_bits", "w_bits_all", "size_kib_all", "AP", "AP50", "sqnr_db"]].rename(
        columns={"w_bits": "w_avg", "w_bits_all": "w_avg_all", "size_kib_all": "size_kib"})


def _verdict(ok: bool, direction: bool) -> str:
    return "holds" if ok else ("direction only" if direction else "does not hold")


def spmixq_claims(profile, ranks, table, fp: dict, levels: Mapping, det_table=None, min_gap: float = 0.01,
                  much_better: float = 0.05, comparable: float = 0.10):
    """The paper's claims as explicit rules (effect sizes in the docstring of notebook 08, section 6)."""
    import pandas as pd
    from scipy import stats
    frame = profile.reset_index()
    inner = frame[frame["side"].isin(["encoder", "decoder"])]
    rho = float(stats.spearmanr(inner["level"], inner["IoU_drop"])[0])
    shallow, deep = inner[inner["level"] <= 1]["IoU_drop"].mean(), inner[inner["level"] >= 2]["IoU_drop"].mean()
    enc = inner[(inner["side"] == "encoder") & inner["level"].isin(set(inner[inner["side"] == "decoder"]["level"]))]["IoU_drop"].mean()
    dec = inner[inner["side"] == "decoder"]["IoU_drop"].mean()
    out = [{"claim": "shallow blocks more sensitive than deep", "paper": "observed (no numbers)",
            "ours": f"rho(level, IoU drop) {rho:.2f}; shallow {shallow:.3f} vs deep {deep:.3f}",
            "verdict": _verdict(rho <= -0.5 and shallow - deep >= min_gap, shallow > deep)},
           {"claim": "encoder more sensitive than decoder", "paper": "observed (no numbers)",
            "ours": f"encoder {enc:.3f} vs decoder {dec:.3f} IoU drop", "verdict": _verdict(enc - dec >= min_gap, enc > dec)}]
    pooled = ranks[(ranks["mode"] == "W+A") & (ranks["distilled vs"] == "IoU_drop")]["spearman"].iloc[0]
    out.append({"claim": "data-free sensitivity ranks blocks like real data (ours, not the paper's)", "paper": "n/a",
                "ours": f"Spearman {pooled:.2f}", "verdict": _verdict(pooled >= 0.5, pooled > 0)})
    for (budget, stage), g in table.groupby(["budget", "stage"], sort=False):
        by = g.set_index("policy")
        if "spmixq" not in by.index or "uniform" not in by.index:
            continue
        gap = by.loc["spmixq", "IoU"] - by.loc["uniform", "IoU"]
        randoms = g[g["policy"].str.startswith("random")]["IoU"]
        spread = float(randoms.max() - randoms.min()) if len(randoms) > 1 else 0.0
        out.append({"claim": f"SPMix-Q much better IoU than uniform ({budget}, {stage})", "paper": "much better (no numbers)",
                    "ours": f"gap {gap:+.3f} IoU (random spread {spread:.3f})",
                    "verdict": _verdict(gap >= much_better and gap > spread, gap > 0)})
        rel = (fp["IoU"] - by.loc["spmixq", "IoU"]) / fp["IoU"]
        out.append({"claim": f"SPMix-Q comparable to FP ({budget}, {stage})", "paper": "comparable at W2.42/A3.82",
                    "ours": f"IoU {by.loc['spmixq', 'IoU']:.3f} vs FP {fp['IoU']:.3f} ({100 * rel:.0f} % lower)",
                    "verdict": _verdict(rel <= comparable, rel <= 2 * comparable)})
        if "spmixq_reversed" in by.index:
            rgap = by.loc["spmixq", "IoU"] - by.loc["spmixq_reversed", "IoU"]
            out.append({"claim": f"decreasing schedule beats the reversed one ({budget}, {stage})", "paper": "implied",
                        "ours": f"gap {rgap:+.3f} IoU", "verdict": _verdict(rgap >= min_gap, rgap > 0)})
    if det_table is not None:
        for budget, g in det_table[det_table["policy"] != "uniform"].groupby("budget"):
            by = g.set_index("policy")
            if "spmixq" not in by.index:
                continue
            own = by.loc["spmixq", "w_avg"]  # compared with the widest uniform point that spends no more bits than SPMix-Q did
            uni = det_table[(det_table["policy"] == "uniform") & (det_table["w_avg"] <= own + 1e-9)]
            if len(uni):
                ref = uni.sort_values("w_avg").iloc[-1]
                gap = 100 * (by.loc["spmixq", "AP"] - ref["AP"])
                out.append({"claim": f"detector: SPMix-Q (W{own:.2f}, budget {budget:g}) above uniform W{ref['w_avg']:g}",
                            "paper": "n/a (segmentation paper)", "ours": f"gap {gap:+.1f} mAP points",
                            "verdict": _verdict(gap >= 0.5, gap > 0)})
    return pd.DataFrame(out)


def json_safe(obj):
    """NaN and inf become None (a rank correlation of a constant profile, Pd without targets), so metrics.json
    stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
