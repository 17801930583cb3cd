"""Run grouping and the calibrator comparison of `helpers.compare` on a small stored results tree."""
import numpy as np
import pandas as pd
import pytest

from helpers import compare, runs
from tests.unit.test_plots import FINAL_BATCHES, _calibration


def _stamp(entry: dict, time: str) -> None:
    """Record a finish time, as Run.finish does in env.json (the order runs are listed in)."""
    runs.atomic_write_json(runs.results_dir() / entry["path"] / "env.json", {"time": time})


def test_runs_are_grouped_in_display_order_and_a_repeated_row_counts_once():
    rng = np.random.default_rng(0)
    gaussian = _calibration("finetune", "gaussian", rng)
    old_real = _calibration("finetune", "real", rng, settings=("W8A8",))
    new_real = _calibration("finetune", "real", rng, settings=("W8A8", "W8A4"), SETTINGS=["W8A8", "W8A4"])  # repeats W8A8
    for entry, time in ((gaussian, "2026-01-01"), (old_real, "2026-01-02"), (new_real, "2026-01-03")):
        _stamp(entry, time)
    listed = compare.calibration_runs(CALIBRATOR="percentile")
    assert [r.id for r in listed] == [old_real["run_id"], new_real["run_id"], gaussian["run_id"]]
    rows = compare.collect_rows(listed)
    real = rows[rows["source"] == "real"]
    assert len(real) == 2 * FINAL_BATCHES["finetune"]
    assert set(real[real["setting"] == "W8A8"]["run_id"]) == {new_real["run_id"]}  # the newer measurement wins


def test_calibrator_table_compares_the_same_batches_of_every_source():
    rng = np.random.default_rng(1)
    for calibrator in ("max", "percentile", "mse"):
        for source in ("real", "distilled", "gaussian"):
            _calibration("finetune", source, rng, settings=("W8A4",), calibrator=calibrator)
    _calibration("finetune", "distilled", rng, settings=("W8A4",), loss="mean+std")  # not a calibrator row
    rows = compare.collect_rows(compare.calibration_runs(CALIB_BATCH=8))
    assert set(rows["calibrator"]) == {"max", "percentile", "mse"}
    assert set(rows.loc[rows["calibrator"] == "percentile", "percentile"]) == {99.99}
    assert rows.loc[rows["calibrator"] != "percentile", "percentile"].isna().all()
    table = compare.calibrator_table(rows, "W8A4")
    assert table["calibrator"].tolist() == ["max"] * 3 + ["percentile"] * 3 + ["mse"] * 3
    assert table["source"].tolist()[:3] == ["real", "distilled mean", "gaussian"]
    assert (table["count"] == FINAL_BATCHES["finetune"]).all()
    cell = table[(table["calibrator"] == "mse") & (table["source"] == "gaussian")].iloc[0]
    stored = [r["AP"] * 100 for r in runs.read_jsonl(next(
        r for r in runs.list_runs("04_quantize_evaluate", CALIBRATOR="mse", SOURCE="gaussian")).path("rows.jsonl"))]
    assert cell["mean"] == pytest.approx(np.mean(stored))
    rankings = compare.calibrator_rankings(table)
    assert rankings["calibrator"].tolist() == ["max", "percentile", "mse"]
    assert all(len(r.split(" > ")) == 3 for r in rankings["ranking"])
    with pytest.raises(FileNotFoundError, match="W4A4"):
        compare.calibrator_table(rows, "W4A4")


def test_a_row_whose_label_contradicts_its_run_fails():
    entry = _calibration("finetune", "real", np.random.default_rng(2), settings=("W8A8",), calibrator="mse")
    path = runs.results_dir() / entry["path"] / "rows.jsonl"
    rows = runs.read_jsonl(path)
    runs.write_jsonl(path, [{**rows[0], "calibrator": "percentile", "percentile": 99.99}, *rows[1:]])
    with pytest.raises(ValueError, match="another run"):
        compare.collect_rows(compare.calibration_runs())


def test_stored_rows_read_back_as_collected(tmp_path):
    rng = np.random.default_rng(3)
    for source in ("distilled", "real"):
        _calibration("finetune", source, rng)
    rows = compare.collect_rows(compare.calibration_runs())
    pd.testing.assert_frame_equal(compare.read_rows(compare.write_rows(tmp_path / compare.ROWS_FILE, rows)), rows)


def test_range_ratios_group_layers_by_detector_part():
    ranges = {"real": {"backbone.body.conv1": 2.0, "backbone.body.layer1.0.conv1": 4.0, "backbone.fpn.inner.0": 1.0,
                       "head.classification_head.cls_logits": 3.0},
              "gaussian": {"backbone.body.conv1": 4.0, "backbone.body.layer1.0.conv1": 1.0, "backbone.fpn.inner.0": 0.5,
                           "head.classification_head.cls_logits": 3.0}}
    table = compare.range_ratios(ranges).set_index("part")
    assert table.loc["backbone body", "layers"] == 2
    assert table.loc["backbone body", "median_ratio"] == pytest.approx((2.0 + 0.25) / 2)
    assert (table.loc["backbone body", "min_ratio"], table.loc["backbone body", "max_ratio"]) == (0.25, 2.0)
    assert table.loc["FPN", "median_ratio"] == 0.5 and table.loc["classification head", "median_ratio"] == 1.0
    assert "regression head" not in table.index


def test_colour_of_change_separates_gray_from_colour_updates():
    rng = np.random.default_rng(2)
    start = rng.integers(60, 190, (2, 8, 10, 3)).astype(np.uint8)
    gray_step = rng.integers(-40, 40, (2, 8, 10, 1))
    colour_step = rng.normal(0, 20, (2, 8, 10, 3)).round()
    for stage, step in (("finetune", gray_step), ("pretrain", colour_step)):
        params = {"PROFILE": "tiny", "SEED": 0, "STAGE": stage, "LOSS": "mean", "CLAMP": True}
        run = runs.open_run("03_distill_calibration_data", params)
        np.savez_compressed(run.path("preview.npz"), iteration_0=start,
                            iteration_5=(start + step).clip(0, 255).astype(np.uint8))
        run.finish({"stage": stage})
    table = compare.colour_of_change(SEED=0).set_index("stage")
    assert list(table.index) == ["finetune", "pretrain"] and (table["iteration"] == 5).all()
    assert table.loc["finetune", "colour_share"] < 0.05  # clipping at 0/255 is the only colour
    assert abs(table.loc["pretrain", "colour_share"] - compare.INDEPENDENT_CHANNELS_COLOUR_SHARE) < 0.08


def test_a_small_gap_against_the_papers_large_one_is_direction_only():
    # the case: 0.3 points against the paper's 12 (on ~31 mAP), even when beyond the batch spread
    assert compare.effect_verdict(0.3 / 31, spread=0.1 / 31, paper=12 / 31) == "direction only"
    assert compare.effect_verdict(5.0 / 31, spread=0.1 / 31, paper=12 / 31) == "holds"  # > a third of the paper's
    assert compare.effect_verdict(5.0 / 31, spread=6.0 / 31, paper=12 / 31) == "direction only"  # not separated
    assert compare.effect_verdict(-0.3 / 31, spread=0.1 / 31, paper=12 / 31) == "does not hold"
    assert compare.effect_verdict(0.02, spread=0.01, paper=None) == "holds"  # no paper number: separation only


def _context(gauss_mean: float, gauss_std: float = 0.1) -> "compare.ClaimContext":
    table = pd.DataFrame([{"stage": "finetune", "source": s, "setting": "W8A8", "mean": m, "std": sd}
                          for s, m, sd in (("distilled mean", 31.0, 0.2), ("gaussian", gauss_mean, gauss_std))])
    return compare.ClaimContext(table, {"finetune": 31.2}, {}, compare.paper_reference())


def test_gaussian_claim_states_both_effects_and_needs_the_papers_order():
    small = compare.claim_gaussian_far_worse(_context(30.7), "finetune")
    assert small["verdict"] == "direction only" and not small["holds"]
    assert small["paper_effect"] == pytest.approx((31.2 - 19.18) / 31.2) and small["our_effect"] == pytest.approx(0.3 / 31)
    assert "gap 12.0" in small["paper"] and "gap 0.30" in small["ours"]
    large = compare.claim_gaussian_far_worse(_context(20.0), "finetune")
    assert large["verdict"] == "holds" and large["holds"]
    assert compare.claim_gaussian_far_worse(_context(31.5), "finetune")["verdict"] == "does not hold"
    assert compare.claim_gaussian_far_worse(_context(30.7), "pretrain") is None  # no pretrained runs: no row


def test_claims_over_seeds_judge_the_seed_mean_against_the_seed_spread():
    def gauss(effect, verdict):
        return {"claim": "finetune: Gaussian-noise calibration is far worse", "paper": "19.18 vs 31.2", "rule": "gap",
                "paper_effect": 0.385, "our_effect": effect, "verdict": verdict, "by_effect": True}
    size = {"claim": "W8 weights make the model 4x smaller", "paper": "4.0x", "rule": "> 3.5x", "verdict": "holds"}
    table = compare.claims_over_seeds({"a": [gauss(0.01, "direction only"), size], "b": [gauss(0.02, "direction only"), size],
                                       "c": [gauss(0.5, "holds"), dict(size, verdict="does not hold")]}).set_index("claim")
    far = table.loc["finetune: Gaussian-noise calibration is far worse"]
    assert far["verdicts"] == "holds 1, direction only 2" and far["batches"] == 3
    assert far["verdict over batches"] == "direction only"  # mean 17.7 % > a third of 38.5 %, but the seed std is larger
    assert table.loc["W8 weights make the model 4x smaller", "verdict over batches"] == "holds"  # 2 of 3
    old = {"claim": "x", "paper": "p", "rule": "r", "holds at tiny scale": True}  # stored before verdicts existed
    assert compare.claims_over_seeds({"a": [old], "b": [dict(old, **{"holds at tiny scale": False})]}).loc[
        0, "verdict over batches"] == "does not hold"
