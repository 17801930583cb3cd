"""Run grouping and the calibrator comparison of `helpers.compare` on a small stored results tree."""
import numpy as np
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
    table = compare.calibrator_table("W8A4", CALIB_BATCH=8)
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
        compare.calibrator_table("W4A4")


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
