"""Figures and tables of notebook 07 (task-specific ZSQ), drawn from stored results only."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helpers import runs

METHOD_ORDER = ("ptq_real", "ptq_agnostic", "ptq_specific", "qat_agnostic", "qat_specific", "qat_real")
SETTING_ORDER = ("W8A8", "W6A6", "W4A8", "W4A4")


def load_rows(run_id: str | None = None, **match) -> tuple[list[dict], dict]:
    """(rows.jsonl, metrics.json) of the newest finished 07 run matching `match`."""
    run = runs.find_run("07_task_specific_zsq", run_id, **match)
    return runs.read_jsonl(run.path("rows.jsonl")), run.metrics()


def comparison_table(rows: list[dict], fp32_ap: float) -> pd.DataFrame:
    """AP mean ± std (points) per (convention, method) x setting, FP32 as its own row."""
    frame = pd.DataFrame(rows)
    stats = frame.groupby(["convention", "method", "setting"])["AP"].agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [f"{100 * m:.1f} ± {100 * s:.1f} (n={n})" for m, s, n in zip(stats["mean"], stats["std"], stats["count"])]
    table = stats.pivot(index=["convention", "method"], columns="setting", values="cell")
    table = table[[s for s in SETTING_ORDER if s in table.columns]]
    order = [(c, m) for c in ("toolkit", "whole") for m in METHOD_ORDER if (c, m) in table.index]
    table = table.loc[order].fillna("-").reset_index()
    fp32 = {"convention": "-", "method": "fp32", **{s: f"{100 * fp32_ap:.1f}" for s in table.columns[2:]}}
    return pd.concat([pd.DataFrame([fp32]), table], ignore_index=True)


def stored_comparison_table(run_id: str | None = None, **match) -> pd.DataFrame:
    """The comparison table (AP mean ± std per method and setting, FP32 row) of a finished 07 run, from its stored rows."""
    rows, metrics = load_rows(run_id, **match)
    return comparison_table(rows, metrics["fp32"]["AP"])


def stored_map_vs_bits(run_id: str | None = None, **match):
    """mAP against bit setting per method (seed spread) of a finished 07 run, from its stored rows."""
    rows, metrics = load_rows(run_id, **match)
    return map_vs_bits(rows, metrics["fp32"]["AP"])


def map_vs_bits_data(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame.groupby(["convention", "method", "setting"])["AP"].agg(["mean", "std", "min", "max"]).reset_index()


def map_vs_bits(rows: list[dict], fp32_ap: float):
    """mAP against bit setting per method, one panel per convention; bars = seed std, dots = seeds."""
    data = map_vs_bits_data(rows)
    frame = pd.DataFrame(rows)
    conventions = [c for c in ("toolkit", "whole") if c in set(data["convention"])]
    fig, axes = plt.subplots(1, len(conventions), figsize=(5 * len(conventions), 3.6), sharey=True, squeeze=False)
    settings = [s for s in SETTING_ORDER if s in set(data["setting"])]
    for ax, convention in zip(axes[0], conventions):
        for k, method in enumerate(m for m in METHOD_ORDER if m in set(data["method"])):
            part = data[(data.convention == convention) & (data.method == method)].set_index("setting").reindex(settings)
            xs = np.arange(len(settings)) + (k - 2.5) * 0.08
            ax.errorbar(xs, 100 * part["mean"], yerr=100 * part["std"].fillna(0), marker="o", ms=4, capsize=2,
                        label=method, linestyle="-" if method.startswith("qat") else "--")
            pts = frame[(frame.convention == convention) & (frame.method == method)]
            ax.scatter(xs[[settings.index(s) for s in pts.setting]], 100 * pts.AP, s=4, alpha=0.4, color="k")
        ax.axhline(100 * fp32_ap, color="grey", lw=0.8, label="FP32")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title({"toolkit": "toolkit convention (first conv + head float)", "whole": "whole network quantized"}[convention],
                     fontsize=9)
        ax.set_xlabel("bit setting")
    axes[0][0].set_ylabel("COCO mAP (points), thermal val")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_boxes(ax, image: np.ndarray, targets: dict, detections: dict | None = None, score: float = 0.3) -> None:
    """An image (H, W, 3 in [0, 1]) with its sampled boxes (solid) and the detector's detections (dashed)."""
    ax.imshow(image)
    for (x0, y0, x1, y1), label in zip(targets["boxes"].tolist(), targets["labels"].tolist()):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=f"C{label}", lw=1.2))
    if detections is not None:
        keep = detections["scores"] > score
        for x0, y0, x1, y1 in detections["boxes"][keep].tolist():
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="w", lw=0.8, ls="--"))
    ax.axis("off")


def images_with_boxes(pixels: np.ndarray, targets: list[dict], detections: list[dict] | None = None, n: int = 4):
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 2.6))
    for i, ax in enumerate(np.atleast_1d(axes)):
        draw_boxes(ax, pixels[i], targets[i], None if detections is None else detections[i])
    fig.tight_layout()
    return fig


def histograms(sampled: dict, real: dict, names: list[str], initial: dict | None = None):
    """Sampled (and zero-prior initial) vs real-label category shares and box-area-share histograms (real labels
    only judge the sampler). Histograms as `task_zsq.target_histograms` makes them (JSON: string category keys)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    cats = sorted(real["category"], key=int)
    series = [("sampled", sampled), ("thermal labels", real)] + ([("zero-prior initial", initial)] if initial else [])
    width = 0.8 / len(series)
    for k, (what, h) in enumerate(series):
        c = np.array([h["category"][i] for i in cats], dtype=float)
        a.bar(np.arange(len(cats)) + width * k, c / max(c.sum(), 1), width, label=what)
        area = np.array(h["area"], dtype=float)
        b.bar(np.arange(len(area)) + width * k, area / max(area.sum(), 1), width, label=what)
    a.set_xticks(np.arange(len(cats)) + 0.4 - width / 2, names[:len(cats)])
    a.set_ylabel("share of boxes")
    edges = sampled["area_bins"]
    b.set_xticks(np.arange(len(edges) - 1) + 0.4 - width / 2,
                 [f"{edges[i]:.2g}-{edges[i + 1]:.2g}" for i in range(len(edges) - 1)], fontsize=7, rotation=30)
    b.set_xlabel("box area / frame")
    a.legend(fontsize=7)
    fig.tight_layout()
    return fig
