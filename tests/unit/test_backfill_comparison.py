"""tools.backfill_comparison gives an old notebook-06 run exactly what notebook 06 stores today, or nothing."""
import json

import pandas as pd
import pytest

from helpers import compare, runs, store
from tests.unit.test_plots import tree  # noqa: F401  (the fixture: a small stored batch)
from tools import backfill_comparison


def _as_made_before_dec_2026():
    run = store.newest_run("tiny", "06_compare_calibration")
    made = compare.read_rows(run.path(compare.ROWS_FILE))
    run.path(compare.ROWS_FILE).unlink()
    metrics = run.metrics()
    detectors = metrics.pop("detectors")
    runs.atomic_write_json(run.path("metrics.json"), metrics, digits=5)
    runs.atomic_write_json(run.path("env.json"), {"time": "2026-12-01T00:00:00"})
    return run, made, detectors


def test_backfill_writes_what_notebook_06_stores(tree):  # noqa: F811
    run, made, detectors = _as_made_before_dec_2026()
    assert "stored no compared_rows.jsonl" in store.load("tiny").missing["rows"]
    assert "runs written, spread table checked" in backfill_comparison.backfill("tiny")
    def ordered(rows):  # the fixture stored its runs in its own order, notebook 06 (and the tool) in display order
        return rows.sort_values(["run_id", "setting", "batch", "iteration"], key=lambda c: c.astype(str)).reset_index(drop=True)

    pd.testing.assert_frame_equal(ordered(compare.read_rows(run.path(compare.ROWS_FILE))), ordered(made))
    assert json.loads(json.dumps(run.metrics()["detectors"])) == json.loads(json.dumps(runs._rounded(detectors, 5)))
    assert json.loads(run.path("env.json").read_text())["backfilled"]["by"] == "tools/backfill_comparison.py"
    assert store.load("tiny").rows is not None
    assert "left alone" in backfill_comparison.backfill("tiny")


def test_backfill_refuses_rows_that_do_not_give_the_stored_spread(tree):  # noqa: F811
    run, _, _ = _as_made_before_dec_2026()
    metrics = run.metrics()
    metrics["spread"][0]["mean"] += 1.0
    runs.atomic_write_json(run.path("metrics.json"), metrics, digits=5)
    with pytest.raises(backfill_comparison.BackfillMismatch, match="spread table"):
        backfill_comparison.backfill("tiny")
    assert not run.path(compare.ROWS_FILE).exists() and "detectors" not in run.metrics()
