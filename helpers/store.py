"""What a batch stored, read once for the figures, tables and seed verdicts: `store.load(batch)`.

Everything is read from `results/` through the manifest a batch writes (`results/manifest.json`,
see `helpers.batch`): the comparison run of notebook 06 (its stored tables, and the per-batch rows
of the notebook 04 runs it compared, labelled and in mAP points: `compare.ROWS_FILE`), the loss
curves, pixel statistics and image previews of the notebook 03 runs, and the DF-MPC run of
notebook 05 when the batch has one. Nothing is recomputed. What is absent is recorded with the
reason, and `Stored.need` raises `MissingResults` with it when an artifact needs that part.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from helpers import compare, runs

SETTING = compare.PAPER_SETTING     # the paper's bit setting, W8A8
DFMPC_NOTEBOOK = "05_compensate_dfmpc"


class MissingResults(LookupError):
    """The batch has not stored what an artifact needs (the message says what and how to get it)."""


def first_row(rows: list[dict] | None, **match):
    """The first stored row whose fields equal `match`, else None."""
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)


@dataclass
class Stored:
    """What one batch stored, as the figures need it. mAP in points (x 100), as the paper prints it."""
    batch: str
    profile: str
    comparison: dict | None = None                  # metrics.json of the 06 run: table1, spread, sweep, claims, detectors, runs
    rows: pd.DataFrame | None = None                # the quantized evaluations 06 compared (its stored rows)
    distillations: list[dict] = field(default_factory=list)  # per 03 run: stage, loss, clamp, curves, preview, ...
    detectors: dict = field(default_factory=dict)   # stage -> params of its 02 run
    calibration: dict = field(default_factory=dict)  # run id -> params of the compared 04 runs
    dfmpc: dict | None = None                       # metrics.json of the 05 run
    missing: dict = field(default_factory=dict)     # what is absent and why: "comparison", "rows", "distillation", "dfmpc"

    @property
    def arch(self) -> str:
        return ", ".join(sorted({str(p.get("ARCH", "?")) for p in self.detectors.values()})) or "detector unknown"

    @property
    def ours(self) -> str:
        """How our side is named everywhere: the profile and the detector architecture."""
        return f"ours: profile {self.profile}, {self.arch}"

    def summary(self) -> str:
        """One stable line per kind of stored input: what the figures are drawn from, and what is missing."""
        lines = [f"batch {self.batch!r}, profile {self.profile}, detectors: {self.arch}",
                 f"comparison (06): {'stored' if self.comparison else 'missing'}",
                 f"quantized evaluations (04): {0 if self.rows is None else len(self.rows)} rows from {len(self.calibration)} runs",
                 f"distillation runs (03): {len(self.distillations)}, with image previews: "
                 f"{sum(bool(d['preview']) for d in self.distillations)}",
                 f"DF-MPC (05): {'stored' if self.dfmpc else 'missing'}"]
        return "\n".join(lines)

    def need(self, what: str):
        value = {"comparison": self.comparison, "rows": self.rows, "dfmpc": self.dfmpc,
                 "distillation": self.distillations or None}[what]
        if value is None:
            raise MissingResults(self.missing.get(what, f"batch {self.batch!r} stored no {what}"))
        return value

    def spread_value(self, stage: str, source: str, column: str = "mean", setting: str = SETTING):
        """One cell of notebook 06's stored spread table (mAP points), None when not stored."""
        row = first_row((self.comparison or {}).get("spread"), stage=stage, source=source, setting=setting)
        return None if row is None else row[column]

    def table1_map(self, stage: str, precision: str):
        """Notebook 06's stored Table 1 mAP of `stage` at `precision` ("W32-A32", "W8-A8"), None when not stored."""
        row = first_row((self.comparison or {}).get("table1"), model=stage, precision=precision)
        return None if row is None else row["mAP"]

    def fp32(self, stage: str):
        return self.table1_map(stage, "W32-A32")


def read_manifest(batch: str) -> list[dict]:
    """The batch's manifest entries whose run stored its metrics.json.

    A committed clone has the metrics but not the large artifacts (weights, distilled tensors), so
    'stored' here means metrics.json exists, not `runs.is_finished` (which also wants the artifacts).
    """
    path = runs.results_dir() / "manifest.json"
    if not path.exists():
        raise MissingResults(f"no manifest at {path}: run a batch first (`make reproduce`) or check out the committed results")
    batches = json.loads(path.read_text())["batches"]
    if batch not in batches:
        raise MissingResults(f"the manifest has no batch {batch!r}; it has {sorted(batches)}")
    return [e for e in batches[batch] if (runs.results_dir() / e["path"] / "metrics.json").exists()]


def run_of(entry: dict) -> runs.Run:
    """The run a manifest entry names."""
    return runs.Run(entry["notebook"], entry["params"], runs.results_dir() / entry["path"])


def newest(entries: list[dict], notebook: str) -> runs.Run | None:
    """The last run of `notebook` among the manifest entries, None when there is none."""
    found = [e for e in entries if e["notebook"] == notebook]
    return run_of(found[-1]) if found else None


def newest_run(batch: str, notebook: str) -> runs.Run:
    """The batch's stored run of `notebook` (the last one), or MissingResults."""
    run = newest(read_manifest(batch), notebook)
    if run is None:
        raise MissingResults(f"batch {batch!r} has no stored {notebook} run")
    return run


def benchmark(name: str, missing_ok: bool = False) -> dict | None:
    """A stored benchmark result, `results/benchmarks/<name>.json`; when absent MissingResults saying how to
    measure it, or None with `missing_ok` (a redirected results tree, as in the smoke batch, has none)."""
    path = runs.results_dir() / "benchmarks" / f"{name}.json"
    if not path.exists():
        if missing_ok:
            return None
        raise MissingResults(f"results/benchmarks/{name}.json is not stored: measure it with "
                             f"`python -m tools.benchmarks_{name}` on an idle CPU")
    return json.loads(path.read_text())


def _preview(path: Path) -> dict[int, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path) as archive:
        return {int(k.split("_")[1]): archive[k] for k in sorted(archive.files, key=lambda k: int(k.split("_")[1]))}


def load(batch: str = "tiny", profile: str | None = None) -> Stored:
    """Gather everything a batch stored that the figures need; absent parts are recorded in `missing`.

    `profile`, when given, must be the profile the batch's runs were made with (so no figure labels
    a tiny-scale result as another profile's).
    """
    entries = read_manifest(batch)
    profiles = sorted({str(e["params"]["PROFILE"]) for e in entries if "PROFILE" in e["params"]})
    if profile is not None and profiles != [profile]:
        raise ValueError(f"batch {batch!r} was run with profile(s) {profiles}, not {profile!r}")
    stored = Stored(batch, "+".join(profiles) or "unknown")
    stored.detectors = {e["params"]["STAGE"]: e["params"] for e in entries if e["notebook"] == "02_train_detector"}
    comparison = newest(entries, "06_compare_calibration")
    if comparison is None:
        stored.missing["comparison"] = f"batch {batch!r} has no stored 06_compare_calibration run"
    else:
        stored.comparison = comparison.metrics()
    if comparison is None:
        stored.missing["rows"] = stored.missing["comparison"]
    elif not comparison.path(compare.ROWS_FILE).exists():
        stored.missing["rows"] = (f"the 06_compare_calibration run {comparison.id} of batch {batch!r} stored no "
                                  f"{compare.ROWS_FILE} (made before Dec 2026): make it again with "
                                  f"`python -m helpers.batch params/{batch}.yaml --only 06_compare_calibration --force`")
    else:  # exactly the rows the comparison compared, so figures and tables agree with notebook 06
        stored.rows = compare.read_rows(comparison.path(compare.ROWS_FILE), comparison.params.get("CALIBRATOR", "percentile"))
        compared = set(stored.rows["run_id"])
        stored.calibration = {e["run_id"]: e["params"] for e in entries if e["run_id"] in compared}
    for entry in entries:
        if entry["notebook"] != "03_distill_calibration_data":
            continue
        run = run_of(entry)
        curves = run.path("loss_curves.json")
        stored.distillations.append({
            "run_id": run.id, "stage": run.params["STAGE"], "loss": run.params["LOSS"], "clamp": run.params["CLAMP"],
            "curves": json.loads(curves.read_text()) if curves.exists() else None,
            "preview": _preview(run.path("preview.npz")),
            "pixel_statistics": run.metrics().get("pixel_statistics", {})})
    if not stored.distillations:
        stored.missing["distillation"] = f"batch {batch!r} has no stored 03_distill_calibration_data run"
    dfmpc = newest(entries, DFMPC_NOTEBOOK)
    if dfmpc is None:
        stored.missing["dfmpc"] = (f"batch {batch!r} has no stored {DFMPC_NOTEBOOK} run "
                                   f"(add the notebook to the batch file and run the batch)")
    else:
        stored.dfmpc = dfmpc.metrics()
    return stored
