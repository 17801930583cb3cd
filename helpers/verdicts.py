"""The tiny verdicts and the paper's claims batch by batch, read from what each batch stored (`helpers.store`).

`seed_verdicts` turns one batch's stored notebook 06 (and 05) metrics into short verdict strings,
`seed_numbers` gives the numbers behind them (what `tools.verify` checks a re-made batch on),
`stored_claims` judges the paper's claims by today's rules (`helpers.compare.claims`) on the
batch's stored rows; `table_seeds` and `table_claims_over_seeds` put the seed batches side by side
(`python -m helpers.plots --seeds ...`, `make seeds-table`).
"""
from __future__ import annotations

import functools
import re

import pandas as pd

from helpers import compare

# the committed seed batches: seed 0 and its draws with other seeds and data (params/tiny_seed*.yaml);
# `make seeds-table` sets them side by side, `make verify` judges a re-made batch against their spread
SEED_BATCHES = ("tiny", "tiny_seed1", "tiny_seed2", "tiny_seed3", "tiny_seed4")
from helpers.store import MissingResults, Stored, first_row


def _minus(a, b):
    return None if a is None or b is None else a - b


def _probe_mean(metrics: dict, calibrator: str, source: str):
    """Mean mAP of one (calibrator, source) cell of notebook 06's stored calibrator probe (W8A4), else None."""
    return (first_row(metrics.get("calibrators"), calibrator=calibrator, source=source) or {}).get("mean")


def seed_verdicts(stored: Stored) -> dict[str, str]:
    """One batch's tiny verdicts as short strings, read from its stored notebook 06 (and 05) metrics; "n/a" where absent."""
    metrics = stored.need("comparison")
    fine, pre = "finetune", "pretrain"
    spread, table1, w8a4 = stored.spread_value, stored.table1_map, functools.partial(_probe_mean, metrics)

    def text(fmt: str, *values) -> str:  # a value that rounds to zero prints unsigned ("-0.00" reads as a loss)
        if any(v is None for v in values):
            return "n/a"
        return re.sub(r"[-+](0(?:\.0+)?%?)(?![\d.])", r"\1", fmt.format(*values))

    def order(setting: str) -> str:
        row = first_row(metrics.get("separating_three_sources"), setting=setting)
        return "n/a" if row is None else f"{row['ranking']} ({'all' if row['all_separated'] else 'not all'} separated)"

    colour = {r["stage"]: r["colour_share"] for r in sorted(metrics.get("colour_change") or [], key=lambda r: r["iteration"])}
    recovered = ((stored.dfmpc or {}).get("classifier") or {}).get("recovered") or {}
    max_rule = {source: w8a4("max", source) for source in ("real", "distilled mean", "gaussian")}
    detector = stored.detectors.get(fine, {})
    claims = stored_claims(stored)
    return {
        "seed, data root": f"{detector.get('SEED', '?')}, {detector.get('DATA_ROOT', '?')}",
        "FP32 mAP, fine-tuned / pretrained": text("{:.2f} / {:.2f}", table1(fine, "W32-A32"), table1(pre, "W32-A32")),
        "W8A8 zero-shot minus FP32": text("{:+.2f}", _minus(table1(fine, "W8-A8"), table1(fine, "W32-A32"))),
        "W8A8 zero-shot vs PTQ": text("{:.2f} vs {:.2f}", spread(fine, "distilled mean"), spread(fine, "real")),
        "W8A8 Gaussian minus distilled": text("{:+.2f}", _minus(spread(fine, "gaussian"), spread(fine, "distilled mean"))),
        "W8A8 batch std, zero-shot vs PTQ": text("{:.2f} vs {:.2f}", spread(fine, "distilled mean", column="std"),
                                                 spread(fine, "real", column="std")),
        "W4A8 order, percentile calibrator": order("W4A8"),
        "W8A4 order, percentile calibrator": order("W8A4"),
        "W8A4, MSE calibrator: real / distilled minus Gaussian": text(
            "{:+.1f} / {:+.1f}", _minus(w8a4("mse", "real"), w8a4("mse", "gaussian")),
            _minus(w8a4("mse", "distilled mean"), w8a4("mse", "gaussian"))),
        "W8A4, max calibrator: best source": "n/a" if None in max_rule.values() else max(max_rule, key=max_rule.get),
        "pretrained W8A8: mean+std vs mean-only": text("{:.2f} vs {:.2f}", spread(pre, "distilled mean+std"),
                                                       spread(pre, "distilled mean")),
        "pretrained W8A8: Gaussian vs mean-only": text("{:.2f} vs {:.2f}", spread(pre, "gaussian"), spread(pre, "distilled mean")),
        "pretrained: FP32 minus W8A8 zero-shot": text("{:.2f}", _minus(table1(pre, "W32-A32"), table1(pre, "W8-A8"))),
        "colour share of the change, fine-tuned (pretrained)": text("{:.2f} ({:.2f})", colour.get(fine), colour.get(pre)),
        "paper's claims that hold by notebook 06's rules (direction only)": (
            f"{sum(claim_verdict(c) == 'holds' for c in claims)} of {len(claims)} "
            f"({sum(claim_verdict(c) == 'direction only' for c in claims)})" if claims else "n/a"),
        "DF-MPC classifier, share of the drop won back: 2/6 / 3/6": text(
            "{:.0%} / {:.0%}", (recovered.get("ternary") or {}).get("dfmpc"), (recovered.get("3") or {}).get("dfmpc")),
    }


def claim_verdict(claim: dict) -> str:
    """A stored claim's verdict (results stored before the effect-size rule have only a bool)."""
    return claim.get("verdict") or ("holds" if claim.get("holds at tiny scale") else "does not hold")


def stored_claims(stored: Stored) -> list[dict]:
    """The paper's claims judged by today's rules (`compare.claims`) on the rows notebook 06 stored, 03
    pixel statistics and previews: the same as notebook 06 computes, without its run (a batch whose
    06 ran before a rule changed is judged by the new rule, from what it stored)."""
    if stored.rows is None:
        return stored.need("comparison").get("claims") or []
    pixel, previews = {}, {}
    for d in stored.distillations:  # manifest order: the newest mean-only clamped run per stage wins
        if d["loss"] == "mean" and d["clamp"]:
            stats = d["pixel_statistics"]
            pixel[d["stage"]] = stats[max(stats, key=int)]["channel_spread"]
            previews[d["stage"]] = d["preview"]
    colour = compare.colour_of_previews(previews) if all(previews.values()) and previews else None
    return compare.records(compare.claims(stored.rows, stored.comparison["detectors"], pixel, colour))


def table_claims_over_seeds(storeds: list[Stored]) -> pd.DataFrame:
    """Every core claim over the seed batches: the paper's effect, ours with its seed spread, the verdicts."""
    return compare.claims_over_seeds({s.batch: stored_claims(s) for s in storeds})


def seed_numbers(stored: Stored) -> dict[str, float | None]:
    """The numbers behind the tiny verdicts (mAP points), from one batch's stored 06 metrics: what a
    batch made again on another CPU is checked on (`tools.verify`), each against the seed spread."""
    metrics = stored.need("comparison")
    fine, pre = "finetune", "pretrain"
    w8a4 = functools.partial(_probe_mean, metrics)

    return {
        "FP32 mAP, fine-tuned": stored.fp32(fine),
        "FP32 mAP, pretrained": stored.fp32(pre),
        "W8A8 zero-shot minus FP32": _minus(stored.table1_map(fine, "W8-A8"), stored.fp32(fine)),
        "W8A8 zero-shot minus PTQ": _minus(stored.spread_value(fine, "distilled mean"), stored.spread_value(fine, "real")),
        "W8A8 Gaussian minus distilled": _minus(stored.spread_value(fine, "gaussian"),
                                                stored.spread_value(fine, "distilled mean")),
        "W8A4 MSE calibrator, real minus Gaussian": _minus(w8a4("mse", "real"), w8a4("mse", "gaussian")),
        "pretrained: FP32 minus W8A8 zero-shot": _minus(stored.fp32(pre), stored.table1_map(pre, "W8-A8")),
    }


def table_seeds(storeds: list[Stored]) -> pd.DataFrame:
    """The tiny verdicts side by side, one column per batch (another seed and data draw each), every
    cell read from that batch's stored comparison (notebook 06) and DF-MPC (05) metrics: which
    verdicts are properties of the recipe and which of one trained detector."""
    if not storeds:
        raise MissingResults("name at least one batch")
    columns = {s.batch: seed_verdicts(s) for s in storeds}
    verdicts = list(next(iter(columns.values())))
    return pd.DataFrame({"verdict": verdicts, **{batch: [col[v] for v in verdicts] for batch, col in columns.items()}})
