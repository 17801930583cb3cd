"""`make verify`: a batch made again is judged against the committed one by the seed spread."""
import json
import shutil

import pytest

from helpers import store
from helpers.runs import ROOT
from tools import verify


@pytest.fixture(scope="module")
def committed():
    with verify.results_at(ROOT / "results"):
        return {b: store.load(b) for b in verify.SEED_BATCHES}


def _made_with(tmp_path, edit) -> dict:
    """A copy of the committed tiny results with the 06 metrics changed by `edit`."""
    made = tmp_path / "results"
    shutil.copytree(ROOT / "results", made, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.ipynb", "log.txt"))
    with verify.results_at(made):
        entry = [e for e in store.read_manifest("tiny") if e["notebook"] == "06_compare_calibration"][-1]
        path = made / entry["path"] / "metrics.json"
        metrics = json.loads(path.read_text())
        edit(metrics)
        path.write_text(json.dumps(metrics))
        return {"tiny": store.load("tiny")}


def test_the_committed_batch_agrees_with_itself(committed):
    report = verify.compare(committed, committed)
    assert report["agrees"] and all(n["gap"] == 0 for n in report["numbers"])
    assert all(n["seed_std"] > 0 for n in report["numbers"])  # three seed batches give a spread to judge by


def test_a_gap_beyond_the_seed_spread_fails_and_one_within_passes(tmp_path, committed):
    def shift(points):
        def edit(metrics):
            row = next(r for r in metrics["table1"] if r["model"] == "finetune" and r["precision"] == "W32-A32")
            row["mAP"] += points
        return edit

    far = verify.compare(_made_with(tmp_path / "far", shift(10.0)), committed)
    fp32 = next(n for n in far["numbers"] if n["number"] == "FP32 mAP, fine-tuned")
    assert not far["agrees"] and not fp32["within"] and fp32["gap"] == pytest.approx(10.0)
    near = verify.compare(_made_with(tmp_path / "near", shift(0.5)), committed)
    assert next(n for n in near["numbers"] if n["number"] == "FP32 mAP, fine-tuned")["within"]


def test_a_changed_verdict_is_judged_only_where_the_seeds_agree(tmp_path, committed):
    def reorder(metrics):
        row = next(r for r in metrics["separating_three_sources"] if r["setting"] == "W4A8")
        row["ranking"] = "gaussian > real > distilled mean"
    report = verify.compare(_made_with(tmp_path, reorder), committed)
    w4a8 = next(v for v in report["verdicts"] if v["verdict"].startswith("W4A8 order"))
    assert not w4a8["same"] and w4a8["judged"] == w4a8["stable_over_seeds"]
    assert report["agrees"] == (not w4a8["stable_over_seeds"])
