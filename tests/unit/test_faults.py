"""Runs that die lose nothing: real processes killed with SIGKILL (not an exception) at the worst moment,
then run again. Each snippet kills itself from inside the work loop (`os.kill(os.getpid(), SIGKILL)`),
so the kill lands at a known step and the test is deterministic."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import runs
from helpers.runs import ROOT, read_jsonl

SETUP = """
import os, signal, sys, torch
from helpers import config, data, distill, models, quant, runs, train, zsq
ROOT_DATA, OUT, KILL_AT = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = 0
def maybe_die():
    global calls
    calls += 1
    if calls == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
"""

TRAIN = SETUP + """
class Dying(torch.utils.data.Dataset):  # dies while serving an image: mid-epoch, mid-step
    def __init__(self, ds): self.ds = ds
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        maybe_die()
        return self.ds[i]
config.seed_everything(0)
ds = data.CocoDetectionSet(ROOT_DATA, "flir", "train", data.FLIR_CLASSES, limit=6)
model = models.build_detector(models.TINY_ARCH, ds.num_classes, 64, 80)
schedule = train.Schedule(3, "sgd", 0.005, lr_schedule="step", warmup_iters=0, grad_clip=10.0)
train.fit(model, data.make_loader(Dying(ds), 3, train=True, seed=0), schedule, OUT, seed=0)
train.save_weights(model, os.path.join(OUT, "model.pth"))
"""

DISTILL = SETUP + """
real = distill.distill
def dying(*a, **k):
    maybe_die()
    return real(*a, **k)
distill.distill = dying
torch.manual_seed(0)
model = models.build_detector(models.TINY_ARCH, 4, 64, 80).eval()
run = runs.open_run("03_distill_calibration_data", {"OUT": OUT})
distill.distill_or_load(run, model, [0, 2], num_images=6, batch_size=2, seed=0, iterations=2)
"""

SWEEP = SETUP + """
real = zsq.quantized_map
def dying(*a, **k):
    maybe_die()
    return real(*a, **k)
zsq.quantized_map = dying
torch.manual_seed(0)
val = data.CocoDetectionSet(ROOT_DATA, "flir", "val", data.FLIR_CLASSES, limit=2)
model = models.build_detector(models.TINY_ARCH, val.num_classes, 64, 80).eval()
batches = {None: zsq.gaussian_batches(3, 2, (64, 80), seed=0)}
zsq.run_grid(model, batches, True, val, ["W8A8", "W4A8"], __import__("pathlib").Path(OUT) / "rows.jsonl")
"""


def _run(snippet: str, tiny_root, out: Path, kill_at: int = 0, results: Path | None = None) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if results is not None:
        env["IRZSQ_RESULTS_DIR"] = str(results)
    done = subprocess.run([sys.executable, "-c", snippet, str(tiny_root), str(out), str(kill_at)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def _no_partial_files(folder: Path, killed_writer: bool = False) -> None:
    """No truncated JSON/JSONL; temp files only where a writer was killed mid-write (`.<name>.*.tmp`,
    never read, removed by the next write of that file)."""
    temps = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert killed_writer or not temps, temps
    assert all(p.name.startswith(".") for p in temps), temps
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())
    for path in folder.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)


def test_training_killed_mid_epoch_resumes_losing_only_that_epoch(tiny_root, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(TRAIN, tiny_root, straight) == 0
    # 6 images, batches of 3: epoch 1 reads images 7-12; die at image 10 (its second step)
    assert _run(TRAIN, tiny_root, killed, kill_at=10) == -signal.SIGKILL
    ckpt = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and [r["epoch"] for r in read_jsonl(killed / "train_log.jsonl")] == [0]
    _no_partial_files(killed)
    assert _run(TRAIN, tiny_root, killed) == 0
    assert [r["epoch"] for r in read_jsonl(killed / "train_log.jsonl")] == [0, 1, 2]
    a = torch.load(straight / "model.pth", weights_only=True)["model"]
    b = torch.load(killed / "model.pth", weights_only=True)["model"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key  # same seed, same process layout: the same bits


def test_distillation_killed_mid_way_leaves_nothing_half_written(tiny_root, tmp_path):
    results = tmp_path / "results"
    folder = lambda out: results / "03_distill_calibration_data" / runs.run_id({"OUT": str(out)})  # noqa: E731
    straight, killed = tmp_path / "a", tmp_path / "b"
    assert _run(DISTILL, tiny_root, straight, results=results) == 0
    assert _run(DISTILL, tiny_root, killed, kill_at=2, results=results) == -signal.SIGKILL  # in batch 2 of 3
    assert not (folder(killed) / "distilled.pt").exists() and not (folder(killed) / "loss_curves.json").exists()
    _no_partial_files(folder(killed))
    assert _run(DISTILL, tiny_root, killed, results=results) == 0
    a = torch.load(folder(straight) / "distilled.pt", weights_only=True)
    b = torch.load(folder(killed) / "distilled.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((folder(straight) / "loss_curves.json").read_text())["loss"] == \
        json.loads((folder(killed) / "loss_curves.json").read_text())["loss"]


def test_quantization_sweep_killed_resumes_from_its_last_row(tiny_root, tmp_path):
    straight, killed = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), killed.mkdir()
    assert _run(SWEEP, tiny_root, straight) == 0
    assert _run(SWEEP, tiny_root, killed, kill_at=4) == -signal.SIGKILL  # 3 of 6 rows measured
    assert len(read_jsonl(killed / "rows.jsonl")) == 3
    with open(killed / "rows.jsonl", "a") as fh:  # and a torn last line, as a kill inside the write leaves
        fh.write('{"setting": "W4A8", "iter')
    assert _run(SWEEP, tiny_root, killed) == 0
    rows = [json.loads(line) for line in (killed / "rows.jsonl").read_text().splitlines() if not line.startswith('{"setting": "W4A8", "iter')]
    assert len(rows) == 6 and len({(r["setting"], r["batch"]) for r in rows}) == 6  # each row once
    key = lambda r: (r["setting"], r["batch"])  # noqa: E731
    assert sorted(rows, key=key) == sorted(read_jsonl(straight / "rows.jsonl"), key=key)
    assert len(read_jsonl(killed / "rows.jsonl")) == 6  # the row after the torn line was not glued to it


def test_a_failing_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """Disk full: the write raises half-way; the old checkpoint and JSON stay as they were, no temp file."""
    runs.atomic_write_json(tmp_path / "metrics.json", {"AP": 0.3})
    runs.atomic_torch_save(tmp_path / "checkpoint.pth", {"model": {"w": torch.ones(3)}, "epoch": 4})

    def disk_full(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runs.atomic_torch_save(tmp_path / "checkpoint.pth", {"model": {"w": torch.zeros(3)}, "epoch": 5})
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        runs.atomic_write_json(tmp_path / "metrics.json", {"AP": 0.1})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"AP": 0.3}
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "metrics.json"]


MINI_BATCH = """common: {{PROFILE: tiny, SEED: 0, DATA_ROOT: {root}}}
runs:
  - notebook: 01_prepare_data
    parameters: {{N_TRAIN_THERMAL: 16, N_VAL_THERMAL: 8, N_TRAIN_RGB: 16, N_VAL_RGB: 8}}
  - notebook: 02_train_detector
    parameters: {{INIT: none, EPOCHS: 3, TRAIN_LIMIT: 8, VAL_LIMIT: 4, WARMUP_ITERS: 2, EVAL_EVERY: 3, MIN_SIZE: 64, MAX_SIZE: 80}}
"""


@pytest.mark.slow
def test_batch_killed_mid_run_skips_finished_runs_and_redoes_the_partial_one(tmp_path):
    """SIGKILL the batch runner and its notebook kernel while notebook 02 trains (its first checkpoint is
    on disk); the rerun skips notebook 01, resumes 02 from that checkpoint and finishes it."""
    import time

    import psutil
    root = tmp_path / "data"
    batch_file = tmp_path / "mini.yaml"
    batch_file.write_text(MINI_BATCH.format(root=json.dumps(str(root))))
    results = tmp_path / "results"
    env = dict(os.environ, IRZSQ_RESULTS_DIR=str(results), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    command = [sys.executable, "-m", "helpers.batch", str(batch_file)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and not list((results / "02_train_detector").glob("*/checkpoint.pth")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    victims = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:  # the runner and the kernel it started: a machine losing power
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    (train_dir,) = (results / "02_train_detector").iterdir()
    assert not (train_dir / "metrics.json").exists()
    _no_partial_files(results, killed_writer=True)  # the kill may land inside the next checkpoint's write
    torch.load(train_dir / "checkpoint.pth", weights_only=True)  # complete, never half-written
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skipped") == 1  # notebook 01
    assert [r["epoch"] for r in read_jsonl(train_dir / "train_log.jsonl")] == [0, 1, 2]
    assert json.loads((train_dir / "metrics.json").read_text())["convergence"]["epochs"] == 3
    _no_partial_files(results)
