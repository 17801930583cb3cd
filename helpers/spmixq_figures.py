"""Figures and tables of notebook 08 (SPMix-Q mixed precision), drawn only from its stored rows.

- `sensitivity_data` / `sensitivity_figure`: the per-block sensitivity profile of the U-Net (IoU drop with real
  images and the data-free discrepancy with BN-distilled images, per mode, blocks in forward order).
- `pareto_data` / `pareto_figure`: the thermal RetinaNet's mAP against measured average weight bits, every policy
  beside the uniform W8/W6/W4 points, and the same for the segmenter's policies (IoU against weight bits).
`helpers.plots` (its ARTIFACTS, `make figures`, notebook 10) writes them as PNG/PDF figures and CSV/MD tables.
"""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from helpers import runs

NOTEBOOK = "08_mixed_precision_spmixq"
POLICY_COLORS = {"spmixq": "C0", "spmixq_reversed": "C1", "greedy_real": "C2", "greedy_distilled": "C3", "hawq_v3": "C4",
                 "random_0": "C7", "random_1": "0.6"}  # one colour per policy in both panels
BLOCK_ORDER = ["stem", "enc0", "enc1", "enc2", "enc3", "dec2", "dec1", "dec0", "head"]


def stored_run(run_id: str | None = None, **match) -> runs.Run:
    """The finished notebook-08 run (by id, or the single one matching `match`, preferring the batch's)."""
    return runs.find_run(NOTEBOOK, run_id, **match)


def sensitivity_data(run: runs.Run, bits: int | None = None) -> pd.DataFrame:
    """One row per (block, mode) at the lowest studied width: IoU drop (real), sym. KL (real and distilled)."""
    import json
    fp = json.loads(run.path("float.json").read_text())
    real, distilled = runs.read_jsonl(run.path("sensitivity_real.jsonl")), runs.read_jsonl(run.path("sensitivity_distilled.jsonl"))
    bits = bits or min(r["bits"] for r in real)
    kl = {(r["block"], r["mode"]): r["sym_kl"] for r in distilled if r["bits"] == bits}
    rows = [{"block": r["block"], "mode": r["mode"], "bits": bits, "IoU_drop": fp["IoU"] - r["IoU"], "kl_real": r["sym_kl"],
             "kl_distilled": kl.get((r["block"], r["mode"]))} for r in real if r["bits"] == bits]
    frame = pd.DataFrame(rows)
    frame["order"] = frame["block"].map(BLOCK_ORDER.index)
    return frame.sort_values(["mode", "order"]).drop(columns="order").reset_index(drop=True)


def sensitivity_figure(data: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(8.5, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, (column, label) in zip(axes, [("IoU_drop", "IoU drop (real images)"), ("kl_distilled", "sym. KL (distilled images)")]):
        for k, (mode, g) in enumerate(data.groupby("mode")):
            x = [BLOCK_ORDER.index(b) + (k - 0.5) * 0.35 for b in g["block"]]
            ax.bar(x, g[column], width=0.35, label=f"{mode} at {int(g['bits'].iloc[0])} bits")
        ax.set_xticks(range(len(BLOCK_ORDER)), BLOCK_ORDER, rotation=45)
        ax.set_ylabel(label)
        ax.axvspan(0.5, 4.5, color="0.9", zorder=-1)  # the encoder
    axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle("U-Net per-block quantization sensitivity (one block at a time; shaded: encoder)")
    return fig


def pareto_data(run: runs.Run) -> dict[str, pd.DataFrame]:
    """{"detector": budget, policy, w_avg, AP, AP50 rows; "segmenter": budget, policy, stage, w_avg, a_avg, IoU rows}."""
    out = {}
    if run.path("detector_policies.jsonl").exists():
        det = pd.DataFrame(runs.read_jsonl(run.path("detector_policies.jsonl")))
        out["detector"] = det[["budget", "policy", "w_bits", "AP", "AP50"]].rename(columns={"w_bits": "w_avg"})
    seg = pd.DataFrame(runs.read_jsonl(run.path("policies.jsonl")))
    seg["budget"] = seg["budget"].map(lambda b: f"W{b[0]}/A{b[1]}")
    out["segmenter"] = seg[["budget", "policy", "stage", "w_bits", "a_bits", "IoU"]].rename(columns={"w_bits": "w_avg", "a_bits": "a_avg"})
    return out


def pareto_figure(data: dict[str, pd.DataFrame]) -> Figure:
    panels = [k for k in ("detector", "segmenter") if k in data]
    fig = Figure(figsize=(4.8 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        frame = data[key] if key == "detector" else data[key][data[key]["stage"] == "ptq"]
        y = "AP" if key == "detector" else "IoU"
        uni = frame[frame["policy"] == "uniform"].sort_values("w_avg")
        ax.plot(uni["w_avg"], uni[y], "k--o", label="uniform")
        for policy, g in frame[frame["policy"] != "uniform"].groupby("policy"):
            ax.scatter(g["w_avg"], g[y], label=policy, s=22, color=POLICY_COLORS.get(policy))
        ax.set_xlabel("avg. weight bits (param.-weighted)")
        ax.set_ylabel("mAP" if key == "detector" else "IoU (after calibration)")
        ax.set_title("thermal RetinaNet, A8" if key == "detector" else "U-Net, SIRST-like set")
    axes[-1].legend(frameon=False, fontsize=7)
    return fig
