"""Does a batch made again (another CPU, another machine) agree with the committed one?

Not bit for bit: a training re-made with another CPU kernel family (AVX2 vs AVX-512) is a new
draw of the same recipe, so it is judged like one. Every number behind the tiny verdicts
(`verdicts.seed_numbers`: fine-tuned and pretrained mAP, the W8A8 gaps, ...) of the batch in
`results/` must lie within `K` standard deviations of the committed batch's, the deviation taken
over the committed seed batches (`verdicts.SEED_BATCHES`: seed 0 and four more draws of data and
initialisation). Every verdict string of `table_seeds` that is the same in all committed seed
batches (a stable verdict) must come out the same; verdicts that already move between seeds are
listed, not judged.

    make clean-results && make reproduce && make verify     # -> results/benchmarks/verify.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np

from helpers import store, verdicts
from helpers.runs import ROOT, atomic_write_json, cpu_info

SEED_BATCHES = verdicts.SEED_BATCHES
K = 2.0


@contextmanager
def results_at(path: Path):
    """Point `runs.results_dir()` (what `store.load` reads) at another results tree for a while."""
    before = os.environ.get("IRZSQ_RESULTS_DIR")
    os.environ["IRZSQ_RESULTS_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("IRZSQ_RESULTS_DIR", None)
        else:
            os.environ["IRZSQ_RESULTS_DIR"] = before


def committed_results(ref: str, into: Path) -> Path:
    """The results/ tree of git `ref` (metrics and rows only: what the numbers are read from)."""
    archive = subprocess.run(["git", "archive", ref, "results"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "results"


def compare(made: dict[str, store.Stored], committed: dict[str, store.Stored], batch: str = "tiny",
            k: float = K) -> dict:
    """Judge `made[batch]` against `committed[batch]` with the spread of the committed seed batches."""
    ours, theirs = verdicts.seed_numbers(made[batch]), verdicts.seed_numbers(committed[batch])
    seeds = [verdicts.seed_numbers(s) for s in committed.values()]
    numbers = []
    for name, value in theirs.items():
        draws = [s[name] for s in seeds if s[name] is not None]
        std = float(np.std(draws, ddof=1)) if len(draws) > 1 else None
        new = ours.get(name)
        gap = None if new is None or value is None else new - value
        ok = gap is not None and std is not None and abs(gap) <= k * std
        numbers.append({"number": name, "committed": value, "made": new, "gap": gap, "seed_std": std,
                        "tolerance": None if std is None else k * std, "within": ok})
    mine = verdicts.seed_verdicts(made[batch])
    per_seed = {b: verdicts.seed_verdicts(s) for b, s in committed.items()}
    verdict_rows = []
    for name, committed_text in per_seed[batch].items():
        if name == "seed, data root" or any(ch.isdigit() for ch in committed_text.replace("W", "")):
            continue  # numeric cells are judged above, by their numbers
        stable = len({v[name] for v in per_seed.values()}) == 1
        verdict_rows.append({"verdict": name, "committed": committed_text, "made": mine[name], "stable_over_seeds": stable,
                         "same": mine[name] == committed_text, "judged": stable})
    agrees = all(n["within"] for n in numbers) and all(v["same"] for v in verdict_rows if v["judged"])
    return {"batch": batch, "k": k, "seed_batches": list(committed), "agrees": agrees, "numbers": numbers,
            "verdicts": verdict_rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="git ref holding the committed results (default HEAD)")
    parser.add_argument("--made", default=None, help="results tree of the batch made again (default: results/)")
    parser.add_argument("--batch", default="tiny")
    parser.add_argument("-k", type=float, default=K, help="tolerance in seed standard deviations")
    parser.add_argument("--out", default="results/benchmarks/verify.json")
    args = parser.parse_args(argv)
    made_dir = Path(args.made) if args.made else ROOT / "results"
    with tempfile.TemporaryDirectory() as tmp:
        with results_at(committed_results(args.ref, Path(tmp))):
            committed = {b: store.load(b) for b in SEED_BATCHES}
        with results_at(made_dir):
            made = {args.batch: store.load(args.batch)}
    report = {**compare(made, {args.batch: committed[args.batch], **committed}, args.batch, args.k),
              "ref": args.ref, "cpu": cpu_info()}
    atomic_write_json(ROOT / args.out, report, digits=4)
    def pts(value):
        return "n/a" if value is None else f"{value:.2f}"

    for n in report["numbers"]:
        print(f"{'ok  ' if n['within'] else 'FAIL'} {n['number']}: made {pts(n['made'])} vs committed "
              f"{pts(n['committed'])} (gap {pts(n['gap'])}, tolerance {pts(n['tolerance'])} = {args.k:g} seed std)")
    for v in report["verdicts"]:
        mark = ("ok  " if v["same"] else "FAIL") if v["judged"] else "info"
        print(f"{mark} {v['verdict']}: made {v['made']!r} vs committed {v['committed']!r}"
              f"{'' if v['judged'] else ' (moves between seeds: not judged)'}")
    print("agrees with the committed batch within the seed spread" if report["agrees"] else "DOES NOT agree")
    return 0 if report["agrees"] else 1


if __name__ == "__main__":
    sys.exit(main())
