"""Give a notebook-06 run made before Dec 2026 what notebook 06 stores since: its compared rows
(`compare.ROWS_FILE`) and the detectors' FP32 mAP and sizes (`detectors` in metrics.json).

`python -m tools.backfill_comparison BATCH [BATCH ...]`

For batches whose 06 cannot simply be executed again on this machine (seed batches 1 and 2: their
detector weights are not committed, and notebook 06 loads the fine-tuned detector for its range
probes). The values come from the same functions notebook 06 calls, on the same stored 04 runs, and
are checked against what the run stored before anything is written: the runs it listed and every
cell of its stored spread table must come out the same, else nothing is written. The run's env.json
records the backfill. A 06 run that already stores its rows is left alone.
"""
from __future__ import annotations

import argparse
import json
import time

from helpers import compare, runs, store


class BackfillMismatch(RuntimeError):
    """The stored 04 runs no longer give what the 06 run compared: execute notebook 06 again instead."""


def backfill(batch: str) -> str:
    run = store.newest_run(batch, "06_compare_calibration")
    if run.path(compare.ROWS_FILE).exists():
        return f"{batch}: 06 run {run.id} stores its rows already, left alone"
    p, metrics = run.params, run.metrics()
    calibrator = p.get("CALIBRATOR", "percentile")
    compared = compare.calibration_runs(**{k: p[k] for k in ("SEED", "DATA_ROOT", "VAL_LIMIT") if k in p})
    compared_rows = compare.collect_rows(compared)  # as notebook 06, section 1
    calibration = [r for r in compared if r.params["CALIBRATOR"] == calibrator]
    rows = compared_rows[compared_rows["calibrator"] == calibrator].reset_index(drop=True)
    if {r.id for r in calibration} != set(metrics["runs"]):
        raise BackfillMismatch(f"{batch}: 06 run {run.id} compared {metrics['runs']}, the results now hold "
                               f"{[r.id for r in calibration]}: execute notebook 06 again")
    def cells(records: list[dict]) -> list[dict]:
        return sorted(runs._rounded(records, 5), key=lambda r: (r["stage"], r["source"], r["setting"]))

    if not runs._close(cells(compare.records(compare.spread_table(rows))), cells(metrics["spread"])):
        raise BackfillMismatch(f"{batch}: the rows do not give the spread table 06 run {run.id} stored")
    rows_file = compare.write_rows(run.path(compare.ROWS_FILE), compared_rows)
    updated = {**metrics, "detectors": compare.detectors(calibration),
               "artifacts": sorted({*metrics.get("artifacts", []), runs._relative(rows_file)})}
    runs.atomic_write_json(run.path("metrics.json"), updated, digits=5)
    env = json.loads(run.path("env.json").read_text())
    env["backfilled"] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "by": "tools/backfill_comparison.py",
                         "added": [compare.ROWS_FILE, "metrics.json: detectors"]}
    runs.atomic_write_json(run.path("env.json"), env)
    return f"{batch}: 06 run {run.id}: {len(compared_rows)} rows from {len(compared)} runs written, spread table checked"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batches", nargs="+", help="batch names as in results/manifest.json, e.g. tiny_seed1")
    for batch in parser.parse_args(argv).batches:
        print(backfill(batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
