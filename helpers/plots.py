"""The paper's tables and figures, drawn only from stored results: `python -m helpers.plots [--batch tiny]`.

What a batch stored is read by `helpers.store` (`store.load(batch)` gives a `Stored` bundle: the
comparison run of notebook 06 with the rows it compared and stored, the 03 loss curves and
previews, the 05 DF-MPC run); the seed verdicts and claims over seeds are `helpers.verdicts`'.
Nothing is recomputed; the only arithmetic is arranging stored numbers (mAP is in the paper's
points already in the rows notebook 06 stored, `helpers.compare.collect_rows`).

The paper's own numbers come from `references/papers.yaml` and are always shown beside ours
with both sides named: ours with the batch's profile (`tiny`: a small RetinaNet on synthetic data,
on a CPU), the paper's as "paper (RetinaNet-R50-FPN, ...)", so that nobody takes a tiny-scale
number for a paper-scale one.

Layout: one function per artifact turns a `Stored` bundle into a DataFrame (tables; `*_data`
functions give the numbers behind a figure) or a matplotlib Figure; `save` / `save_table` write
PNG + PDF / CSV + Markdown with stable bytes (no dates, no software versions) through `runs`'
atomic writer, so regenerating unchanged results changes no file. `ARTIFACTS` lists every artifact
by its file name, which follows the paper (`table1_map`, `fig3_ptq_vs_zsq`). Figures are plain
`matplotlib.figure.Figure` objects, not pyplot figures: no global state, nothing to close, and a
notebook shows one by displaying it (after `%matplotlib inline`).
"""
from __future__ import annotations

import argparse
import functools
import io
import sys
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from helpers import compare, runs, store, verdicts
from helpers.store import DFMPC_NOTEBOOK, MissingResults, Stored

PAPER_MODEL = "RetinaNet-R50-FPN"   # the paper's detector (section 4.1.2: torchvision RetinaNet v2, ResNet-50-FPN)
SETTING = compare.PAPER_SETTING     # the paper's bit setting, W8A8
STAGES = ("pretrain", "finetune")
STAGE_LABEL = {"pretrain": "pretrained detector (RGB)", "finetune": "fine-tuned detector (thermal)"}
FIG2_PANEL = {"pretrain": ("a", "c", "pretrained"), "finetune": ("b", "d", "finetuned")}
SOURCE_ORDER = ("real", "distilled mean", "distilled mean+std", "distilled mean (unclamped)", "gaussian")
SOURCE_LABEL = {"real": "real images\n(PTQ)", "distilled mean": "distilled, mean\n(ZSQ, paper's)",
                "distilled mean+std": "distilled,\nmean+std", "distilled mean (unclamped)": "distilled, mean,\nunclamped",
                "gaussian": "Gaussian\nnoise N(0, 1)"}
LOSS_SOURCE = {"mean": "distilled mean", "mean+std": "distilled mean+std"}
PNG_DPI = 200


# --------------------------------------------------------------------------- one style
def style_rc() -> dict:
    """The one style of every figure: seaborn's white grid at paper size, colour-blind palette, embedded TrueType."""
    import seaborn as sns
    from cycler import cycler
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15)}
    rc.update({"axes.prop_cycle": cycler(color=sns.color_palette("colorblind")), "font.family": "DejaVu Sans",
               "pdf.fonttype": 42, "ps.fonttype": 42, "legend.frameon": False, "axes.titleweight": "bold",
               "figure.titleweight": "bold", "figure.dpi": 100, "savefig.dpi": PNG_DPI, "image.interpolation": "nearest"})
    return rc


def source_colour(source: str):
    import seaborn as sns
    palette = sns.color_palette("colorblind")
    return palette[SOURCE_ORDER.index(source) if source in SOURCE_ORDER else len(SOURCE_ORDER)]


def styled(fn: Callable) -> Callable:
    """Draw inside the one style (fonts and colours are fixed when an artist is created)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(style_rc()):
            return fn(*args, **kwargs)
    return wrapper


def paper() -> dict:
    return compare.paper_reference()


def _paper_name(stage: str) -> str:
    return f"paper ({PAPER_MODEL}, {paper()['table1'][stage]['dataset']})"


# --------------------------------------------------------------------------- tables
def _evaluation_data(stored: Stored, stage: str) -> str:
    params = stored.detectors.get(stage, {})
    return f"{params.get('DATASET', '?')} val ({params.get('DATA_ROOT', '?')})"


def table1(stored: Stored) -> pd.DataFrame:
    """Table 1: FP32 and W8A8 zero-shot mAP and model size of both detectors, ours beside the paper's.

    Our values are notebook 06's stored `table1` (W8-A8: mean over calibration batches of distilled
    images, mean-only loss); the paper's come from `references/papers.yaml`.
    """
    rows = stored.need("comparison").get("table1") or []
    if not rows:
        raise MissingResults("the comparison run stored an empty Table 1 (no detector had both FP32 and W8A8 rows)")
    p, ref = stored.profile, paper()["table1"]
    out = pd.DataFrame([{
        "model": f"{'pretrained' if r['model'] == 'pretrain' else 'fine-tuned'} RetinaNet",
        f"evaluation data ({p})": _evaluation_data(stored, r["model"]),
        "evaluation data (paper)": ref[r["model"]]["dataset"],
        "precision": r["precision"],
        f"mAP ({p})": r["mAP"], f"mAP std over batches ({p})": r.get("mAP_std"),
        f"mAP min over batches ({p})": r.get("mAP_min"), f"calibration batches ({p})": r.get("batches"),
        f"size MiB ({p})": r["size_MiB"],
        "mAP (paper, reported)": r["paper_mAP"], "size MB (paper, reported)": r["paper_size_MB"]} for r in rows])
    batches = f"calibration batches ({p})"
    out[batches] = out[batches].astype("Int64")
    return out


def table_sources_bits(stored: Stored) -> pd.DataFrame:
    """Every calibration source at every bit setting and detector: mAP mean, std, min, max over batches (notebook 06's `spread`)."""
    spread = pd.DataFrame(stored.need("comparison").get("spread") or [])
    if spread.empty:
        raise MissingResults("the comparison run stored no spread table")
    spread = spread[["stage", "source", "setting", "mean", "std", "min", "max", "count"]]
    return spread.rename(columns={c: f"mAP {c} ({stored.profile})" for c in ("mean", "std", "min", "max")}
                         | {"count": "batches"})


def table_calibrators(stored: Stored) -> pd.DataFrame:
    """Notebook 06, section 8.1: mAP per activation calibrator and calibration source at the probe setting,
    over the same batches (mean, std, batches) and the first layer's calibrated clipping value."""
    table = pd.DataFrame(stored.need("comparison").get("calibrators") or [])
    if table.empty:
        raise MissingResults("the comparison run stored no calibrator probe (notebook 06, section 8)")
    return table[["calibrator", "source", "mean", "std", "count", "first_layer_amax"]].rename(
        columns={"mean": f"mAP mean ({stored.profile})", "std": f"mAP std ({stored.profile})", "count": "batches"})


def table_claims(stored: Stored) -> pd.DataFrame:
    """The paper's claims, its number, ours and whether the claim holds by the stated rule (notebook 06's `claims`)."""
    claims = pd.DataFrame(stored.need("comparison").get("claims") or [])
    if claims.empty:
        raise MissingResults("the comparison run stored no claims")
    return claims


def _comparison_table(stored: Stored, key: str, what: str) -> pd.DataFrame:
    table = pd.DataFrame(stored.need("comparison").get(key) or [])
    if table.empty:
        raise MissingResults(f"the comparison run stored no {what}")
    return table


def table_noise_variants(stored: Stored) -> pd.DataFrame:
    """Notebook 06, section 9: every reading of "Gaussian noise" against zero-shot calibration, and whether it collapses."""
    return _comparison_table(stored, "noise_variants", "noise variants (notebook 06, section 9)")


def table_schemes(stored: Stored) -> pd.DataFrame:
    """Notebook 06, section 10: symmetric (TensorRT's) against asymmetric (the paper's Formula 1) quantization."""
    return _comparison_table(stored, "schemes", "scheme comparison (notebook 06, section 10)")


def table_export(stored: Stored) -> pd.DataFrame:
    """Notebook 09: the exported int8 detector in onnxruntime beside the PyTorch models (AP, int8 convs, size)."""
    from helpers import export
    return export.summary_table(store.newest_run(stored.batch, "09_export_onnx").metrics())


def table_onnx_speed(stored: Stored) -> pd.DataFrame:
    """`make benchmarks`' export result (results/benchmarks/onnx.json): int8 against FP32 in onnxruntime, by model,
    part and threads. A benchmark of the machine it ran on, not of the batch."""
    from helpers import export
    return export.benchmark_table(store.benchmark("onnx"))


def _task_zsq_run(stored: Stored) -> runs.Run:
    return store.newest_run(stored.batch, "07_task_specific_zsq")


def table_task_zsq(stored: Stored) -> pd.DataFrame:
    """Notebook 07: mAP mean +- std over seeds per convention, method and bit setting, FP32 row first."""
    from helpers import task_zsq_figures
    return task_zsq_figures.stored_comparison_table(_task_zsq_run(stored).id)


def fig_task_zsq_map_vs_bits(stored: Stored):
    """Notebook 07: mAP against bit setting per method with the seed spread, one panel per convention."""
    from helpers import task_zsq_figures
    return task_zsq_figures.stored_map_vs_bits(_task_zsq_run(stored).id)


def table_task_zsq_claims(stored: Stored) -> pd.DataFrame:
    """Notebook 07's claims of the task-specific ZSQ paper: cell, the paper's effect, ours, the rule, the verdict."""
    return _stored_claims(_task_zsq_run(stored), ["claim", "cell", "paper", "ours", "rule", "verdict"])


def _stored_claims(run: runs.Run, columns: list[str]) -> pd.DataFrame:
    """The claims a companion-paper notebook stored in its metrics, as a table."""
    claims = run.metrics().get("claims")
    if not claims:
        raise MissingResults(f"the {run.notebook} run {run.id} stored no claims")
    return pd.DataFrame(claims)[columns]


def _spmixq_run(stored: Stored) -> runs.Run:
    return store.newest_run(stored.batch, "08_mixed_precision_spmixq")


def fig_spmixq_sensitivity(stored: Stored) -> Figure:
    """Notebook 08: the U-Net's per-block sensitivity, real images against BN-distilled ones."""
    from helpers import spmixq_figures
    return spmixq_figures.sensitivity_figure(spmixq_figures.sensitivity_data(_spmixq_run(stored)))


def table_spmixq_sensitivity(stored: Stored) -> pd.DataFrame:
    from helpers import spmixq_figures
    return spmixq_figures.sensitivity_data(_spmixq_run(stored))


def fig_spmixq_pareto(stored: Stored) -> Figure:
    """Notebook 08: mAP (detector) and IoU (segmenter) against measured average weight bits, every policy."""
    from helpers import spmixq_figures
    return spmixq_figures.pareto_figure(spmixq_figures.pareto_data(_spmixq_run(stored)))


def table_spmixq_pareto(stored: Stored, part: str) -> pd.DataFrame:
    from helpers import spmixq_figures
    data = spmixq_figures.pareto_data(_spmixq_run(stored))
    if part not in data:
        raise MissingResults(f"the 08 run of batch {stored.batch!r} stored no {part} policies")
    return data[part]


def table_spmixq_claims(stored: Stored) -> pd.DataFrame:
    """Notebook 08's claims of the SPMix-Q paper with our measurement and verdict, as the run stored them."""
    return _stored_claims(_spmixq_run(stored), ["claim", "paper", "ours", "verdict"])


DFMPC_COLUMNS = ("part", "setting", "top1", "AP", "AP50", "size_mb", "mean_c", "sd_c")


def dfmpc_table(stored: Stored) -> pd.DataFrame:
    """DF-MPC results of notebook 05: per part (classifier, detector) its Table 1/2 rows, then its
    data-fit rows (c fitted on data: a diagnostic, not DF-MPC), as stored. The reading columns come
    first (setting, metrics, size, c); the headline "metric" column, a copy of top1 / AP, is dropped."""
    metrics = stored.need("dfmpc")
    frames = []
    for part in ("classifier", "detector"):
        stored_part = metrics.get(part) or {}
        rows = (stored_part.get("rows") or []) + (stored_part.get("data_fit") or [])
        if rows:
            frames.append(pd.DataFrame(rows).assign(part=part))
    if not frames:
        raise MissingResults(f"the {DFMPC_NOTEBOOK} run stored no classifier or detector rows")
    table = pd.concat(frames, ignore_index=True)
    if any(c in table.columns for c in ("top1", "AP")):
        table = table.drop(columns="metric", errors="ignore")
    first = [c for c in DFMPC_COLUMNS if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def dfmpc_ablation_data(stored: Stored, which: str = "lambda1") -> pd.DataFrame:
    """The stored lambda ablation of notebook 05: one row per lambda value."""
    rows = (stored.need("dfmpc").get("ablation") or {}).get(which) or []
    if not rows:
        raise MissingResults(f"the {DFMPC_NOTEBOOK} run stored no {which} ablation")
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- Fig. 2a/2b
def fig2_sweep_data(stored: Stored, stage: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. 2a/2b data: (per-batch W8A8 mAP of distilled calibration at each distillation iteration,
    stored mean/std/count per iteration), for the mean-only and mean+std losses (clamped images)."""
    rows = stored.need("rows")
    sources = list(LOSS_SOURCE.values())
    points = rows[(rows["stage"] == stage) & (rows["setting"] == SETTING) & rows["source"].isin(sources)
                  & rows["iteration"].notna()]
    points = points[["source", "iteration", "batch", "mAP"]].astype({"iteration": int}).sort_values(
        ["source", "iteration", "batch"]).reset_index(drop=True)
    sweep = pd.DataFrame(stored.need("comparison").get("sweep") or [], columns=["stage", "source", "iteration", "mean", "std", "count"])
    sweep = sweep[(sweep["stage"] == stage) & sweep["source"].isin(sources)].drop(columns="stage")
    if points.empty or sweep.empty:
        raise MissingResults(f"no iteration sweep of the {stage} detector at {SETTING} was stored "
                             "(a distilled 04 run of that stage with SWEEP_ITERATIONS)")
    return points, sweep.astype({"iteration": int}).sort_values(["source", "iteration"]).reset_index(drop=True)


def _paper_note(fig, text: str) -> None:
    """The paper's numbers under the figure, boxed and named (a figure-level label, so the layout makes room for it)."""
    fig.supxlabel(text, x=0.01, ha="left", fontsize="small", color="0.25", linespacing=1.4,
                  bbox={"boxstyle": "round,pad=0.4", "facecolor": "0.95", "edgecolor": "0.75"})


def _legend(fig, ax) -> None:
    """Legend to the right of the axes (constrained layout makes room for it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", borderaxespad=0)


@styled
def fig2_map_vs_iterations(stored: Stored, stage: str):
    """Fig. 2a (pretrained) / 2b (fine-tuned): W8A8 mAP against distillation iterations, mean-only vs mean+std loss.

    Dots are single calibration batches (slightly offset per loss so they do not hide each other),
    lines the stored means with a +-1 std band; horizontal lines give FP32, PTQ (real images) and
    Gaussian-noise calibration of the same detector where stored.
    """
    points, sweep = fig2_sweep_data(stored, stage)
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    span = max(points["iteration"].max(), 1)
    for k, source in enumerate(s for s in LOSS_SOURCE.values() if s in set(sweep["source"])):
        colour, loss = source_colour(source), source.split(" ", 1)[1]
        line = sweep[sweep["source"] == source]
        std = line["std"].fillna(0.0)
        ax.fill_between(line["iteration"], line["mean"] - std, line["mean"] + std, color=colour, alpha=0.15, lw=0)
        ax.plot(line["iteration"], line["mean"], "o-", color=colour, lw=2, ms=5, label=f"{loss} loss: mean over batches")
        dots = points[points["source"] == source]
        ax.scatter(dots["iteration"] + (k - 0.5) * 0.012 * span, dots["mAP"], s=14, color=colour, alpha=0.6,
                   edgecolor="none", label=f"{loss} loss: one calibration batch")
    references = [("FP32 (no quantization)", stored.fp32(stage), "0.2", "-"),
                  (f"{SETTING}, real images (PTQ)", stored.spread_value(stage, "real"), source_colour("real"), "--"),
                  (f"{SETTING}, Gaussian noise", stored.spread_value(stage, "gaussian"), source_colour("gaussian"), ":")]
    for label, value, colour, style in references:
        if value is not None:
            ax.axhline(value, color=colour, ls=style, lw=1.3, label=f"{label}: {value:.2f}")
    ax.set_xlabel("distillation iterations")
    ax.set_ylabel(f"{SETTING} mAP@[.5:.95] (points)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Fig. 2{FIG2_PANEL[stage][0]}: {STAGE_LABEL[stage]}, {SETTING} mAP vs distillation iterations\n"
                 f"[{stored.ours}]", fontsize="medium")
    _legend(fig, ax)
    ref = paper()
    _paper_note(fig, f"{_paper_name(stage)}, reported: FP32 {ref['table1'][stage]['fp32_map']}, {SETTING} zero-shot "
                     f"(mean loss) {ref['table1'][stage]['w8a8_map']}, Gaussian noise {ref['gaussian_w8a8_map'][stage]} mAP;\n"
                     f"{'mean-only' if ref['mean_only_better'] else 'mean+std'} loss gives the better quantized mAP "
                     f"(curve values not reported).")
    return fig


# --------------------------------------------------------------------------- Fig. 2c/2d
def fig2_loss_data(stored: Stored, stage: str) -> pd.DataFrame:
    """Fig. 2c/2d data: the stored distillation loss per iteration (mean over images) of each loss kind (clamped runs)."""
    frames = []
    for d in stored.need("distillation"):
        if d["stage"] == stage and d["clamp"] and d["curves"] is not None:
            c = d["curves"]
            frames.append(pd.DataFrame({"loss_kind": d["loss"], "iteration": c["iteration"], "loss": c["loss"],
                                        "mean_term": c["mean_term"], "std_term": c["std_term"], "lr": c["lr"]}))
    if not frames:
        raise MissingResults(f"no loss curves of the {stage} detector were stored (03 runs with CLAMP true)")
    return pd.concat(frames, ignore_index=True)


def fig2_loss_summary(stored: Stored, stage: str) -> pd.DataFrame:
    """The stored loss at the first and the last iteration of each loss kind (what Fig. 2c/2d start and end at)."""
    data = fig2_loss_data(stored, stage)
    ends = data.groupby("loss_kind", sort=False).agg(iterations=("iteration", "size"), first_loss=("loss", "first"),
                                                     last_loss=("loss", "last"), last_mean_term=("mean_term", "last"))
    return ends.reset_index()


@styled
def fig2_loss(stored: Stored, stage: str):
    """Fig. 2c (pretrained) / 2d (fine-tuned): distillation loss against iterations, log scale.

    Solid: the loss each run optimised; dashed: the mean term alone of the mean+std run (the part
    comparable with the mean-only loss); dotted verticals: where mean+std divides its lr by 5.
    """
    data = fig2_loss_data(stored, stage)
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for loss_kind in ("mean", "mean+std"):
        curve = data[data["loss_kind"] == loss_kind]
        if curve.empty:
            continue
        colour = source_colour(LOSS_SOURCE[loss_kind])
        ax.plot(curve["iteration"], curve["loss"], color=colour, lw=2, label=f"{loss_kind} loss (optimised)")
        if loss_kind == "mean+std":
            ax.plot(curve["iteration"], curve["mean_term"], "--", color=colour, lw=1.5, label="mean+std run: its mean term")
            drops = curve["iteration"].to_numpy()[1:][np.diff(curve["lr"].to_numpy()) < 0]
            for k, step in enumerate(drops):
                ax.axvline(step, color="0.5", ls=":", lw=1, label="mean+std run: lr lowered" if k == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("distillation iterations")
    ax.set_ylabel("BN-statistics loss (log scale)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Fig. 2{FIG2_PANEL[stage][1]}: {STAGE_LABEL[stage]}, loss during distillation (mean over images)\n"
                 f"[{stored.ours}]", fontsize="medium")
    _legend(fig, ax)
    milestones = " and ".join(map(str, paper()["distillation"]["mean_std_lr_milestones"]))
    _paper_note(fig, f"{_paper_name(stage)}: loss curves drawn in its Fig. 2{FIG2_PANEL[stage][1]}, values not reported;\n"
                     f"its mean+std runs divide the lr by 5 at iterations {milestones}.")
    return fig


# --------------------------------------------------------------------------- Fig. 3
def fig3_data(stored: Stored, stage: str = "finetune") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. 3 data: (W8A8 mAP of every calibration batch per source, final images only; the stored
    mean/std/min/max/count per source), sources in a fixed order, PTQ (real) and ZSQ (distilled mean) first."""
    rows = stored.need("rows")
    points = rows[(rows["stage"] == stage) & (rows["setting"] == SETTING) & rows["final"]]
    order = [s for s in SOURCE_ORDER if s in set(points["source"])] + sorted(set(points["source"]) - set(SOURCE_ORDER))
    if not order:
        raise MissingResults(f"no {SETTING} rows of the {stage} detector were stored")
    points = points.assign(source=pd.Categorical(points["source"], order, ordered=True))
    points = points[["source", "batch", "mAP"]].sort_values(["source", "batch"]).reset_index(drop=True)
    points["source"] = points["source"].astype(str)
    stats = pd.DataFrame(stored.need("comparison").get("spread") or [])
    stats = stats[(stats["stage"] == stage) & (stats["setting"] == SETTING)].set_index("source").loc[order].reset_index()
    return points, stats[["source", "mean", "std", "min", "max", "count"]]


@styled
def fig3_ptq_vs_zsq(stored: Stored, stage: str = "finetune"):
    """Fig. 3: W8A8 mAP of each calibration batch, real training images (PTQ) vs distilled images (ZSQ), with the other sources.

    Box: quartiles over batches; dots: single batches (spread sideways by rank, no random jitter);
    white diamond: the stored mean; under each source its stored mean, min, std and batch count.
    """
    points, stats = fig3_data(stored, stage)
    order = list(stats["source"])
    fig = Figure(figsize=(max(5.0, 1.35 * len(order) + 2.6), 4.6), layout="constrained")
    ax = fig.subplots()
    values = [points.loc[points["source"] == s, "mAP"].to_numpy() for s in order]
    boxes = ax.boxplot(values, positions=range(len(order)), widths=0.5, patch_artist=True, showfliers=False,
                       medianprops={"color": "0.15"}, whiskerprops={"color": "0.4"}, capprops={"color": "0.4"})
    for patch, source in zip(boxes["boxes"], order):
        patch.set(facecolor=(*source_colour(source), 0.25), edgecolor=source_colour(source))
    for i, (source, v) in enumerate(zip(order, values)):
        rank = np.argsort(np.argsort(v, kind="stable"), kind="stable")
        offsets = (rank / max(len(v) - 1, 1) - 0.5) * 0.3 if len(v) > 1 else np.zeros(len(v))
        ax.scatter(i + offsets, v, s=18, color=source_colour(source), edgecolor="white", linewidth=0.4, zorder=3)
    ax.scatter(range(len(order)), stats["mean"], marker="D", s=40, color="white", edgecolor="0.1", zorder=4,
               label="mean over batches")
    ax.plot([], [], "o", ms=4.5, color="0.45", label="one calibration batch")
    labels = [f"{SOURCE_LABEL.get(r['source'], r['source'])}\n\nmean {r['mean']:.2f}\nmin {r['min']:.2f}\n"
              f"std {r['std']:.2f}\nn = {int(r['count'])}" for _, r in stats.iterrows()]
    ax.set_xticks(range(len(order)), labels, fontsize="small")
    ax.set_xlim(-0.6, len(order) - 0.4)
    sizes = sorted({p.get("CALIB_BATCH") for p in stored.calibration.values()} - {None})
    ax.set_xlabel(f"calibration data: batches of {'/'.join(map(str, sizes)) or '?'} images, each calibrated and evaluated on its own")
    ax.set_ylabel(f"{SETTING} mAP@[.5:.95] (points)")
    fig.suptitle(f"Fig. 3: {STAGE_LABEL[stage]}, {SETTING}, PTQ vs zero-shot calibration per batch\n[{stored.ours}]",
                 fontsize="medium")
    _legend(fig, ax)
    ref = paper()["fig3"]
    _paper_note(fig, f"{_paper_name(stage)}, reported: PTQ (batches of {ref['batch']} consecutive training images) mean {ref['ptq_mean']}, min {ref['ptq_min']};\nZSQ ({ref['distilled_images']} distilled "
                     f"images, {ref['distilled_images'] // ref['batch']} batches) mean {ref['zsq_mean']}; "
                     f"ZSQ spread smaller than PTQ's: {ref['zsq_spread_smaller']}.")
    return fig


# --------------------------------------------------------------------------- Fig. 4
def fig4_data(stored: Stored, loss: str = "mean") -> dict[str, dict]:
    """Fig. 4 data per stage (mean-only loss, clamped): {"images": {iteration: uint8 (n, H, W, 3)}, "channel_spread": {iteration: value}}."""
    out = {}
    for d in stored.need("distillation"):
        if d["loss"] == loss and d["clamp"] and d["preview"]:
            out[d["stage"]] = {"images": d["preview"],
                               "channel_spread": {int(k): v["channel_spread"] for k, v in d["pixel_statistics"].items()}}
    if not out:
        raise MissingResults("no distilled-image previews (preview.npz of 03 runs with CLAMP true) were stored")
    return {s: out[s] for s in STAGES if s in out}


def fig4_summary(stored: Stored, loss: str = "mean") -> pd.DataFrame:
    """Channel spread of the distilled images (03 runs' metrics) per stage (rows) and snapshot iteration (columns)."""
    data = fig4_data(stored, loss)
    return pd.DataFrame({stage: d["channel_spread"] for stage, d in data.items()}).T.rename_axis("stage")


@styled
def fig4_distilled_images(stored: Stored, loss: str = "mean"):
    """Fig. 4: the first distilled images of each detector at several iterations (rows), side by side (a) pretrained, (b) fine-tuned.

    The channel spread (mean |pixel - its gray value|, 0 for a gray image; from the 03 run's
    metrics) is printed per row: the paper finds the fine-tuned model's images close to gray.
    """
    data = fig4_data(stored, loss)
    iterations = sorted({it for d in data.values() for it in d["images"]})
    n = max(d["images"][it].shape[0] for d in data.values() for it in d["images"])
    h, w = next(iter(next(iter(data.values()))["images"].values())).shape[1:3]
    cell = 1.05
    fig = Figure(figsize=(len(data) * (n * cell * w / h + 0.5) + 0.3, len(iterations) * cell + 1.5), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(1, len(data), wspace=0.03))
    for sub, (stage, d) in zip(subfigs, data.items()):
        axes = sub.subplots(len(iterations), n, squeeze=False)
        for row, it in zip(axes, iterations):
            images = d["images"].get(it)
            for j, ax in enumerate(row):
                ax.set_xticks([])
                ax.set_yticks([])
                if images is not None and j < len(images):
                    ax.imshow(images[j])
                else:
                    ax.set_axis_off()
            spread = d["channel_spread"].get(it)
            row[0].set_ylabel(f"iter {it}" + ("" if spread is None else f"\nspread {spread:.3f}"), fontsize="small")
        sub.suptitle(f"({'ab'[STAGES.index(stage)]}) {STAGE_LABEL[stage]}", fontsize="medium")
    fig.suptitle(f"Fig. 4: distilled images ({loss} loss), the first {n} at several iterations\n[{stored.ours}]",
                 fontsize="medium")
    gray = "close to gray" if paper()["finetune_images_gray"] else "coloured"
    _paper_note(fig, f"Row labels: distillation iteration and channel spread (mean |pixel - its gray value|, 0 for gray).\n"
                     f"paper ({PAPER_MODEL}): the fine-tuned (thermal) model's distilled images are {gray}, the pretrained model's coloured.")
    return fig


# --------------------------------------------------------------------------- extra: bit settings
def fig_sources_bits_data(stored: Stored, stage: str = "finetune") -> pd.DataFrame:
    """Stored mean/std/count of mAP per source and bit setting for one detector (final images)."""
    spread = pd.DataFrame(stored.need("comparison").get("spread") or [])
    part = spread[(spread["stage"] == stage) & spread["source"].isin(SOURCE_ORDER)] if not spread.empty else spread
    if part.empty or part["setting"].nunique() < 2:
        raise MissingResults(f"fewer than two bit settings of the {stage} detector were stored")
    return part[["source", "setting", "mean", "std", "min", "max", "count"]].reset_index(drop=True)


@styled
def fig_sources_bits(stored: Stored, stage: str = "finetune"):
    """Beyond the paper: mAP of every calibration source at every bit setting (mean +- std over batches),
    to show where (at which bit width) the sources separate."""
    data = fig_sources_bits_data(stored, stage)
    settings = list(dict.fromkeys(data["setting"]))
    sources = [s for s in SOURCE_ORDER if s in set(data["source"])] + sorted(set(data["source"]) - set(SOURCE_ORDER))
    fig = Figure(figsize=(7.0, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(sources)
    for k, source in enumerate(sources):
        part = data[data["source"] == source].set_index("setting")
        xs = [settings.index(s) + (k - (len(sources) - 1) / 2) * width for s in part.index]
        ax.errorbar(xs, part["mean"], yerr=part["std"], fmt="o", ms=5, capsize=3, color=source_colour(source),
                    label=SOURCE_LABEL.get(source, source).replace("\n", " "))
    fp32 = stored.fp32(stage)
    if fp32 is not None:
        ax.axhline(fp32, color="0.2", lw=1.2, label=f"FP32: {fp32:.2f}")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel("bit setting (W: weight bits, A: activation bits)")
    ax.set_ylabel("mAP@[.5:.95] (points)")
    fig.suptitle(f"Calibration sources at each bit setting, {STAGE_LABEL[stage]}\n[{stored.ours}]", fontsize="medium")
    _legend(fig, ax)
    _paper_note(fig, f"Not in the paper, which reports {SETTING} only. Dots: mean over calibration batches; bars: $\\pm$ 1 std.")
    return fig


# --------------------------------------------------------------------------- DF-MPC ablation
def _dfmpc_label(rows: list[dict], low_bits, mode: str = "dfmpc") -> str:
    """The stored setting label of (`low_bits`, `mode`) in `rows` (e.g. "DF-MPC 2/6 (TWN)"), else a plain one."""
    for r in rows:
        if str(r.get("low_bits")) == str(low_bits) and r.get("mode") == mode and r.get("setting"):
            return r["setting"]
    return f"{'DF-MPC' if mode == 'dfmpc' else mode} {low_bits}"


@styled
def fig_dfmpc_lambda(stored: Stored, which: str = "lambda1"):
    """DF-MPC ablation (notebook 05, on its classifier): the stored metric against lambda1 or lambda2, one
    line per low bit width, with that width's naive (c = 1) result dashed and FP32 dotted where stored,
    and the paper's choice of lambda marked."""
    metrics = stored.need("dfmpc")
    data = dfmpc_ablation_data(stored, which)
    symbol = f"$\\lambda_{which[-1]}$" if which[-1].isdigit() else which
    x = which if which in data.columns else next((c for c in data.columns if "lambda" in c.lower()), data.columns[0])
    groups = [c for c in data.columns if c != x and not pd.api.types.is_numeric_dtype(data[c])]
    values = [c for c in data.select_dtypes("number").columns if c != x and "lambda" not in c.lower()]
    classifier = metrics.get("classifier") or {}
    rows = classifier.get("rows") or []
    model = classifier.get("model")
    fig = Figure(figsize=(7.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for metric in values:
        parts = data.groupby(groups, sort=False) if groups else [((), data)]
        for key, part in parts:
            key = key if isinstance(key, tuple) else (key,)
            low = key[0] if "low_bits" in groups else None
            label = _dfmpc_label(rows, low) if low is not None else ", ".join([metric, *map(str, key)])
            part = part.sort_values(x)
            (line,) = ax.plot(part[x], part[metric], "o-", ms=4, label=label)
            naive = [r[metric] for r in rows if r.get("mode") == "naive" and str(r.get("low_bits")) == str(low) and metric in r]
            if low is not None and naive:
                ax.axhline(naive[0], color=line.get_color(), ls="--", lw=1.2,
                           label=f"{_dfmpc_label(rows, low, 'naive')} (c = 1)")
    fp32 = [r[values[0]] for r in rows if r.get("mode") == "fp32" and values and values[0] in r]
    if fp32:
        ax.axhline(fp32[0], color="0.2", ls=":", lw=1.2, label="FP32")
    paper = (metrics.get("paper_reference") or {}).get(which)
    if isinstance(paper, (int, float)):
        ax.axvline(paper, color="0.6", lw=6, alpha=0.3, zorder=0, label=f"paper's choice ({symbol} = {paper:g})")
    ax.set_xlabel(symbol)
    ylabel = {"top1": "top-1 accuracy"}.get(values[0], values[0]) if len(values) == 1 else "metric"
    ax.set_ylabel(f"{ylabel}, classifier" if model is None else f"{ylabel}\n(classifier: {model})")
    ours = f"ours: profile {stored.profile}" + (f", classifier {model}" if model else "")
    fig.suptitle(f"DF-MPC ablation of {symbol} (weights only, activations FP32)\n[{ours}]", fontsize="medium")
    if ax.get_legend_handles_labels()[0]:
        _legend(fig, ax)
    return fig


# --------------------------------------------------------------------------- writing
def output_dir(path: str | Path = "results/figures") -> Path:
    """Where figures go. A relative path starting with 'results' lands in the results directory
    (which `IRZSQ_RESULTS_DIR` redirects); other relative paths are relative to the project root."""
    path = Path(path)
    if path.is_absolute():
        return path
    if path.parts and path.parts[0] == "results":
        return runs.results_dir().joinpath(*path.parts[1:])
    return runs.ROOT / path


def display_path(path: Path) -> str:
    """A path as a notebook may print it: relative to the project root, or to the results directory's parent."""
    for base in (runs.ROOT, runs.results_dir().parent):
        try:
            return str(Path(path).relative_to(base))
        except ValueError:
            continue
    return Path(path).name


def _write_bytes(path: Path, data: bytes) -> Path:
    """`runs.atomic_write_bytes`, leaving an unchanged file untouched (same bytes: same mtime, no git noise)."""
    path = Path(path)
    if path.exists() and path.read_bytes() == data:
        return path
    return runs.atomic_write_bytes(path, data)


def save(fig, name: str, out_dir: str | Path = "results/figures") -> list[Path]:
    """Write `name`.png and `name`.pdf with stable metadata (no dates, no versions): same figure, same bytes."""
    out = output_dir(out_dir)
    written = []
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None, "Producer": None,
                                                    "Creator": "irzsq helpers.plots"}}
    with matplotlib.rc_context(style_rc()):
        for fmt in ("png", "pdf"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=PNG_DPI, bbox_inches="tight", metadata=metadata[fmt])
            written.append(_write_bytes(out / f"{name}.{fmt}", buffer.getvalue()))
    return written


def markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub Markdown table (floats rounded to `digits`, missing values blank)."""
    def cell(v):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def save_table(table: pd.DataFrame, name: str, out_dir: str | Path = "results/figures", caption: str = "",
               digits: int = 2) -> list[Path]:
    """Write `name`.csv (values as stored) and `name`.md (caption, then the table rounded to `digits` for reading)."""
    out = output_dir(out_dir)
    csv = table.to_csv(index=False, lineterminator="\n")
    md = (f"{caption}\n\n" if caption else "") + markdown(table, digits)
    return [_write_bytes(out / f"{name}.csv", csv.encode()), _write_bytes(out / f"{name}.md", md.encode())]


# --------------------------------------------------------------------------- every artifact
def _caption(title: str, stored: Stored, name: str = "") -> str:
    if name in TABLE_NOTES:
        return f"**{title}** Ours: profile {stored.profile}, batch `{stored.batch}`. {TABLE_NOTES[name]}"
    return (f"**{title}** Ours: profile {stored.profile} ({stored.arch}), batch `{stored.batch}`; mAP in points (COCO mAP@[.5:.95] x 100). "
            f"Paper columns: {PAPER_MODEL} as reported (`references/papers.yaml`).")


# tables whose caption is not the generic one (their own units, no paper columns), and their Markdown digits
TABLE_NOTES = {
    "dfmpc_table": "Weights only, activations FP32. top1 (classifier) and AP / AP50 (detector, COCO mAP, only its "
                   "ResNet body quantized) are fractions in [0, 1], as notebook 05 prints them; size_mb in MiB (the "
                   "quantized part); mean_c / sd_c: the applied compensation (c = 1 for naive). \"data-fit c\" rows fit "
                   "c on data: a diagnostic, not DF-MPC. The paper's numbers: `helpers.dfmpc.PAPER_REFERENCE`.",
}
TABLE_NOTES["table_export"] = ("AP is COCO mAP as a fraction; int8_convs: convs onnxruntime runs as int8 kernels in its "
                               "optimized graph; MB: the ONNX file; measured by notebook 09 (speed: results/benchmarks/onnx.json).")
TABLE_NOTES["table_onnx_speed"] = (
    "Measured on the CPU named in onnx.json (`cpu`, with its load average), batch 1, at 1 and 2 onnxruntime threads, "
    "rounds interleaved; int8 = onnxruntime's Q/DQ placement carrying our calibrated scales; speed = ORT FP32 time "
    "over int8 time. The paper detector has random weights (norm layers randomised): sizes and kernel speed depend "
    "on the architecture, not on the values. A goal counts as met only if both ratios reach it.")
TABLE_NOTES["table_task_zsq"] = (
    "Notebook 07, tiny thermal detector on the first 100 val images: COCO mAP in points, mean +- std over the 5 "
    "calibration / synthesis seeds (n = rows); toolkit: first conv and detection head float, whole: every conv "
    "quantized; QAT only in the cells where a PTQ method loses at least 1 point (the notebook says why).")
TABLE_NOTES["table_task_zsq_claims"] = (
    "Notebook 07's rules (`task_zsq`, the effect rule of notebook 06: at least a third of the paper's relative "
    "effect and beyond the seed spread, else 'direction only' when the sign agrees); effects as shares of mAP.")
TABLE_NOTES["table_spmixq_claims"] = (
    "Notebook 08's rules (`mixed_precision.spmixq_claims`), IoU as a fraction: 'much better' needs a gap of at least "
    "0.05 IoU and beyond the spread of the random allocations; 'comparable to FP' at most 10 % below FP (20 %: "
    "direction only); other gaps at least 0.01 IoU (detector: 0.5 mAP points); else 'direction only' when the sign "
    "agrees. The paper prints no numbers for these here (its tables were not reachable).")
TABLE_NOTES["table_spmixq_sensitivity"] = (
    "Notebook 08, one U-Net block quantized at a time at the lowest studied width; IoU_drop in IoU fractions "
    "(real images), kl_real / kl_distilled: symmetric KL of the outputs to the FP32 model on real / BN-distilled images.")
TABLE_NOTES["table_spmixq_pareto_detector"] = (
    "Notebook 08, thermal RetinaNet at A8: AP / AP50 as fractions; w_avg: parameter-weighted average weight bits "
    "measured on the quantized model.")
TABLE_NOTES["table_spmixq_pareto_segmenter"] = (
    "Notebook 08, U-Net on the SIRST-like set: IoU as a fraction, after calibration (ptq) and after the short QAT; "
    "w_avg / a_avg: parameter- / element-weighted average bits measured on the quantized model.")
TABLE_DIGITS = {"dfmpc_table": 4, "table_export": 3, "table_spmixq_sensitivity": 3, "table_spmixq_pareto_detector": 3,
                "table_spmixq_pareto_segmenter": 3}


ARTIFACTS: dict[str, tuple[str, Callable[[Stored], object], str]] = {
    # name: (kind, builder, caption for tables)
    "table1_map": ("table", table1, "Table 1: FP32 vs W8A8 zero-shot quantization, both detectors."),
    "table_sources_bits": ("table", table_sources_bits, "Every calibration source at every bit setting."),
    "table_claims": ("table", table_claims, "The paper's claims and ours."),
    "table_calibrators_w8a4": ("table", table_calibrators, "The range rule at W8A4: every activation calibrator with every "
                               "source, fine-tuned detector, same batches."),
    "table_noise_variants": ("table", table_noise_variants, "Which reading of \"Gaussian noise\" collapses calibration "
                             "(fine-tuned detector; gap_share: the gap to zero-shot as a share of its mAP, paper 0.385)."),
    "table_schemes": ("table", table_schemes, "Symmetric against asymmetric (the paper's Formula 1) quantization, "
                      "fine-tuned detector, 4 batches per cell."),
    "table_export": ("table", table_export, "Deployable int8 (notebook 09): the W8A8 detector exported to ONNX and run in "
                     "onnxruntime; AP as a fraction on the first 100 val images."),
    "table_onnx_speed": ("table", table_onnx_speed, "Deployable int8, speed and size (`python -m tools.benchmarks_onnx`, "
                         "results/benchmarks/onnx.json)."),
    "fig2a_map_vs_iterations_pretrained": ("figure", lambda s: fig2_map_vs_iterations(s, "pretrain"), ""),
    "fig2b_map_vs_iterations_finetuned": ("figure", lambda s: fig2_map_vs_iterations(s, "finetune"), ""),
    "fig2c_loss_pretrained": ("figure", lambda s: fig2_loss(s, "pretrain"), ""),
    "fig2d_loss_finetuned": ("figure", lambda s: fig2_loss(s, "finetune"), ""),
    "fig3_ptq_vs_zsq": ("figure", fig3_ptq_vs_zsq, ""),
    "fig4_distilled_images": ("figure", fig4_distilled_images, ""),
    "fig_sources_bits": ("figure", fig_sources_bits, ""),
    "dfmpc_table": ("table", dfmpc_table, "DF-MPC (notebook 05): classifier and detector."),
    "fig_dfmpc_lambda1": ("figure", lambda s: fig_dfmpc_lambda(s, "lambda1"), ""),
    "fig_dfmpc_lambda2": ("figure", lambda s: fig_dfmpc_lambda(s, "lambda2"), ""),
    "table_task_zsq": ("table", table_task_zsq, "Task-specific zero-shot quantization (notebook 07): PTQ and zero-shot "
                       "QAT on real, task-agnostic (notebook 03) and task-specific synthetic images."),
    "fig_task_zsq_map_vs_bits": ("figure", fig_task_zsq_map_vs_bits, ""),
    "table_task_zsq_claims": ("table", table_task_zsq_claims, "The task-specific ZSQ paper's claims and ours (notebook 07)."),
    "table_spmixq_claims": ("table", table_spmixq_claims, "SPMix-Q's claims and ours (notebook 08)."),
    "fig_spmixq_sensitivity": ("figure", fig_spmixq_sensitivity, ""),
    "table_spmixq_sensitivity": ("table", table_spmixq_sensitivity, "SPMix-Q per-block sensitivity (notebook 08)."),
    "fig_spmixq_pareto": ("figure", fig_spmixq_pareto, ""),
    "table_spmixq_pareto_detector": ("table", lambda s: table_spmixq_pareto(s, "detector"),
                                     "SPMix-Q policies on the thermal detector (notebook 08)."),
    "table_spmixq_pareto_segmenter": ("table", lambda s: table_spmixq_pareto(s, "segmenter"),
                                      "SPMix-Q policies on the U-Net (notebook 08)."),
}


def make(name: str, stored: Stored, out_dir: str | Path = "results/figures"):
    """Build artifact `name` from the stored results and write its files; returns (DataFrame or Figure, written paths).

    Raises MissingResults when the batch did not store what it needs.
    """
    kind, build, caption = ARTIFACTS[name]
    obj = build(stored)
    if kind == "table":
        return obj, save_table(obj, name, out_dir, _caption(caption, stored, name), TABLE_DIGITS.get(name, 2))
    return obj, save(obj, name, out_dir)


RESULTS_PAGE_EXTRA = ("table_claims_seeds", "table_seeds")  # written by `--seeds` (`make seeds-table`)


def results_page(report: dict[str, list[Path] | str], out_dir: str | Path = "results/figures") -> Path:
    """`results/RESULTS.md`: every table the figures step wrote (its Markdown, captions included) and a link
    to every figure, in artifact order, then the seed tables when stored. Generated from stored results
    only, so the numbers the README points to cannot go stale."""
    out_dir = output_dir(out_dir)
    lines = ["# Results (generated by `make figures` from the stored results; do not edit)", ""]
    for name, written in report.items():
        if isinstance(written, str):
            lines += [f"- `{name}`: {written}", ""]
            continue
        md = out_dir / f"{name}.md"
        if md.exists():
            lines += [f"## {name}", "", md.read_text().strip(), ""]
        else:
            png = next((p for p in written if str(p).endswith(".png")), None)
            if png is not None:
                lines += [f"## {name}", "", f"![{name}](figures/{Path(png).name})", ""]
    for name in RESULTS_PAGE_EXTRA:
        md = out_dir / f"{name}.md"
        if md.exists():
            lines += [f"## {name}", "", md.read_text().strip(), ""]
    text = "\n".join(lines).rstrip() + "\n"
    return _write_bytes(out_dir.parent / "RESULTS.md", text.encode())


# the README's findings, pasted between the markers by `make figures` / `make seeds-table`: the core paper's
# claims over the seeds in full (what the README must state), the other tables as one generated line each
# pointing to results/RESULTS.md, where they stand in full
FINDINGS = {"table_claims_seeds": "The core paper's claims over the seed batches"}
FINDINGS_SUMMARIES = {"table_task_zsq_claims": "Task-specific ZSQ (companion paper 3, notebook 07, 5 seeds)",
                      "table_spmixq_claims": "SPMix-Q (companion paper 4, notebook 08, seed 0)",
                      "table_onnx_speed": "Deployable int8 (notebook 09, `results/benchmarks/onnx.json`)"}
FINDINGS_START, FINDINGS_END = "<!-- findings: generated by `make figures` from results/figures; do not edit -->", \
    "<!-- end of findings -->"
VERDICT_ORDER = ("holds", "direction only", "does not hold")


def summary_line(name: str, table: pd.DataFrame) -> str:
    """One sentence from a stored table: its verdict counts (claim tables) or, for the speed table, the rows
    that meet the 2x goal and the range of file-size ratios; the table itself is in RESULTS.md."""
    where = f"(`{name}` in `results/RESULTS.md`)"
    if "verdict" in table:
        counts = table["verdict"].value_counts()
        order = [v for v in VERDICT_ORDER if v in counts] + sorted(set(counts.index) - set(VERDICT_ORDER))
        held = [f"{r.claim} ({r.cell})" if "cell" in table else r.claim
                for r in table[table["verdict"] == "holds"].itertuples()]
        return (f"{len(table)} claims: " + ", ".join(f"{v} {counts[v]}" for v in order)
                + (f". Holds: {'; '.join(held)}" if held else "") + f" {where}.")
    goal = table["speed >= 2x"].astype(str) == "True"
    missed = [f"{r.model} {r.part} at {r.threads} thread{'s' if int(r.threads) > 1 else ''}"
              for r in table[~goal].itertuples()]
    return (f"int8 at least 2x faster than onnxruntime FP32 (best-of and paired median) in {int(goal.sum())} of "
            f"{len(table)} rows" + (f", not for the {', '.join(missed)}" if missed else "")
            + f"; files {table['size ratio'].min():.2f}-{table['size ratio'].max():.2f}x smaller; measured on "
            + ", ".join(sorted(set(table["cpu"]))) + f" {where}.")


def findings_block(out_dir: str | Path = "results/figures") -> str:
    """The README's findings section body from the stored tables (captions state the rules)."""
    out_dir = output_dir(out_dir)
    parts = [FINDINGS_START]
    for name, title in FINDINGS.items():
        md = out_dir / f"{name}.md"
        parts += [f"### {title}", "", md.read_text().strip() if md.exists() else f"(`{name}` not stored yet)", ""]
    for name, title in FINDINGS_SUMMARIES.items():
        csv = out_dir / f"{name}.csv"
        line = summary_line(name, pd.read_csv(csv)) if csv.exists() else f"`{name}` not stored yet."
        parts += [f"- **{title}.** {line}"]
    return "\n".join(parts + ["", FINDINGS_END])


def update_readme_findings(readme: Path | None = None, out_dir: str | Path = "results/figures") -> Path | None:
    """Replace the README's findings block with `findings_block()`. Without `readme`, only figures in the project's
    own results/figures update the project's README (a redirected results tree, as in tests and smoke runs, does
    not); None when nothing is updated or the README has no markers."""
    if readme is None:
        if output_dir(out_dir).resolve() != (runs.ROOT / "results" / "figures").resolve():
            return None
        readme = runs.ROOT / "README.md"
    text = readme.read_text()
    start, end = text.find(FINDINGS_START), text.find(FINDINGS_END)
    if start < 0 or end < start:
        return None
    updated = text[:start] + findings_block(out_dir) + text[end + len(FINDINGS_END):]
    return _write_bytes(readme, updated.encode()) if updated != text else readme


def make_all(stored: Stored, out_dir: str | Path = "results/figures") -> dict[str, list[Path] | str]:
    """Every artifact the batch has results for: name -> written paths, or the reason it was skipped."""
    report = {}
    for name in ARTIFACTS:
        try:
            report[name] = make(name, stored, out_dir)[1]
        except MissingResults as why:
            report[name] = f"skipped: {why}"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="tiny", help="manifest batch name (default: tiny)")
    parser.add_argument("--out", default="results/figures", help="output folder (default: results/figures)")
    parser.add_argument("--seeds", nargs="*", metavar="BATCH",
                        help="instead: the verdicts of these batches (default: verdicts.SEED_BATCHES) side by side "
                             "-> table_seeds.{csv,md}, table_claims_seeds.{csv,md}")
    args = parser.parse_args(argv)
    if args.seeds is not None:
        args.seeds = args.seeds or list(verdicts.SEED_BATCHES)
        try:
            table = verdicts.table_seeds([store.load(b) for b in args.seeds])
        except MissingResults as err:
            print(f"figures: {err}", file=sys.stderr)
            return 1
        caption = (f"**The tiny verdicts batch by batch** ({', '.join(f'`{b}`' for b in args.seeds)}): each column "
                   "read from that batch's stored notebook 06 and 05 metrics; mAP in points, fine-tuned detector "
                   "unless named, W8A8 over 8 batches, W8A4 calibrators over 4.")
        print("table_seeds:", ", ".join(display_path(p) for p in save_table(table, "table_seeds", args.out, caption)))
        over = verdicts.table_claims_over_seeds([store.load(b) for b in args.seeds])
        caption = (f"**The core paper's claims over the seed batches** ({', '.join(f'`{b}`' for b in args.seeds)}): "
                   f"effects as shares of mAP; 'holds' needs at least {compare.EFFECT_SHARE:.2g} of the paper's "
                   "relative effect and a gap beyond the spread (notebook 06's rules).")
        print("table_claims_seeds:", ", ".join(display_path(p) for p in
                                             save_table(over, "table_claims_seeds", args.out, caption)))
        update_readme_findings(out_dir=args.out)
        return 0
    try:
        stored = store.load(args.batch)
    except MissingResults as err:
        print(f"figures: {err}", file=sys.stderr)
        return 1
    report = make_all(stored, args.out)
    report["RESULTS.md"] = [results_page(report, args.out)]
    readme = update_readme_findings(out_dir=args.out)
    if readme is not None:
        report["README.md findings"] = [readme]
    for name, result in report.items():
        print(f"{name}: {result}" if isinstance(result, str) else f"{name}: {', '.join(display_path(p) for p in result)}")
    return 0 if any(not isinstance(r, str) for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
