"""Put the calibration runs of notebook 04 side by side and check the paper's claims against them.

Everything here reads stored results (`results/04_quantize_evaluate/*/rows.jsonl`, the runs'
metrics.json and `references/papers.yaml`); nothing is recomputed. Notebook 06 stores the rows it
compared (`write_rows`), and the figures read those (`helpers.store`), not 04's files. mAP is in points
(COCO mAP@[.5:.95] x 100), as the paper prints it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from helpers import quant, references, runs
from helpers.references import EFFECT_SHARE, VERDICTS, effect_verdict  # the claim rule, shared with task_zsq

PAPER_SETTING = "W8A8"


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN, e.g. the spread of a single batch, becomes None)."""
    return json.loads(frame.to_json(orient="records"))


def paper_reference(paper: str = "zsq_infrared_retinanet") -> dict:
    return references.paper(paper)


def source_label(params: dict) -> str:
    """'real', 'gaussian' (and the other noise sources), 'distilled mean', 'distilled mean+std',
    'distilled mean (unclamped)'; ' (asymmetric)' is appended for runs of the asymmetric scheme."""
    scheme = "" if params.get("SYMMETRIC", True) else " (asymmetric)"
    if params["SOURCE"] != "distilled":
        return params["SOURCE"] + scheme
    return f"distilled {params['DISTILL_LOSS']}" + ("" if params["DISTILL_CLAMP"] else " (unclamped)") + scheme


def calibration_runs(**match) -> list[runs.Run]:
    """Finished 04 runs matching `match`, grouped by (stage, source) in display order, oldest first
    within a group (so that `collect_rows` keeps the newest measurement of a repeated row)."""
    found = runs.list_runs("04_quantize_evaluate", **match)  # oldest first; sorted() is stable
    return sorted(found, key=lambda run: _display_order((run.params["STAGE"], source_label(run.params))))


STAGE_ORDER = ("finetune", "pretrain")
NOISE_SOURCES = ("gaussian", "gaussian-pixel", "uniform-pixel", "gaussian-512x640", "gaussian-matched")  # zsq.NOISE_SOURCES
SOURCE_ORDER = ("real", "distilled mean", "distilled mean+std", "distilled mean (unclamped)", *NOISE_SOURCES,
                "real (asymmetric)", "distilled mean (asymmetric)", "gaussian (asymmetric)")


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
    previews = {}
    for stage, run in newest.items():
        with np.load(run.path("preview.npz")) as archive:
            previews[stage] = {int(key.split("_")[1]): archive[key] for key in archive.files}
    return colour_of_previews(previews)


def colour_of_previews(previews: dict[str, dict[int, np.ndarray]]) -> pd.DataFrame:
    """`colour_of_change` from the previews themselves: {stage: {iteration: (images, H, W, RGB) uint8}}."""
    records = []
    for stage, stored in sorted(previews.items(), key=lambda item: _rank(STAGE_ORDER, item[0])):
        frames = {it: frame.astype(np.float64) for it, frame in stored.items()}
        start = frames.pop(min(frames))
        for iteration in sorted(frames):
            change = frames[iteration] - start  # (images, H, W, RGB) in pixel levels
            colour = np.abs(change - change.mean(-1, keepdims=True)).mean()
            records.append({"stage": stage, "iteration": iteration, "mean_abs_change": np.abs(change).mean(),
                            "colour_share": colour / max(np.abs(change).mean(), 1e-12)})
    return pd.DataFrame(records)


ROWS_FILE = "compared_rows.jsonl"  # in the notebook 06 run: every row it compared, labelled (`write_rows`)
LABELS = ("calibrator", "percentile", "scheme")  # what a row records of its calibration (`quant.calibration_labels`)


def _labels(params: dict) -> dict:
    """A 04 run's calibration as its rows record it (`quant.calibration_labels`), from the run's parameters:
    rows stored before Dec 2026 do not name it themselves."""
    return quant.calibration_labels(params.get("CALIBRATOR", "percentile"), params.get("PERCENTILE", 99.99),
                                    params.get("SYMMETRIC", True))


def collect_rows(calibration: list[runs.Run]) -> pd.DataFrame:
    """Every measured row of every run, labelled with detector stage, source, calibrator, percentile
    and scheme; mAP in points.

    `final` marks rows calibrated with a source's final images (all rows of real and Gaussian runs;
    for distilled runs the last distillation iteration), as opposed to iteration-sweep rows. A row
    whose own calibration label disagrees with its run's parameters fails (the run folder was mixed up).
    """
    frames = []
    for run in calibration:
        stored = runs.read_jsonl(run.path("rows.jsonl"))
        labels = _labels(run.params)
        for row in stored:
            wrong = {k: row[k] for k in LABELS if k in row and row[k] != labels[k]}
            if wrong:
                raise ValueError(f"run {run.id}: a row says {wrong}, its parameters say {labels}: "
                                 f"the rows.jsonl of another run was copied into {run.dir}")
        frame = pd.DataFrame([{**row, **labels} for row in stored])
        if frame.empty:
            continue
        frame["stage"], frame["source"], frame["run_id"] = run.params["STAGE"], source_label(run.params), run.id
        iterations = frame["iteration"].dropna()
        frame["final"] = frame["iteration"].isna() | (frame["iteration"] == (iterations.max() if len(iterations) else None))
        frames.append(frame)
    if not frames:
        raise FileNotFoundError("no finished 04_quantize_evaluate runs: run the batch first (`make reproduce`)")
    rows = pd.concat(frames, ignore_index=True)
    # a row measured again by a newer run (same detector, source, calibration, setting, batch and iteration) counts once
    rows = rows.drop_duplicates(["stage", "source", *LABELS, "setting", "batch", "iteration"], keep="last",
                                ignore_index=True)
    rows["mAP"] = rows["AP"] * 100
    return rows


def write_rows(path: Path, rows: pd.DataFrame) -> Path:
    """Store compared rows (notebook 06: `ROWS_FILE` in its run), so figures read them instead of 04's files."""
    exact = [{k: None if _missing(v) else (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
             for row in rows.to_dict(orient="records")]  # every float to the bit (`records` keeps 10 digits)
    return runs.write_jsonl(path, exact, sort_keys=False)


def _missing(value) -> bool:
    return not isinstance(value, (dict, list)) and bool(pd.isna(value))


def read_rows(path: Path, calibrator: str | None = None) -> pd.DataFrame:
    """Rows stored by `write_rows` (only those of `calibrator` when given), as `collect_rows` gives them."""
    rows = pd.DataFrame([r for r in runs.read_jsonl(path) if calibrator is None or r["calibrator"] == calibrator])
    rows["final"] = rows["final"].astype(bool)
    for column, kind in (("iteration", int), ("percentile", float)):
        if column in rows and rows[column].isna().any():  # None beside numbers: collect_rows keeps objects, not NaN
            rows[column] = pd.Series([None if pd.isna(v) else kind(v) for v in rows[column]], index=rows.index, dtype=object)
    return rows


def detectors(calibration: list[runs.Run]) -> dict[str, dict]:
    """Per detector stage: FP32 mAP (points) and model size (`quant.model_size`) as the 04 runs measured
    them on their validation images. Runs of one stage that disagree fail (two VAL_LIMITs in one batch)."""
    out = {}
    for run in calibration:
        metrics, stage = run.metrics(), run.params["STAGE"]
        value = metrics["fp32"]["AP"] * 100
        if stage in out and abs(out[stage]["fp32_mAP"] - value) > 1e-6:
            raise ValueError(f"runs of stage {stage} evaluated FP32 on different validation images "
                             f"({out[stage]['fp32_mAP']:.3f} vs {value:.3f}): use one VAL_LIMIT for the whole batch")
        out[stage] = {"fp32_mAP": value, "size": metrics["size"]}
    return out


CALIBRATOR_SOURCES = ("real", "distilled mean", "gaussian")  # the paper's three, as `source_label` names them


def calibrator_table(rows: pd.DataFrame, setting: str, stage: str = "finetune") -> pd.DataFrame:
    """mAP (points) per activation calibrator and source at one setting, over the calibration batches
    that every (calibrator, source) pair measured, so each cell averages the same images.

    `rows`: `collect_rows` of runs with several calibrators; only the paper's three sources (mean-only
    clamped distillation) under the symmetric scheme, the one every calibrator supports, are compared."""
    rows = rows[(rows["stage"] == stage) & rows["source"].isin(CALIBRATOR_SOURCES) & (rows["scheme"] == "symmetric")
                & rows["final"] & (rows["setting"] == setting)]
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


def noise_variants(table: pd.DataFrame, stage: str = "finetune", settings=("W8A8", "W8A4", "W4A8"),
                   reference: str = "distilled mean", share: float = EFFECT_SHARE) -> pd.DataFrame:
    """Every noise source against the zero-shot reference per bit setting: mean and std over batches, the
    gap as a share of the reference's mAP, and whether it is a collapse of the paper's order (the
    Gaussian claim's rule: at least `share` of the paper's 38.5 % relative gap, beyond the larger std)."""
    ref = paper_reference()
    paper_effect = 1 - ref["gaussian_w8a8_map"][stage] / ref["table1"][stage]["w8a8_map"]
    part = table[table["stage"] == stage].set_index(["source", "setting"])
    records = []
    for setting in settings:
        if (reference, setting) not in part.index:
            continue
        base = part.loc[(reference, setting)]
        for source in NOISE_SOURCES:
            if (source, setting) not in part.index:
                continue
            row = part.loc[(source, setting)]
            effect, spread = (base["mean"] - row["mean"]) / base["mean"], max(base["std"], row["std"]) / base["mean"]
            records.append({"setting": setting, "source": source, "mean": row["mean"], "std": row["std"],
                            "batches": int(row["count"]), f"{reference}": base["mean"], "gap": base["mean"] - row["mean"],
                            "gap_share": effect, "collapse_like_paper": effect_verdict(effect, spread, paper_effect, share) == "holds"})
    return pd.DataFrame(records)


def scheme_table(table: pd.DataFrame, stage: str = "finetune", sources=("real", "distilled mean", "gaussian")) -> pd.DataFrame:
    """Symmetric (TensorRT's) against asymmetric (the paper's Formula 1) quantization per source and setting."""
    part = table[table["stage"] == stage].set_index(["source", "setting"])
    records = []
    for source in sources:
        for setting in part.loc[f"{source} (asymmetric)"].index if f"{source} (asymmetric)" in part.index.get_level_values(0) else []:
            if (source, setting) not in part.index:
                continue
            sym, asym = part.loc[(source, setting)], part.loc[(f"{source} (asymmetric)", setting)]
            records.append({"source": source, "setting": setting, "symmetric": sym["mean"], "symmetric_std": sym["std"],
                            "asymmetric": asym["mean"], "asymmetric_std": asym["std"], "asym_minus_sym": asym["mean"] - sym["mean"]})
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


def spread_table(rows: pd.DataFrame, by=("stage", "source", "setting")) -> pd.DataFrame:
    """mean, std (ddof 1), min, max and count of mAP (points) over calibration batches, final images only."""
    final = rows[rows["final"]]
    table = final.groupby(list(by), sort=False)["mAP"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    table["std"] = table["std"].fillna(0.0)
    return table


def table1(rows: pd.DataFrame, measured: dict[str, dict], source: str = "distilled mean") -> pd.DataFrame:
    """Paper Table 1: FP32 and W8A8 zero-shot (mean-only) mAP and model size for both detectors, ours
    beside the paper's. `measured`: `detectors(calibration)`."""
    reference = paper_reference()["table1"]
    fp32 = {stage: d["fp32_mAP"] for stage, d in measured.items()}
    sizes = {stage: d["size"] for stage, d in measured.items()}
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




@dataclass
class ClaimContext:
    """What the claim rules read: the spread table of the batch's 04 rows, FP32 mAP, sizes, the paper's numbers."""
    table: pd.DataFrame
    fp32: dict[str, float]
    sizes: dict[str, float]
    ref: dict
    pixel_spread: dict[str, float] | None = None
    colour_change: pd.DataFrame | None = None

    def stat(self, stage: str, source: str, column: str = "mean", setting: str = PAPER_SETTING) -> float | None:
        t = self.table
        hit = t[(t["stage"] == stage) & (t["source"] == source) & (t["setting"] == setting)]
        return float(hit[column].iloc[0]) if len(hit) else None


def _claim(claim: str, paper: str, ours: str, verdict: str, rule: str, paper_effect: float | None = None,
           our_effect: float | None = None, spread: float | None = None, by_effect: bool = False) -> dict:
    """One row of the claims table; the effects are shares of mAP (None where the claim is not a gap).
    `by_effect`: the verdict is `effect_verdict` of our effect against the paper's."""
    assert verdict in VERDICTS, verdict
    return {"claim": claim, "paper": paper, "ours": ours, "verdict": verdict, "holds": verdict == "holds", "rule": rule,
            "paper_effect": paper_effect, "our_effect": our_effect, "spread": spread, "by_effect": by_effect}


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f} %"


def claim_loses_little(c: ClaimContext, stage: str) -> dict | None:
    zsq, paper = c.stat(stage, "distilled mean"), c.ref["table1"][stage]
    if zsq is None or stage not in c.fp32:
        return None
    drop, paper_drop = (c.fp32[stage] - zsq) / c.fp32[stage], (paper["fp32_map"] - paper["w8a8_map"]) / paper["fp32_map"]
    spread = c.stat(stage, "distilled mean", "std") / c.fp32[stage]
    verdict = "holds" if drop <= 2 * paper_drop + spread else "does not hold"
    return _claim(f"{stage}: W8A8 zero-shot (mean-only) loses little mAP",
                  f"{paper['fp32_map']} -> {paper['w8a8_map']} ({_pct(paper_drop)} of FP32)",
                  f"{c.fp32[stage]:.2f} -> {zsq:.2f} ({_pct(drop)} of FP32)", verdict,
                  "relative drop <= twice the paper's (+ one batch std)", paper_drop, drop, spread)


def claim_mean_only_better(c: ClaimContext, stage: str) -> dict | None:
    zsq, mean_std = c.stat(stage, "distilled mean"), c.stat(stage, "distilled mean+std")
    if zsq is None or mean_std is None:
        return None
    spread = max(c.stat(stage, "distilled mean", "std"), c.stat(stage, "distilled mean+std", "std")) / zsq
    effect = (zsq - mean_std) / zsq
    return _claim(f"{stage}: mean-only loss beats mean+std at W8A8", "mean-only better (Fig. 2; no number)",
                  f"{zsq:.2f} vs {mean_std:.2f}", effect_verdict(effect, spread, None),
                  "mean-only above mean+std beyond the larger batch std (the paper gives no size)", None, effect, spread)


def claim_gaussian_far_worse(c: ClaimContext, stage: str) -> dict | None:
    zsq, gauss = c.stat(stage, "distilled mean"), c.stat(stage, "gaussian")
    if zsq is None or gauss is None:
        return None
    paper_zsq, paper_gauss = c.ref["table1"][stage]["w8a8_map"], c.ref["gaussian_w8a8_map"][stage]
    paper_effect, effect = (paper_zsq - paper_gauss) / paper_zsq, (zsq - gauss) / zsq
    spread = max(c.stat(stage, "gaussian", "std"), c.stat(stage, "distilled mean", "std")) / zsq
    return _claim(f"{stage}: Gaussian-noise calibration is far worse",
                  f"{paper_gauss} vs {paper_zsq} (gap {paper_zsq - paper_gauss:.1f}, {_pct(paper_effect)})",
                  f"{gauss:.2f} vs {zsq:.2f} (gap {zsq - gauss:.2f}, {_pct(effect)})",
                  effect_verdict(effect, spread, paper_effect),
                  f"gap >= {EFFECT_SHARE:.2g} of the paper's relative gap and > the larger batch std",
                  paper_effect, effect, spread, by_effect=True)


def claim_finetuned_drops_less(c: ClaimContext) -> dict | None:
    if not {"finetune", "pretrain"} <= set(c.fp32) or None in (c.stat("finetune", "distilled mean"),
                                                               c.stat("pretrain", "distilled mean")):
        return None
    rel = {s: (c.fp32[s] - c.stat(s, "distilled mean")) / c.fp32[s] for s in ("finetune", "pretrain")}
    t = c.ref["table1"]
    paper_rel = {s: (t[s]["fp32_map"] - t[s]["w8a8_map"]) / t[s]["fp32_map"] for s in ("finetune", "pretrain")}
    spread = max(c.stat(s, "distilled mean", "std") / c.fp32[s] for s in ("finetune", "pretrain"))
    effect, paper_effect = rel["pretrain"] - rel["finetune"], paper_rel["pretrain"] - paper_rel["finetune"]
    return _claim("zero-shot does slightly better (relative drop) on the fine-tuned model",
                  f"{_pct(paper_rel['finetune'])} vs {_pct(paper_rel['pretrain'])}",
                  f"{_pct(rel['finetune'])} vs {_pct(rel['pretrain'])}", effect_verdict(effect, spread, paper_effect),
                  f"pretrained minus fine-tuned relative drop >= {EFFECT_SHARE:.2g} of the paper's and > the larger batch std",
                  paper_effect, effect, spread, by_effect=True)


def claim_zsq_matches_ptq(c: ClaimContext) -> dict | None:
    ptq, zsq = c.stat("finetune", "real"), c.stat("finetune", "distilled mean")
    if ptq is None or zsq is None:
        return None
    fig3 = c.ref["fig3"]
    spread = max(c.stat("finetune", "real", "std"), c.stat("finetune", "distilled mean", "std")) / ptq
    paper_gap, gap = abs(fig3["zsq_mean"] - fig3["ptq_mean"]) / fig3["ptq_mean"], abs(zsq - ptq) / ptq
    verdict = "holds" if gap <= max(spread, paper_gap) else "does not hold"
    return _claim("fine-tuned W8A8: zero-shot mean mAP matches PTQ", f"{fig3['zsq_mean']} vs {fig3['ptq_mean']}",
                  f"{zsq:.2f} vs {ptq:.2f}", verdict, "|ZSQ - PTQ| <= the larger batch std (or the paper's gap)",
                  paper_gap, gap, spread)


def claim_zsq_spread_smaller(c: ClaimContext) -> dict | None:
    ptq_std, zsq_std = c.stat("finetune", "real", "std"), c.stat("finetune", "distilled mean", "std")
    if ptq_std is None or zsq_std is None:
        return None
    verdict = ("holds" if zsq_std <= 2 / 3 * ptq_std else "direction only" if zsq_std < ptq_std else "does not hold")
    return _claim("fine-tuned W8A8: zero-shot spread over batches is much smaller than PTQ's",
                  f"much smaller (PTQ min {c.ref['fig3']['ptq_min']})", f"std {zsq_std:.2f} vs {ptq_std:.2f}", verdict,
                  "ZSQ std <= 2/3 of PTQ's ('much smaller'); smaller but not by that: direction only")


def claim_four_times_smaller(c: ClaimContext) -> dict | None:
    if not c.sizes:
        return None
    return _claim("W8 weights make the model 4x smaller", "145.7 -> 36.4 MB (4.0x)",
                  ", ".join(f"{s} {v:.2f}x" for s, v in c.sizes.items()),
                  "holds" if min(c.sizes.values()) > 3.5 else "does not hold", "serialised int8 state dict > 3.5x smaller")


def claim_gray_images(c: ClaimContext) -> dict | None:
    if not c.pixel_spread or not {"finetune", "pretrain"} <= set(c.pixel_spread):
        return None
    fine, pre = c.pixel_spread["finetune"], c.pixel_spread["pretrain"]
    verdict = "holds" if fine < 0.5 * pre else "direction only" if fine < pre else "does not hold"
    return _claim("distilled images of the fine-tuned model are close to gray, the pretrained model's coloured",
                  "Fig. 4", f"channel spread {fine:.3f} vs {pre:.3f}", verdict, "finetune spread < half of pretrain's")


def claim_gray_change(c: ClaimContext) -> dict | None:
    if c.colour_change is None or not {"finetune", "pretrain"} <= set(c.colour_change["stage"]):
        return None
    last = c.colour_change.sort_values("iteration").groupby("stage")["colour_share"].last()
    verdict = ("holds" if last["finetune"] < 0.75 * last["pretrain"] else
               "direction only" if last["finetune"] < last["pretrain"] else "does not hold")
    return _claim("what distillation paints on the fine-tuned model's images is gray, on the pretrained model's coloured",
                  "Fig. 4", f"colour share of the change {last['finetune']:.2f} vs {last['pretrain']:.2f}", verdict,
                  "finetune colour share < 3/4 of pretrain's")


# The core paper's claims, in the order the claims table lists them; each rule returns None when the
# batch lacks the runs it needs.
CLAIMS = (
    *(partial(rule, stage=stage) for stage in ("finetune", "pretrain")
      for rule in (claim_loses_little, claim_mean_only_better, claim_gaussian_far_worse)),
    claim_finetuned_drops_less, claim_zsq_matches_ptq, claim_zsq_spread_smaller, claim_four_times_smaller,
    claim_gray_images, claim_gray_change,
)


def claims(rows: pd.DataFrame, measured: dict[str, dict], pixel_spread: dict[str, float] | None = None,
           colour_change: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each claim of the paper, its number and effect, ours, and the verdict by the stated rule.
    `measured`: `detectors(calibration)` (FP32 mAP and sizes)."""
    context = ClaimContext(spread_table(rows), {stage: d["fp32_mAP"] for stage, d in measured.items()},
                           {stage: d["size"]["ratio"] for stage, d in measured.items()},
                           paper_reference(), pixel_spread, colour_change)
    return pd.DataFrame([row for rule in CLAIMS if (row := rule(context)) is not None])


def _weaker(verdicts: list[str]) -> str:
    """The verdict most batches give; a tie goes to the weaker one."""
    counts = {v: verdicts.count(v) for v in VERDICTS}
    return max(reversed(VERDICTS), key=lambda v: counts[v])


def claims_over_seeds(claims_by_batch: dict[str, list[dict]], share: float = EFFECT_SHARE) -> pd.DataFrame:
    """Every claim over several batches (seeds): the paper's effect, ours as mean +- std over the
    batches, how often each verdict came out, and one verdict over all of them. Where the claim is a
    gap with a number on both sides, that verdict is `effect_verdict` of the seed mean against the
    seed std (so a gap must stand out of the seed-to-seed spread as well); elsewhere it is the verdict
    most batches give (a tie goes to the weaker)."""
    order = list(dict.fromkeys(c["claim"] for rows in claims_by_batch.values() for c in rows))
    records = []
    for name in order:
        rows = [next((c for c in batch if c["claim"] == name), None) for batch in claims_by_batch.values()]
        present = [r for r in rows if r is not None]
        verdicts = [r.get("verdict") or ("holds" if r.get("holds at tiny scale") else "does not hold") for r in present]
        effects = [r["our_effect"] for r in present if r.get("our_effect") is not None]
        paper_effect = present[0].get("paper_effect")
        mean = float(np.mean(effects)) if effects else None
        std = float(np.std(effects, ddof=1)) if len(effects) > 1 else None
        gap_rule = bool(present[0].get("by_effect")) and mean is not None and std is not None
        overall = effect_verdict(mean, std, paper_effect, share) if gap_rule else _weaker(verdicts)
        records.append({"claim": name, "paper": present[0]["paper"], "paper effect": _pct(paper_effect),
                        "ours, mean +- std over batches": "n/a" if mean is None else
                        f"{_pct(mean)} +- {_pct(std)}" if std is not None else _pct(mean),
                        "batches": len(present),
                        "verdicts": ", ".join(f"{v} {verdicts.count(v)}" for v in VERDICTS if verdicts.count(v)),
                        "verdict over batches": overall,
                        "rule over batches": ("effect of the seed mean vs the seed std, as each batch's rule" if gap_rule
                                              else "the verdict most batches give (tie: the weaker)")})
    return pd.DataFrame(records)
