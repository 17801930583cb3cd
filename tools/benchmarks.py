"""Training/evaluation cost on this CPU, measured side by side in one run: `python -m tools.benchmarks`.

Writes `results/benchmarks/train_eval.json`: tiny detector train seconds per iteration (batch 8,
160x128), tiny eval seconds per image, and the paper's RetinaNet v2 eval seconds per image at
native 640x512 (random weights: speed does not depend on their values).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from helpers import models
from helpers.runs import ROOT, atomic_write_json


def _timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times), "repeats": repeats}


def _batch(n: int, height: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, height, width, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = 8 + torch.rand(4, 2, generator=g) * torch.tensor([width * 0.25, height * 0.25])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 4, (4,), generator=g)})
    return images, targets


def measure(repeats: int = 5, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tiny = models.build_detector(models.TINY_ARCH, 4, 128, 160)
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=1e-4)
    images, targets = _batch(8, 128, 160, seed)

    def train_step():
        tiny.train()
        loss = sum(tiny(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def tiny_eval():
        tiny.eval()
        tiny(images)

    paper = models.build_detector("retinanet_resnet50_fpn_v2", 4, 512, 640).eval()
    frames, _ = _batch(2, 512, 640, seed)

    @torch.inference_mode()
    def paper_eval():
        paper(frames)

    train = _timed(train_step, repeats)
    tiny_ev = _timed(tiny_eval, repeats)
    paper_ev = _timed(paper_eval, max(2, repeats // 2))
    return {
        "tiny_train_s_per_iter_batch8": train,
        "tiny_eval_s_per_image": {k: v / 8 if k.endswith("_s") else v for k, v in tiny_ev.items()},
        "paper_r50v2_eval_s_per_image_640x512": {k: v / 2 if k.endswith("_s") else v for k, v in paper_ev.items()},
        "paper_over_tiny_eval_per_image": paper_ev["median_s"] / 2 / (tiny_ev["median_s"] / 8),
        "tiny_arch": models.TINY_ARCH,
        "note": "random weights; one process, side by side; best and median of repeats after one warm-up",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    path = atomic_write_json(ROOT / "results" / "benchmarks" / "train_eval.json", result, digits=4)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
