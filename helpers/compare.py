"""Put the calibration runs of notebook 04 side by side and check the paper's claims against them.

Everything here reads stored results (`results/04_quantize_evaluate/*/rows.jsonl`, the runs'
metrics.json and `params/paper_reference.yaml`); nothing is recomputed. mAP is in points
(COCO mAP@[.5:.95] x 100), as the paper prints it.
"""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import yaml

from helpers import quant, runs

REFERENCE = runs.ROOT / "params" / "paper_reference.yaml"
PAPER_SETTING = "W8A8"


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN, e.g. the spread of a single batch, becomes None)."""
    return json.loads(frame.to_json(orient="records"))


def paper_reference(paper: str = "zsq_infrared_retinanet") -> dict:
    return yaml.safe_load(REFERENCE.read_text())[paper]


def source_label(params: dict) -> str:
    """'real', 'gaussian', 'distilled mean', 'distilled mean+std', 'distilled mean (unclamped)'."""
    if params["SOURCE"] != "distilled":
        return params["SOURCE"]
    return f"distilled {params['DISTILL_LOSS']}" + ("" if params["DISTILL_CLAMP"] else " (unclamped)")


def calibration_runs(**match) -> list[runs.Run]:
    """Finished 04 runs matching `match`, grouped by (stage, source) in display order, oldest first
    within a group (so that `collect_rows` keeps the newest measurement of a repeated row)."""
    found = runs.list_runs("04_quantize_evaluate", **match)  # oldest first; sorted() is stable
    return sorted(found, key=lambda run: _display_order((run.params["STAGE"], source_label(run.params))))


STAGE_ORDER = ("finetune", "pretrain")
SOURCE_ORDER = ("real", "distilled mean", "distilled mean+std", "distilled mean (unclamped)", "gaussian")


def _display_order(key: tuple[str, str]) -> tuple[int, int, str]:
    stage, source = key
    return _rank(STAGE_ORDER, stage), _rank(SOURCE_ORDER, source), f"{stage}/{source}"


def _rank(order: tuple[str, ...], item: str) -> int:
    return order.index(item) if item in order else len(order)


def image_colour(**match) -> dict[str, float]:
    """Channel spread of the final distilled images (mean-only, clamped) per stage, from the 03 runs (Fig. 4)."""
    out = {}
    for run in runs.list_runs("03_distill_calibration_data", LOSS="mean", CLAMP=True, **match):
        stats = run.metrics()["pixel_statistics"]
        out[run.params["STAGE"]] = stats[max(stats, key=int)]["channel_spread"]
    return out


# share of colour in a change whose three channels move independently (Gaussian): E|u - mean_c u| / E|u|
INDEPENDENT_CHANNELS_COLOUR_SHARE = (2 / 3) ** 0.5


def colour_of_change(**match) -> pd.DataFrame:
    """Fig. 4 in numbers, from the stored previews (mean-only, clamped 03 runs): per detector and
    iteration, the mean absolute pixel change since the initial noise and the share of it that is
    colour (a gray change moves R, G and B alike: share 0; channels moving independently: about 0.82)."""
    newest = {}
    for run in runs.list_runs("03_distill_calibration_data", LOSS="mean", CLAMP=True, **match):  # oldest first
        newest[run.params["STAGE"]] = run
    records = []
    for stage, run in sorted(newest.items(), key=lambda item: _rank(STAGE_ORDER, item[0])):
        with np.load(run.path("preview.npz")) as previews:
            frames = {int(key.split("_")[1]): previews[key].astype(np.float64) for key in previews.files}
        start = frames.pop(min(frames))
        for iteration in sorted(frames):
            change = frames[iteration] - start  # (images, H, W, RGB) in pixel levels
            colour = np.abs(change - change.mean(-1, keepdims=True)).mean()
            records.append({"stage": stage, "iteration": iteration, "mean_abs_change": np.abs(change).mean(),
                            "colour_share": colour / max(np.abs(change).mean(), 1e-12)})
    return pd.DataFrame(records)


def collect_rows(calibration: list[runs.Run]) -> pd.DataFrame:
    """Every measured row of every run, labelled with detector stage and source; mAP in points.

    `final` marks rows calibrated with a source's final images (all rows of real and Gaussian runs;
    for distilled runs the last distillation iteration), as opposed to iteration-sweep rows.
    """
    frames = []
    for run in calibration:
        frame = pd.DataFrame(runs.read_jsonl(run.path("rows.jsonl")))
        if frame.empty:
            continue
        frame["stage"], frame["source"], frame["run_id"] = run.params["STAGE"], source_label(run.params), run.id
        iterations = frame["iteration"].dropna()
        frame["final"] = frame["iteration"].isna() | (frame["iteration"] == (iterations.max() if len(iterations) else None))
        frames.append(frame)
    if not frames:
        raise FileNotFoundError("no finished 04_quantize_evaluate runs: run the batch first (`make reproduce`)")
    rows = pd.concat(frames, ignore_index=True)
    # a row measured again by a newer run (same detector, source, setting, batch and iteration) counts once
    rows = rows.drop_duplicates(["stage", "source", "setting", "batch", "iteration"], keep="last", ignore_index=True)
    rows["mAP"] = rows["AP"] * 100
    return rows


def calibrator_table(setting: str, stage: str = "finetune", **match) -> pd.DataFrame:
    """mAP (points) per activation calibrator and source at one setting, over the calibration batches
    that every (calibrator, source) pair measured, so each cell averages the same images."""
    frames = []
    for run in runs.list_runs("04_quantize_evaluate", STAGE=stage, **match):
        if run.params.get("DISTILL_CLAMP", True) is False or run.params.get("DISTILL_LOSS", "mean") != "mean":
            continue
        frame = collect_rows([run])
        frame = frame[frame["final"] & (frame["setting"] == setting)].assign(calibrator=run.params["CALIBRATOR"])
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if rows.empty:
        raise FileNotFoundError(f"no finished 04_quantize_evaluate runs of the {stage} detector at {setting}")
    shared = set.intersection(*(set(g["batch"]) for _, g in rows.groupby(["calibrator", "source"])))
    rows = rows[rows["batch"].isin(shared)]
    table = rows.groupby(["calibrator", "source"], sort=False)["mAP"].agg(["mean", "std", "count"]).reset_index()
    table["first_layer_amax"] = rows.groupby(["calibrator", "source"], sort=False)["first_layer_amax"].mean().values
    order = table.assign(c=table["calibrator"].map(quant.CALIBRATORS.index),
                         s=table["source"].map(lambda source: _rank(SOURCE_ORDER, source)))
    return order.sort_values(["c", "s"]).drop(columns=["c", "s"]).reset_index(drop=True)


DETECTOR_PARTS = (("backbone.body", "backbone body"), ("backbone.fpn", "FPN"),
                  ("head.classification_head", "classification head"), ("head.regression_head", "regression head"))


def range_ratios(ranges: dict[str, dict[str, float]], reference: str = "real") -> pd.DataFrame:
    """Per detector part: median, min and max over its layers of each source's calibrated clipping
    value divided by the reference source's (below 1: a tighter range, so finer steps but more clipping)."""
    records = []
    for prefix, part in DETECTOR_PARTS:
        layers = [name for name in ranges[reference] if name.startswith(prefix)]
        for source, values in ranges.items():
            if source == reference or not layers:
                continue
            ratios = pd.Series([values[name] / ranges[reference][name] for name in layers])
            records.append({"part": part, "layers": len(layers), "source": source, "median_ratio": ratios.median(),
                            "min_ratio": ratios.min(), "max_ratio": ratios.max()})
    return pd.DataFrame(records)


def calibrator_rankings(table: pd.DataFrame) -> pd.DataFrame:
    """Per calibrator: sources by mean mAP, best first, and whether adjacent ones differ by more than their std."""
    records = []
    for calibrator, part in table.groupby("calibrator", sort=False):
        part = part.sort_values("mean", ascending=False)
        gaps = part["mean"].diff(-1).abs().iloc[:-1].to_numpy()
        spreads = part["std"].rolling(2).max().shift(-1).iloc[:-1].to_numpy()
        records.append({"calibrator": calibrator, "ranking": " > ".join(part["source"]),
                        "best_minus_worst": float(part["mean"].iloc[0] - part["mean"].iloc[-1]),
                        "adjacent_separated": bool((gaps > spreads).all())})
    return pd.DataFrame(records)


def fp32_map(calibration: list[runs.Run]) -> dict[str, float]:
    """FP32 mAP (points) per stage, as measured by the calibration runs on their validation images."""
    out = {}
    for run in calibration:
        value = run.metrics()["fp32"]["AP"] * 100
        stage = run.params["STAGE"]
        if stage in out and abs(out[stage] - value) > 1e-6:
            raise ValueError(f"runs of stage {stage} evaluated FP32 on different validation images "
                             f"({out[stage]:.3f} vs {value:.3f}): use one VAL_LIMIT for the whole batch")
        out[stage] = value
    return out


def spread_table(rows: pd.DataFrame, by=("stage", "source", "setting")) -> pd.DataFrame:
    """mean, std (ddof 1), min, max and count of mAP (points) over calibration batches, final images only."""
    final = rows[rows["final"]]
    table = final.groupby(list(by), sort=False)["mAP"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    table["std"] = table["std"].fillna(0.0)
    return table


def table1(rows: pd.DataFrame, calibration: list[runs.Run], source: str = "distilled mean") -> pd.DataFrame:
    """Paper Table 1: FP32 and W8A8 zero-shot (mean-only) mAP and model size for both detectors, ours beside the paper's."""
    reference = paper_reference()["table1"]
    fp32 = fp32_map(calibration)
    sizes = {r.params["STAGE"]: r.metrics()["size"] for r in calibration}
    stats = spread_table(rows).set_index(["stage", "source", "setting"])
    records = []
    for stage in ("pretrain", "finetune"):
        if stage not in fp32 or (stage, source, PAPER_SETTING) not in stats.index:
            continue
        q = stats.loc[(stage, source, PAPER_SETTING)]
        paper = reference[stage]
        records += [
            {"model": stage, "precision": "W32-A32", "mAP": fp32[stage], "size_MiB": sizes[stage]["fp32_mib"],
             "paper_mAP": paper["fp32_map"], "paper_size_MB": paper["fp32_mb"]},
            {"model": stage, "precision": "W8-A8", "mAP": q["mean"], "mAP_std": q["std"], "mAP_min": q["min"],
             "batches": int(q["count"]), "size_MiB": sizes[stage]["int_mib"],
             "paper_mAP": paper["w8a8_map"], "paper_size_MB": paper["w8a8_mb"]},
        ]
    return pd.DataFrame(records)


def separation(table: pd.DataFrame, stage: str, setting: str) -> pd.DataFrame:
    """Every pair of sources at one setting: the gap of their mean mAP and whether it exceeds both spreads."""
    part = table[(table["stage"] == stage) & (table["setting"] == setting)].set_index("source")
    records = []
    for a, b in combinations(part.index, 2):
        gap = part.loc[a, "mean"] - part.loc[b, "mean"]
        spread = max(part.loc[a, "std"], part.loc[b, "std"])
        records.append({"setting": setting, "pair": f"{a} vs {b}", "gap": gap, "largest_std": spread,
                        "separated": abs(gap) > spread})
    return pd.DataFrame(records)


def separating_settings(table: pd.DataFrame, stage: str, sources: tuple[str, ...]) -> pd.DataFrame:
    """Per setting: the ranking of `sources` by mean mAP and whether every pair is separated by more than its spread."""
    records = []
    for setting in table[table["stage"] == stage]["setting"].unique():
        part = table[(table["stage"] == stage) & (table["setting"] == setting) & table["source"].isin(sources)]
        if len(part) < len(sources):
            continue
        pairs = separation(part, stage, setting)
        ranking = part.sort_values("mean", ascending=False)["source"].tolist()
        records.append({"setting": setting, "ranking": " > ".join(ranking),
                        "pairs_separated": f"{int(pairs['separated'].sum())}/{len(pairs)}",
                        "all_separated": bool(pairs["separated"].all()),
                        "smallest_gap_over_std": float((pairs["gap"].abs() / pairs["largest_std"].clip(lower=1e-9)).min())})
    return pd.DataFrame(records)


def sweep_table(rows: pd.DataFrame, setting: str = PAPER_SETTING) -> pd.DataFrame:
    """Fig. 2a/2b data: mAP against distillation iteration per detector and loss (mean over batches)."""
    sweep = rows[rows["source"].str.startswith("distilled") & (rows["setting"] == setting) & rows["iteration"].notna()]
    table = sweep.groupby(["stage", "source", "iteration"], sort=True)["mAP"].agg(["mean", "std", "count"]).reset_index()
    table["iteration"] = table["iteration"].astype(int)
    return table


def _claim(claim: str, paper, ours, holds: bool, rule: str) -> dict:
    return {"claim": claim, "paper": paper, "ours (tiny)": ours, "holds at tiny scale": bool(holds), "rule": rule}


def claims(rows: pd.DataFrame, calibration: list[runs.Run], pixel_spread: dict[str, float] | None = None,
           colour_change: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each claim of the paper, its number, ours, and whether it holds by the stated rule."""
    ref = paper_reference()
    table = spread_table(rows)
    fp32 = fp32_map(calibration)

    def stat(stage, source, column="mean", setting=PAPER_SETTING):
        hit = table[(table["stage"] == stage) & (table["source"] == source) & (table["setting"] == setting)]
        return float(hit[column].iloc[0]) if len(hit) else None

    out = []
    for stage in ("finetune", "pretrain"):
        zsq, paper = stat(stage, "distilled mean"), ref["table1"][stage]
        if zsq is not None and stage in fp32:
            drop, paper_drop = fp32[stage] - zsq, paper["fp32_map"] - paper["w8a8_map"]
            out.append(_claim(f"{stage}: W8A8 zero-shot (mean-only) loses little mAP",
                              f"{paper['fp32_map']} -> {paper['w8a8_map']} (-{paper_drop:.1f})",
                              f"{fp32[stage]:.2f} -> {zsq:.2f} ({-drop:+.2f})", drop <= 1.5, "drop <= 1.5 points"))
        mean_std = stat(stage, "distilled mean+std")
        if zsq is not None and mean_std is not None:
            out.append(_claim(f"{stage}: mean-only loss beats mean+std at W8A8", "mean-only better (Fig. 2)",
                              f"{zsq:.2f} vs {mean_std:.2f}", zsq > mean_std, "mean-only mean mAP > mean+std"))
        gauss = stat(stage, "gaussian")
        if gauss is not None and zsq is not None:
            out.append(_claim(f"{stage}: Gaussian-noise calibration is far worse", f"{ref['gaussian_w8a8_map'][stage]} vs {paper['w8a8_map']}",
                              f"{gauss:.2f} vs {zsq:.2f}", zsq - gauss > max(stat(stage, "gaussian", "std"), stat(stage, "distilled mean", "std")),
                              "distilled mean - Gaussian mean > larger batch std"))
    if all(s in fp32 for s in ("finetune", "pretrain")):
        rel = {s: (fp32[s] - stat(s, "distilled mean")) / fp32[s] for s in fp32 if stat(s, "distilled mean") is not None}
        if len(rel) == 2:
            out.append(_claim("zero-shot does slightly better (relative drop) on the fine-tuned model",
                              "3.4 % vs 3.6 %", f"{100 * rel['finetune']:.1f} % vs {100 * rel['pretrain']:.1f} %",
                              rel["finetune"] <= rel["pretrain"], "relative drop finetune <= pretrain"))
    ptq, zsq = stat("finetune", "real"), stat("finetune", "distilled mean")
    if ptq is not None and zsq is not None:
        ptq_std, zsq_std = stat("finetune", "real", "std"), stat("finetune", "distilled mean", "std")
        fig3 = ref["fig3"]
        out.append(_claim("fine-tuned W8A8: zero-shot mean mAP matches PTQ", f"{fig3['zsq_mean']} vs {fig3['ptq_mean']}",
                          f"{zsq:.2f} vs {ptq:.2f}", abs(zsq - ptq) <= max(ptq_std, zsq_std),
                          "|ZSQ - PTQ| <= larger batch std"))
        out.append(_claim("fine-tuned W8A8: zero-shot spread over batches is smaller than PTQ's",
                          f"smaller (PTQ min {fig3['ptq_min']})", f"std {zsq_std:.2f} vs {ptq_std:.2f}", zsq_std < ptq_std,
                          "ZSQ std < PTQ std"))
    sizes = {r.params["STAGE"]: r.metrics()["size"]["ratio"] for r in calibration}
    if sizes:
        out.append(_claim("W8 weights make the model 4x smaller", "145.7 -> 36.4 MB (4.0x)",
                          ", ".join(f"{s} {v:.2f}x" for s, v in sizes.items()), min(sizes.values()) > 3.5,
                          "serialised int8 state dict > 3.5x smaller"))
    if pixel_spread and {"finetune", "pretrain"} <= set(pixel_spread):
        out.append(_claim("distilled images of the fine-tuned model are close to gray, the pretrained model's coloured",
                          "Fig. 4", f"channel spread {pixel_spread['finetune']:.3f} vs {pixel_spread['pretrain']:.3f}",
                          pixel_spread["finetune"] < 0.5 * pixel_spread["pretrain"], "finetune spread < half of pretrain's"))
    if colour_change is not None and {"finetune", "pretrain"} <= set(colour_change["stage"]):
        last = colour_change.sort_values("iteration").groupby("stage")["colour_share"].last()
        out.append(_claim("what distillation paints on the fine-tuned model's images is gray, on the pretrained model's coloured",
                          "Fig. 4", f"colour share of the change {last['finetune']:.2f} vs {last['pretrain']:.2f}",
                          last["finetune"] < 0.75 * last["pretrain"], "finetune colour share < 3/4 of pretrain's"))
    return pd.DataFrame(out)
