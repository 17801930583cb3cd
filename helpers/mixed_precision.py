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
FLOAT_BITS = 32
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
            "a_bits_block": float(np.mean([n / d for n, d in block_a.values()])), "size_kib": w_num / 8 / 1024}


def allocation_bits(allocation: Mapping[str, tuple[int, int | None]], stats: dict) -> dict:
    """The same averages from a declared allocation over its blocks (used inside the searches; tests check it
    equals `average_bits` of the quantized model)."""
    w = sum(stats["blocks"][b]["params"] * wb for b, (wb, _) in allocation.items())
    a = sum(stats["blocks"][b]["elements"] * (FLOAT_BITS if ab is None else ab) for b, (_, ab) in allocation.items())
    params = sum(stats["blocks"][b]["params"] for b in allocation)
    elements = sum(stats["blocks"][b]["elements"] for b in allocation)
    return {"w_bits": w / params, "a_bits": a / elements,
            "a_bits_block": float(np.mean([FLOAT_BITS if ab is None else ab for _, ab in allocation.values()])),
            "size_kib": w / 8 / 1024}


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
            out[(name, b)] = traces[name] * err
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
        new = torch.nn.utils.skip_init(cls, float_conv.in_channels, float_conv.out_channels, float_conv.kernel_size,
                                       stride=float_conv.stride, padding=float_conv.padding, dilation=float_conv.dilation,
                                       groups=float_conv.groups, bias=float_conv.bias is not None,
                                       padding_mode=float_conv.padding_mode, device=float_conv.weight.device)
        new.weight = nn.Parameter(float_conv.weight.detach().clone())
        new.bias = None if float_conv.bias is None else nn.Parameter(float_conv.bias.detach().clone())
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
