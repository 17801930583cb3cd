"""torchrun + DDP on the CPU (gloo, 2 processes) against one process with the same global batch.

The documented command itself is run (`python -m torch.distributed.run --nproc-per-node 2 -m
helpers.train BATCH --train-only --no-augment`, torchrun's module form) on a tiny detector, a few
fixture images and 2 epochs; the single-process reference is the same command without torchrun.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import config, data, distributed, models
from helpers import runs
from helpers.runs import ROOT, read_jsonl

# One step of the paper's optimiser (SGD, 4.2.1) on a global batch of 8 (the paper's), split 4 + 4 over
# the two processes. Why one step: on these synthetic frames (flat backgrounds, so max-pooling sees exact
# ties that a last-bit difference breaks the other way) the second step's gradient moves by 1e-3 when a
# weight moves by one float ulp, in one process as well (measured: a 1e-8 relative perturbation of the
# weights changes the conv1 gradient of step 2 by 0.16 %). Two processes round differently from one, so
# after several steps they agree only to that amplified rounding, which a strict test cannot tell from a
# bug; after one step they must agree to float rounding, and a missing piece (per-rank BatchNorm
# statistics, a wrong gradient average, another data order) breaks that by far more.
TRAIN_RUN = {"PROFILE": "tiny", "SEED": 0, "STAGE": "finetune", "INIT": "none", "EPOCHS": 1, "BATCH_SIZE": 8,
             "TRAIN_LIMIT": 8, "VAL_LIMIT": 5, "OPTIMIZER": "sgd", "LR": 0.01, "LR_SCHEDULE": "step",
             "WARMUP_ITERS": 0, "EVAL_EVERY": 1}


def _batch_file(tmp_path, tiny_root) -> Path:
    path = tmp_path / "ddp.yaml"
    params = dict(TRAIN_RUN, DATA_ROOT=str(tiny_root))
    path.write_text("runs:\n  - notebook: 02_train_detector\n    parameters: " + json.dumps(params) + "\n")
    return path


def _train(batch_file: Path, results: Path, processes: int, notebook: bool = False) -> Path:
    env = dict(os.environ, IRZSQ_RESULTS_DIR=str(results), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-port", str(29_500 + os.getpid() % 1000)] if processes > 1 else [sys.executable])
    only = [] if notebook else ["--train-only"]
    done = subprocess.run([*launcher, "-m", "helpers.train", str(batch_file), *only, "--no-augment"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder,) = (results / "02_train_detector").iterdir()
    return folder


def test_two_gloo_processes_train_the_same_weights_and_map_as_one(tmp_path, tiny_root):
    batch_file = _batch_file(tmp_path, tiny_root)
    one = _train(batch_file, tmp_path / "one", 1)
    two = _train(batch_file, tmp_path / "two", 2, notebook=True)  # the documented command, notebook included
    assert one.name == two.name  # the same run id: the batch's notebook-02 run
    a = torch.load(one / "checkpoint.pth", weights_only=True)
    b = torch.load(two / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == TRAIN_RUN["EPOCHS"] - 1
    for key, value in a["model"].items():
        if value.is_floating_point():
            assert torch.allclose(value, b["model"][key], rtol=1e-5, atol=1e-6), key
    config.seed_everything(0)  # the initial weights both started from: the step moved them
    init = models.build_detector(models.TINY_ARCH, 4, 128, 160).state_dict()
    assert (a["model"]["backbone.body.conv1.weight"] - init["backbone.body.conv1.weight"]).abs().max() > 1e-4
    log_one, log_two = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    assert [r["epoch"] for r in log_two] == list(range(TRAIN_RUN["EPOCHS"]))  # rank 0 alone wrote the log
    for r1, r2 in zip(log_one, log_two):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)  # the global mean, reduced over ranks
        assert r2["val_AP"] == pytest.approx(r1["val_AP"], abs=1e-4)  # 5 images over 2 ranks, gathered before COCOeval
        assert r2["val_AP50"] == pytest.approx(r1["val_AP50"], abs=1e-4)
    assert (one / "params.json").exists() and (two / "params.json").exists()
    assert not list(two.glob(".*.tmp"))  # no rank left a temp file
    # rank 0 then executed notebook 02 for the run: it found the last epoch's checkpoint, trained nothing
    # more, evaluated and finished the run as the batch runner does (so `helpers.batch` skips it)
    assert runs.is_finished(two) and (two / "02_train_detector.ipynb").exists()
    assert len(read_jsonl(two / "train_log.jsonl")) == TRAIN_RUN["EPOCHS"]
    final = torch.load(two / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(final[k], b["model"][k]) for k in final)
    # its single-process evaluation of the final weights equals the gathered one of the last epoch
    assert json.loads((two / "metrics.json").read_text())["eval"]["AP"] == pytest.approx(log_two[-1]["val_AP"], abs=1e-4)


def test_sharded_sampler_splits_each_single_process_batch(tiny_root):
    """Step k of N ranks together holds the images of one process's step k (any world size)."""
    ds = data.CocoDetectionSet(tiny_root, "flir", "train", classes=data.FLIR_CLASSES, limit=12)
    single = data.make_loader(ds, 4, train=True, seed=0)
    single.generator.manual_seed(7 * 100_003 + 3)  # as train.fit does for seed 7, epoch 3
    single_batches = [sorted(int(t["image_id"]) for t in targets) for _, targets in single]
    for world in (2, 4):
        per_rank = []
        for r in range(world):
            sampler = distributed.ShardedSampler(ds, shuffle=True, seed=7, num_replicas=world, rank=r)
            sampler.set_epoch(3)
            per_rank.append([ds.ids[i] for i in sampler])
        step = 4 // world
        merged = [sorted(i for r in range(world) for i in per_rank[r][k * step:(k + 1) * step]) for k in range(3)]
        assert merged == single_batches


def test_single_process_helpers_are_the_identity():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with distributed.synced_batchnorm(model) as same:
        assert distributed.wrap(same) is model and type(model[1]) is torch.nn.BatchNorm2d
    assert distributed.map_sharded(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert distributed.mean_over_ranks({"loss": 2.0}) == {"loss": 2.0}
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.per_rank_batch(8) == 8
    with distributed.alone():
        assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1


DISTILL_RUN = {"PROFILE": "tiny", "SEED": 0, "STAGE": "finetune", "NUM_IMAGES": 6, "BATCH_SIZE": 2, "ITERATIONS": 3,
               "SNAPSHOT_AT": [0, 3]}  # three batches over two ranks: rank 0 distils two, rank 1 one


def _distill(batch_file: Path, results: Path, processes: int, notebook: bool = False) -> Path:
    env = dict(os.environ, IRZSQ_RESULTS_DIR=str(results), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-port", str(30_500 + os.getpid() % 1000)] if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, "-m", "helpers.distill", str(batch_file), *([] if notebook else ["--distill-only"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder,) = (results / "03_distill_calibration_data").iterdir()
    return folder


def _finished_detector(results: Path, run: dict, detecting: bool = False) -> None:
    """A finished notebook-02 run (untrained tiny weights) for the 03 run to distil from.

    `detecting`: with every score near 0.5 and boxes grown from the anchors to the fixture's tall
    objects, so the untrained detector has a small mAP (about 0.02 on 4 val images) that each
    quantized and calibrated copy moves (at its own prior, no detection clears the 0.05 score)."""
    from helpers import batch, train
    os.environ["IRZSQ_RESULTS_DIR"] = str(results)
    try:
        p = run["params"]
        made = runs.open_run("02_train_detector", p)
        torch.manual_seed(0)
        model = models.build_detector(p["ARCH"], 4, p["MIN_SIZE"], p["MAX_SIZE"])
        if detecting:
            with torch.no_grad():
                model.head.classification_head.cls_logits.bias.zero_()
                deltas = model.head.regression_head.bbox_reg
                deltas.weight.zero_()
                deltas.bias.view(-1, 4).copy_(torch.tensor([0.0, 0.0, math.log(4), math.log(10)]))
        made.finish({"stage": p["STAGE"]}, artifacts=[train.save_weights(model, made.path("model.pth"))])
    finally:
        os.environ.pop("IRZSQ_RESULTS_DIR")


def test_distillation_batches_shard_over_ranks_with_the_single_process_result(tmp_path, tiny_root, monkeypatch):
    """`torchrun --nproc-per-node 2 -m helpers.distill BATCH`: each rank distils every other batch, rank 0
    writes exactly the images one process distils, then executes notebook 03, which distils nothing."""
    from helpers import batch
    batch_file = tmp_path / "distill.yaml"
    common = {"PROFILE": "tiny", "SEED": 0, "DATA_ROOT": str(tiny_root)}
    batch_file.write_text("common: " + json.dumps(common) + "\nruns:\n  - notebook: 02_train_detector\n    parameters: "
                          + json.dumps({"STAGE": "finetune", "EPOCHS": 1}) + "\n  - notebook: 03_distill_calibration_data\n"
                          "    parameters: " + json.dumps({k: v for k, v in DISTILL_RUN.items() if k not in common}) + "\n")
    detector = batch.load_batch(batch_file)[0]
    for results in (tmp_path / "one", tmp_path / "two"):
        _finished_detector(results, detector)
    one = _distill(batch_file, tmp_path / "one", 1)
    two = _distill(batch_file, tmp_path / "two", 2, notebook=True)
    assert one.name == two.name
    a, b = torch.load(one / "distilled.pt", weights_only=True), torch.load(two / "distilled.pt", weights_only=True)
    assert sorted(a) == sorted(b) == DISTILL_RUN["SNAPSHOT_AT"] and a[3].shape[0] == DISTILL_RUN["NUM_IMAGES"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3), k  # float16 files: equal to storage rounding
    assert not torch.equal(a[0][:2], a[0][2:4])  # the batches are seeded apart: rank 1's batch is not rank 0's
    curves_one, curves_two = (json.loads((f / "loss_curves.json").read_text()) for f in (one, two))
    assert curves_two["loss"] == pytest.approx(curves_one["loss"], rel=1e-4)
    assert runs.is_finished(two) and not runs.is_finished(one) and (two / "03_distill_calibration_data.ipynb").exists()
    assert not list(two.glob(".*.tmp"))


QUANTIZE_RUN = {"STAGE": "finetune", "SOURCE": "gaussian", "N_BATCHES": 3, "CALIB_BATCH": 2, "SETTINGS": ["W8A8", "W4A4"],
                "VAL_LIMIT": 4}  # six cells; the first one stored, five left: rounds of two, the last one uneven


def _quantize(batch_file: Path, results: Path, processes: int, notebook: bool = False) -> Path:
    env = dict(os.environ, IRZSQ_RESULTS_DIR=str(results), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-port", str(31_500 + os.getpid() % 1000)] if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, "-m", "helpers.zsq", str(batch_file), *([] if notebook else ["--grid-only"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # a rank left waiting hangs
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder,) = (results / "04_quantize_evaluate").iterdir()
    return folder


def test_quantize_evaluate_grid_shards_over_ranks_with_the_single_process_rows(tmp_path, tiny_root):
    """`torchrun --nproc-per-node 2 -m helpers.zsq BATCH`: each rank evaluates every other missing grid cell,
    rank 0 appends exactly the rows (values, keys, order) one process appends, then executes notebook 04,
    which evaluates nothing more and finishes the run."""
    from helpers import batch
    batch_file = tmp_path / "quantize.yaml"
    common = {"PROFILE": "tiny", "SEED": 0, "DATA_ROOT": str(tiny_root)}
    batch_file.write_text("common: " + json.dumps(common) + "\nruns:\n  - notebook: 02_train_detector\n    parameters: "
                          + json.dumps({"STAGE": "finetune", "EPOCHS": 1}) + "\n  - notebook: 04_quantize_evaluate\n"
                          "    parameters: " + json.dumps(QUANTIZE_RUN) + "\n")
    detector = batch.load_batch(batch_file)[0]
    for results in (tmp_path / "one", tmp_path / "two"):
        _finished_detector(results, detector, detecting=True)
    # the two-process run resumes a run interrupted after its first row (one process's row 0)
    one = _quantize(batch_file, tmp_path / "one", 1)
    rows_one = read_jsonl(one / "rows.jsonl")
    (tmp_path / "two" / "04_quantize_evaluate" / one.name).mkdir(parents=True)
    (tmp_path / "two" / "04_quantize_evaluate" / one.name / "rows.jsonl").write_text(json.dumps(rows_one[0], sort_keys=True) + "\n")
    two = _quantize(batch_file, tmp_path / "two", 2, notebook=True)
    assert one.name == two.name
    grid = [(s, None, b) for s in QUANTIZE_RUN["SETTINGS"] for b in range(QUANTIZE_RUN["N_BATCHES"])]
    assert [(r["setting"], r["iteration"], r["batch"]) for r in rows_one] == grid
    assert all(r["AP"] > 0 for r in rows_one) and len({r["AP"] for r in rows_one}) > 3  # each cell its own mAP
    rows_two = read_jsonl(two / "rows.jsonl")
    assert rows_two == rows_one  # same rows, keys and order; AP and ranges equal, not close
    assert (two / "rows.jsonl").read_bytes() == (one / "rows.jsonl").read_bytes()
    # rank 0 then executed notebook 04, which found every row and finished the run with them
    assert runs.is_finished(two) and not runs.is_finished(one) and (two / "04_quantize_evaluate.ipynb").exists()
    assert json.loads((two / "metrics.json").read_text())["rows"] == len(grid)
    assert read_jsonl(two / "rows.jsonl") == rows_one  # the notebook appended nothing
