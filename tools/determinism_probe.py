"""Why a re-made training differs on another machine: the CPU's kernel family or a competing load?

Replays the first epoch of the tiny batch's RGB pretraining (notebook 02, run 2 of `params/tiny.yaml`:
same parameters, seeding, data order and schedule as `train.fit`) in fresh processes under several
conditions, and compares each epoch's mean loss and final weights with the committed run's first
epoch (`train_log.jsonl`) and with each other:

- `default`: this CPU's own kernels, idle;
- `default, loaded`: the same while another process keeps both cores busy with float work;
- `ATEN_CPU_CAPABILITY=avx2`, and with oneDNN and MKL held to AVX2 as well: the kernels an AVX2-only
  CPU (e.g. the AMD EPYC of the fresh-clone report) runs, on this machine.

    python -m tools.determinism_probe            # -> results/benchmarks/determinism.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.runs import ROOT, atomic_write_json, cpu_info

PRETRAIN_RUN = 1  # index of the pretraining in params/tiny.yaml
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2"}
AVX2_ALL = {**AVX2, "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CONDITIONS = {"default": ({}, False), "default, loaded": ({}, True), "ATEN_CPU_CAPABILITY=avx2": (AVX2, False),
              "avx2 in ATen, oneDNN and MKL": (AVX2_ALL, False)}


def first_epoch(batch_file: str, iterations: int) -> dict:
    """The pretraining's first epoch (or its first `iterations` steps), exactly as `train.fit` runs it."""
    import torch
    from helpers import batch, config, data, models, train
    p = batch.load_batch(ROOT / batch_file)[PRETRAIN_RUN]["params"]
    config.seed_everything(p["SEED"])
    train_set = data.CocoDetectionSet(p["DATA_ROOT"], p["DATASET"], "train", p["CLASSES"] or None, p["LABELS"], train=True)
    model = models.build_detector(p["ARCH"], train_set.num_classes, p["MIN_SIZE"], p["MAX_SIZE"], weights=p["INIT"])
    schedule = train.Schedule(p["EPOCHS"], p["OPTIMIZER"], p["LR"], p["WEIGHT_DECAY"], p["MOMENTUM"], p["LR_SCHEDULE"],
                              p["LR_STEP_EPOCHS"], p["LR_GAMMA"], p["WARMUP_ITERS"], p["GRAD_CLIP"])
    loader = data.make_loader(train_set, p["BATCH_SIZE"], train=True, seed=p["SEED"])
    optimizer = train.make_optimizer(model, schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.lr_factor(schedule, len(loader)))
    torch.manual_seed(p["SEED"] * 100_003)
    loader.generator.manual_seed(p["SEED"] * 100_003)
    if iterations:
        loader = [b for _, b in zip(range(iterations), loader)]
    started = time.perf_counter()
    losses = train.train_one_epoch(model, optimizer, scheduler, loader, schedule.grad_clip, progress=False)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(b"".join(v.detach().contiguous().numpy().tobytes() for v in model.state_dict().values()))
    return {"loss": losses["loss"], "weights_sha256": digest.hexdigest()[:16], "seconds": round(seconds, 2),
            "capability": torch.backends.cpu.get_cpu_capability(), "run": batch.load_batch(ROOT / batch_file)[PRETRAIN_RUN]["run_id"]}


def _load() -> subprocess.Popen:
    code = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1500, 1500)\nwhile True:\n    a = (a @ a).tanh()\n"
    return subprocess.Popen([sys.executable, "-c", code])


def measure(env: dict, loaded: bool, batch_file: str, iterations: int) -> dict:
    load = _load() if loaded else None
    try:
        out = subprocess.run([sys.executable, "-m", "tools.determinism_probe", "--child", "--batch", batch_file,
                              "--iterations", str(iterations)], cwd=ROOT, env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
    finally:
        if load is not None:
            load.kill()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="params/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=0, help="steps of the first epoch to replay, 0 for all")
    parser.add_argument("--out", default="results/benchmarks/determinism.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(first_epoch(args.batch, args.iterations)))
        return 0
    results = {name: measure(env, loaded, args.batch, args.iterations) for name, (env, loaded) in CONDITIONS.items()}
    run = results["default"]["run"]
    log = ROOT / "results" / "02_train_detector" / run / "train_log.jsonl"
    committed = json.loads(log.read_text().splitlines()[0])["loss"] if log.exists() and not args.iterations else None
    for r in results.values():
        r["same_as_committed"] = None if committed is None else r["loss"] == committed
        r["same_weights_as_default"] = r["weights_sha256"] == results["default"]["weights_sha256"]
    report = {"what": "first epoch of the tiny RGB pretraining replayed under each condition", "run": run,
              "iterations": args.iterations or "whole first epoch", "committed_first_epoch_loss": committed,
              "cpu": cpu_info(), "conditions": results}
    atomic_write_json(ROOT / args.out, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
