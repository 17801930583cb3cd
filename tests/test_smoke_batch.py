"""Papermill smoke run: the real notebooks, through the batch runner, on a handful of images."""
import json
import shutil

import pytest

from helpers import batch
from helpers.runs import ROOT

pytestmark = pytest.mark.slow


def test_smoke_batch_writes_metrics_and_resumes(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    monkeypatch.setenv("IRZSQ_RESULTS_DIR", str(results))
    for made in ("smoke", "sirst_synthetic_smoke"):  # made from nothing, as on a clean clone
        shutil.rmtree(ROOT / "data" / made, ignore_errors=True)
    assert batch.main(["params/smoke.yaml", "--timings", str(tmp_path / "timings.json")]) == 0
    runs = batch.load_batch(ROOT / "params" / "smoke.yaml")
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert [(t["notebook"], t["run_id"], t["status"]) for t in timings["runs"]] == [
        (r["notebook"], r["run_id"], "done") for r in runs]
    assert timings["made_runs"] == len(runs) and timings["made_minutes"] > 0 and "isa" in timings["cpu"]
    for run in runs:
        folder = results / run["notebook"] / run["run_id"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (folder / f"{run['notebook']}.ipynb").exists()
        params = run["params"]
        if run["notebook"] == "01_prepare_data":
            flir = metrics["datasets"]["flir_train"]
            assert flir["images"] == 16 and flir["dropped_instances"] >= 0
        elif run["notebook"] == "02_train_detector":
            assert 0.0 <= metrics["eval"]["AP"] <= 1.0 and metrics["eval"]["detections"] >= 0
            # two steps from scratch can leave every score under the 0.05 threshold; the fine-tune must detect
            assert metrics["eval"]["detections"] > 0 or params["STAGE"] == "pretrain"
            assert metrics["convergence"]["epochs"] == params["EPOCHS"]
            assert (folder / "model.pth").exists()
        elif run["notebook"] == "03_distill_calibration_data":
            assert metrics["bn_layers"] > 10 and set(metrics["pixel_statistics"]) == {str(k) for k in params["SNAPSHOT_AT"]}
            assert (folder / "distilled.pt").exists() and (folder / "preview.npz").exists()
        elif run["notebook"] == "04_quantize_evaluate":
            rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
            sweep = len(params["SWEEP_ITERATIONS"]) * params["SWEEP_BATCHES"] if params["SOURCE"] == "distilled" else 0
            assert len(rows) == metrics["rows"] == len(params["SETTINGS"]) * params["N_BATCHES"] + sweep
            assert all(0.0 <= r["AP"] <= 1.0 for r in rows)
        elif run["notebook"] == "05_compensate_dfmpc":
            settings = [r["setting"] for r in metrics["classifier"]["rows"]]
            assert settings == ["FP32", "naive 2/6 (TWN)", "DF-MPC 2/6 (TWN)", "naive 3/6", "DF-MPC 3/6"]
            assert all(0.0 <= r["metric"] <= 1.0 for r in metrics["classifier"]["rows"] + metrics["detector"]["rows"])
            assert len(metrics["ablation"]["lambda1"]) == 2 * len(params["LAMBDA1_SWEEP"])
        elif run["notebook"] == "08_mixed_precision_spmixq":
            assert metrics["claims"] and (folder / "policies.jsonl").exists() and (folder / "detector_policies.jsonl").exists()
        elif run["notebook"] == "09_export_onnx":
            assert metrics["int8_convs"]["qdq_ort"]["all_int8"] and metrics["int8_convs"]["qdq_ort"]["convs"] > 0
        elif run["notebook"] == "06_compare_calibration":
            assert {c["claim"].split(":")[0] for c in metrics["claims"]} >= {"finetune"}
            assert len(metrics["runs"]) == 3
    manifest = json.loads((results / "manifest.json").read_text())
    assert [r["finished"] for r in manifest["batches"]["smoke"]] == [True] * len(runs)
    # a second invocation finds every run finished and skips it
    capsys.readouterr()
    assert batch.main(["params/smoke.yaml"]) == 0
    assert capsys.readouterr().out.count("skipped") == len(runs)


def test_failure_names_notebook_and_cell(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IRZSQ_RESULTS_DIR", str(tmp_path / "results"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  - notebook: 02_train_detector\n    parameters: {DATA_ROOT: /nonexistent, EPOCHS: 1}\n")
    assert batch.main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "02_train_detector" in err and "failed in cell" in err and "DatasetError" in err and "FLIR ADAS v1.3" in err


def test_the_paper_scale_steps_of_the_readme_on_the_smoke_fixtures(tmp_path):
    """The README's *Paper scale* commands, in its order, with 2 gloo processes where it says torchrun:
    01 alone, then 02, 03 and 04 under torchrun (each rank 0 executing its notebooks), then the batch runner,
    which finds 01-04 finished and makes the rest."""
    import os
    import subprocess
    import sys
    results = tmp_path / "results"
    env = dict(os.environ, IRZSQ_RESULTS_DIR=str(results), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    batch_file = "params/smoke_paper_steps.yaml"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(29_500 + os.getpid() % 1000 + 1)]
    readme = (ROOT / "README.md").read_text()
    steps = [[sys.executable, "-m", "helpers.batch", batch_file, "--only", "01_prepare_data"],
             [*torchrun, "-m", "helpers.train", batch_file],
             [*torchrun, "-m", "helpers.distill", batch_file],
             [*torchrun, "-m", "helpers.zsq", batch_file],
             [sys.executable, "-m", "helpers.batch", batch_file]]
    for module in ("helpers.train", "helpers.distill", "helpers.zsq"):
        assert f"torchrun --nproc-per-node 4 -m {module} params/paper.yaml" in readme  # the steps are the README's
    outputs = []
    for step in steps:
        done = subprocess.run(step, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, " ".join(step) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    runs = batch.load_batch(ROOT / batch_file)
    made_by_torchrun = [r for r in runs if r["notebook"] in ("02_train_detector", "03_distill_calibration_data",
                                                             "04_quantize_evaluate")]
    for out, notebook in zip(outputs[1:4], ("02_train_detector", "03_distill_calibration_data", "04_quantize_evaluate")):
        assert out.count("on 2 process(es)") == sum(r["notebook"] == notebook for r in runs), out
    last = outputs[-1]
    assert last.count("skipped") == 1 + len(made_by_torchrun), last  # 01 and every torchrun run were finished
    manifest = json.loads((results / "manifest.json").read_text())
    assert [r["finished"] for r in manifest["batches"]["smoke_paper_steps"]] == [True] * len(runs)
