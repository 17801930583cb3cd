"""The paper batch is the whole paper: every notebook 01-06 at the paper's settings, keys checked, dry-run."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import batch
from helpers.runs import ROOT

PAPER = ROOT / "params" / "paper.yaml"
IMAGENET = ROOT / "params" / "paper_imagenet.yaml"


@pytest.fixture(scope="module")
def paper_runs():
    return batch.load_batch(PAPER)


def test_every_key_of_the_paper_batches_is_a_notebook_parameter_of_the_right_type():
    for batch_file in (PAPER, IMAGENET):
        spec = batch.batch_spec(batch_file)
        declared_anywhere = set()
        for entry in spec["runs"]:
            defaults = batch.notebook_defaults(batch.notebook_path(entry["notebook"]))
            declared_anywhere |= set(defaults)
            for key, value in (entry.get("parameters") or {}).items():
                assert key in defaults, f"{batch_file.name}: {entry['notebook']} has no parameter {key}"
                default = defaults[key]
                assert type(value) is type(default) or (isinstance(default, float) and isinstance(value, int)), \
                    f"{batch_file.name}: {entry['notebook']} {key}={value!r}, default {default!r}"
        assert set(spec["common"]) <= declared_anywhere, spec["common"]


def test_a_common_key_no_notebook_declares_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("common: {PROFILE: paper, SEDD: 0}\nruns:\n  - notebook: 01_prepare_data\n")
    with pytest.raises(batch.BatchError, match=r"common sets \['SEDD'\], which no notebook"):
        batch.load_batch(bad)


def test_paper_batch_covers_notebooks_01_to_06_at_the_papers_settings(paper_runs):
    assert [n for n in dict.fromkeys(r["notebook"] for r in paper_runs)] == [
        "01_prepare_data", "02_train_detector", "03_distill_calibration_data", "04_quantize_evaluate",
        "05_compensate_dfmpc", "06_compare_calibration"]
    assert all(r["params"]["PROFILE"] == "paper" and r["params"]["DATA_ROOT"] == "data" for r in paper_runs)
    finetune = [r["params"] for r in paper_runs if r["notebook"] == "02_train_detector" and r["params"]["STAGE"] == "finetune"]
    assert finetune == [dict(finetune[0], EPOCHS=40, BATCH_SIZE=8, OPTIMIZER="sgd", LR=0.01, MOMENTUM=0.9,
                             WEIGHT_DECAY=0.0001, LR_SCHEDULE="step", LR_STEP_EPOCHS=10, LR_GAMMA=0.2)]  # 4.2.1
    distill = {(p["STAGE"], p["LOSS"]): p for r in paper_runs if r["notebook"] == "03_distill_calibration_data"
               for p in [r["params"]] if p["CLAMP"]}
    assert set(distill) == {(s, l) for s in ("pretrain", "finetune") for l in ("mean", "mean+std")}  # Fig. 2
    for p in distill.values():
        assert (p["NUM_IMAGES"], p["BATCH_SIZE"], p["LR"]) == (1024, 8, 0.1)  # 4.2.2, 4.2.3
    quantize = [r["params"] for r in paper_runs if r["notebook"] == "04_quantize_evaluate"]
    fig3 = {p["SOURCE"]: p for p in quantize if p["STAGE"] == "finetune" and p["SETTINGS"] == ["W8A8"]
            and p["DISTILL_CLAMP"] and p["DISTILL_LOSS"] == "mean"}
    assert fig3["distilled"]["N_BATCHES"] * fig3["distilled"]["CALIB_BATCH"] == 1024  # 128 batches of 8
    assert fig3["real"]["N_BATCHES"] == 128 and fig3["real"]["CALIB_BATCH"] == 8
    for p in quantize:
        assert p["VAL_LIMIT"] == 0 and p["PERCENTILE"] == 99.99  # all of val; 4.2.2
    sweeps = [p for p in quantize if p["SWEEP_ITERATIONS"]]
    assert {(p["STAGE"], p["DISTILL_LOSS"]) for p in sweeps} == set(distill)  # Fig. 2a/2b, both losses
    for p in sweeps:
        assert p["SWEEP_BATCHES"] * p["CALIB_BATCH"] == 128  # 4.3: 128 distilled samples per iteration count
        source = distill[(p["STAGE"], p["DISTILL_LOSS"])]
        assert set(p["SWEEP_ITERATIONS"]) < set(source["SNAPSHOT_AT"]) and max(source["SNAPSHOT_AT"]) == source["ITERATIONS"]
        assert p["N_BATCHES"] * p["CALIB_BATCH"] <= source["NUM_IMAGES"]


def test_imagenet_dfmpc_runs_are_behind_their_own_file(paper_runs):
    assert {r["params"]["CLASSIFIER"] for r in paper_runs if r["notebook"] == "05_compensate_dfmpc"} == {"thermal_patches"}
    imagenet = batch.load_batch(IMAGENET)
    assert [r["params"]["CLASSIFIER"] for r in imagenet] == ["resnet18", "resnet50"]
    assert all(r["params"]["PROFILE"] == "paper" for r in imagenet)
    text = PAPER.read_text()
    assert "paper_imagenet.yaml" in text and "07_task_specific_zsq" in text  # the switch and the 07-09 placeholder


def test_paper_batch_dry_run_lists_every_run():
    done = subprocess.run([sys.executable, "-m", "helpers.batch", str(PAPER), "--list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    runs = yaml.safe_load(PAPER.read_text())["runs"]
    assert len(lines) == len(runs) and lines[-1].startswith(f"[{len(runs)}/{len(runs)}] 06_compare_calibration")
