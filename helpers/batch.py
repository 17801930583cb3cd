"""Run numbered notebooks with papermill, one run per parameter set: `python -m helpers.batch params/tiny.yaml`.

A batch file lists runs in order::

    common: {SEED: 0}                 # merged into every run whose notebook declares the key
    runs:
      - notebook: 01_prepare_data
      - notebook: 02_train_detector
        parameters: {STAGE: pretrain, DATASET: coco}

A batch file can start from another, `extends: tiny.yaml` (a path relative to the file): it takes
that batch's runs (unless it lists its own) and its `common`, updated with its own `common`, so
the tiny batch with another seed is three lines. `exclude:` drops runs of the base that match an
entry (its notebook and, if given, a subset of its own `parameters`), e.g. the seed batches leave
out the studies that are not part of the verdicts over seeds::

    exclude:
      - notebook: 09_export_onnx
      - {notebook: 04_quantize_evaluate, parameters: {SYMMETRIC: false}}

Each run's parameters are the notebook's defaults updated with `common` and its own
`parameters`; their hash is the run id, so `results/<notebook>/<run_id>/` is known before the
notebook starts. A finished run (its `metrics.json` written and the artifacts it lists, such as
weights or datasets, still on disk) is skipped; an interrupted run is executed again and resumes
from its checkpoints. The executed notebook and its log are kept in the run folder, and
`results/manifest.json` lists every run of the batch.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import yaml

from helpers.runs import ROOT, atomic_write_json, cpu_info, is_finished, rerun_message, results_dir, run_id

NOTEBOOKS = ROOT / "notebooks"


PROFILES = ("tiny", "paper")  # what every notebook's PROFILE parameter accepts


class BatchError(RuntimeError):
    pass


def notebook_path(name: str) -> Path:
    path = NOTEBOOKS / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    if not path.exists():
        raise BatchError(f"notebook {path.name} not found in {NOTEBOOKS}")
    return path


def notebook_defaults(path: Path) -> dict:
    """The literal defaults of the notebook's `parameters` cell (via papermill's inspector)."""
    import papermill
    params = papermill.inspect_notebook(str(path))
    if not params:
        raise BatchError(f"{path.name} has no cell tagged 'parameters'")
    try:
        return {name: ast.literal_eval(p["default"]) for name, p in params.items()}
    except (ValueError, SyntaxError) as err:
        raise BatchError(f"{path.name}: parameter defaults must be literals ({err})") from None


def batch_spec(batch_file: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A batch file's {"common", "runs"} with `extends` resolved (its `common` wins over the base's)."""
    path = Path(batch_file).resolve()
    if path in _chain:
        raise BatchError(f"batch files extend each other in a cycle: {' -> '.join(p.name for p in (*_chain, path))}")
    if not path.exists():
        named = f" (extended by {_chain[-1].name})" if _chain else ""
        raise BatchError(f"batch file {path} not found{named}")
    spec = yaml.safe_load(path.read_text()) or {}
    common, base = spec.get("common") or {}, spec.get("extends")
    if base is None:
        return {"common": common, "runs": spec.get("runs") or []}
    parent = batch_spec(path.parent / base, (*_chain, path))
    runs = spec.get("runs") or parent["runs"]
    exclude = spec.get("exclude") or []
    for i, rule in enumerate(exclude):
        if not isinstance(rule, dict) or "notebook" not in rule or set(rule) - {"notebook", "parameters"}:
            raise BatchError(f"{path.name}: exclude[{i}] must be {{notebook: NAME, parameters: {{...}}}}, got {rule!r}")
        if not any(_matches(run, rule) for run in runs):  # a stale rule would otherwise exclude nothing silently
            raise BatchError(f"{path.name}: exclude[{i}] ({rule}) matches no run of {base}")
    return {"common": parent["common"] | common,
            "runs": [run for run in runs if not any(_matches(run, rule) for rule in exclude)]}


def _matches(run: dict, rule: dict) -> bool:
    own = run.get("parameters") or {}
    return run["notebook"] == rule["notebook"] and all(
        k in own and own[k] == v for k, v in (rule.get("parameters") or {}).items())


def load_batch(batch_file: str | Path) -> list[dict]:
    """Resolve every run of a batch file: notebook path, full parameters, run id."""
    spec = batch_spec(batch_file)
    common = spec["common"]
    undeclared = sorted(set(common) - {k for path in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")) for k in notebook_defaults(path)}) \
        if common else []
    if undeclared:  # a typo in `common` would otherwise be dropped silently by every run
        raise BatchError(f"{batch_file}: common sets {undeclared}, which no notebook in {NOTEBOOKS} declares")
    resolved = []
    for i, entry in enumerate(spec["runs"]):
        path = notebook_path(entry["notebook"])
        defaults = notebook_defaults(path)
        own = entry.get("parameters", {}) or {}
        unknown = sorted(set(own) - set(defaults))
        if unknown:
            raise BatchError(f"{batch_file}: runs[{i}] sets {unknown}, which {path.name} does not declare "
                             f"(its parameters: {sorted(defaults)})")
        overrides = {k: v for k, v in common.items() if k in defaults} | own
        params = defaults | overrides
        if "PROFILE" in params and params["PROFILE"] not in PROFILES:
            raise BatchError(f"{batch_file}: runs[{i}] ({path.stem}) has PROFILE {params['PROFILE']!r}; "
                             f"the profiles are {PROFILES}")
        resolved.append({"notebook": path.stem, "path": path, "overrides": overrides, "params": params,
                         "run_id": run_id(params)})
    return resolved


def execute(run: dict, force: bool = False) -> str:
    """Run one notebook unless its run is finished; returns 'skipped' or 'done'."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    out_dir = results_dir() / run["notebook"] / run["run_id"]
    if is_finished(out_dir) and not force:
        return "skipped"
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{run['notebook']}.ipynb"
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    try:
        with open(out_dir / "log.txt", "w") as log:
            papermill.execute_notebook(str(run["path"]), str(output), parameters=run["overrides"],
                                       cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
                                       stdout_file=log, stderr_file=log)
    except PapermillExecutionError as err:
        raise BatchError(f"{run['notebook']} (run {run['run_id']}, parameters {run['overrides']}) failed in "
                         f"cell {err.cell_index} (execution count {err.exec_count}): {err.ename}: {err.evalue}\n"
                         f"Executed notebook with the traceback: {output}") from None
    if not (out_dir / "metrics.json").exists():
        raise BatchError(f"{run['notebook']} finished but wrote no metrics.json in {out_dir}: its parameters "
                         "resolve to another run id than the batch computed (are all parameters literals?)")
    return "done"


def rerun_mismatch(run: dict) -> list[str]:
    """The metrics keys in which a run just made again differs from its stored result (see `runs.Run.finish`)."""
    reproduced = _reproduced(run)
    return [] if not reproduced or reproduced["same"] else reproduced["changed"]


def _reproduced(run: dict) -> dict | None:
    env = results_dir() / run["notebook"] / run["run_id"] / "env.json"
    return json.loads(env.read_text()).get("reproduced") if env.exists() else None


def runs_of(batch_file: str | Path, notebook: str, positions: list[int] = ()) -> list[tuple[int, dict]]:
    """(position, run) of `notebook`'s runs in the batch, or only those at `positions` (1-based, as `--list` prints)."""
    resolved = load_batch(batch_file)
    chosen = [(i, r) for i, r in enumerate(resolved, 1) if r["notebook"] == notebook and (not positions or i in positions)]
    wrong = [k for k in positions if k not in {i for i, _ in chosen}]
    if wrong or not chosen:
        raise BatchError(f"runs {wrong or list(positions)} of {batch_file} are not {notebook} runs; those are "
                         f"{[i for i, r in enumerate(resolved, 1) if r['notebook'] == notebook]}")
    return chosen


def add_distributed_arguments(parser: argparse.ArgumentParser, notebook: str) -> argparse.ArgumentParser:
    """The arguments of a torchrun entry point: the batch file, the runs to take, the backend."""
    parser.add_argument("batch", help="YAML batch file, e.g. params/paper.yaml")
    parser.add_argument("--run", type=int, action="append", default=[],
                        help=f"position of a {notebook} run in `helpers.batch BATCH --list` (1-based, repeatable); default all")
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, gloo on the CPU")
    return parser


def run_distributed(batch_file: str | Path, notebook: str, work, positions: list[int] = (), backend: str | None = None,
                    execute_notebook: bool = True) -> int:
    """The driver of `torchrun ... -m helpers.train|helpers.distill BATCH`: for each unfinished run of `notebook`
    in the batch, `work(run, device)` on every process of the group (rank 0 writing), then rank 0 executes the
    notebook for the run in one process, which finds the work done and finishes the run as the batch does."""
    from helpers import distributed
    try:
        chosen = runs_of(batch_file, notebook, positions)
    except BatchError as err:
        print(f"{notebook} failed: {err}", file=sys.stderr)
        return 1
    device = distributed.init(backend)
    say = print if distributed.is_writer() else (lambda *a, **k: None)
    try:
        for i, run in chosen:
            if is_finished(results_dir() / notebook / run["run_id"]):
                say(f"[{i}] {notebook} {run['run_id']}: finished, skipped", flush=True)
                continue
            say(f"[{i}] {notebook} {run['run_id']}: on {distributed.world_size()} process(es)", flush=True)
            work(run, device)
            if execute_notebook:
                if distributed.is_writer():
                    with distributed.single_process_environment():
                        say(f"[{i}] {notebook} {run['run_id']}: notebook {execute(run)}", flush=True)
                distributed.barrier()
    finally:
        distributed.cleanup()
    return 0


def distributed_main(argv: list[str] | None, notebook: str, work, doc: str, work_only: str) -> int:
    """The `main` of a torchrun entry point (`helpers.distill`, `helpers.zsq`): the batch, `--run`, `--backend`
    and the flag `work_only` ("--grid-only": do the work, do not execute the notebook), then `run_distributed`."""
    parser = add_distributed_arguments(argparse.ArgumentParser(description=doc.strip().splitlines()[0]), notebook)
    parser.add_argument(work_only, action="store_true", help="do the work, but do not execute the notebook")
    args = parser.parse_args(argv)
    skip_notebook = getattr(args, work_only.lstrip("-").replace("-", "_"))
    return run_distributed(args.batch, notebook, work, args.run, args.backend, execute_notebook=not skip_notebook)


def write_manifest(runs: list[dict], batch_file: str | Path) -> Path:
    rows = []
    for run in runs:
        folder = results_dir() / run["notebook"] / run["run_id"]
        rows.append({"notebook": run["notebook"], "run_id": run["run_id"], "params": run["params"],
                     "finished": is_finished(folder),
                     "path": str(folder.relative_to(results_dir()))})
    manifest = results_dir() / "manifest.json"
    existing = json.loads(manifest.read_text()) if manifest.exists() else {"batches": {}}
    existing["batches"][Path(batch_file).stem] = rows
    return atomic_write_json(manifest, existing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", help="YAML batch file, e.g. params/tiny.yaml")
    parser.add_argument("--only", action="append", default=[], help="run only these notebooks (repeatable)")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("--list", action="store_true", help="print the resolved runs and exit")
    parser.add_argument("--timings", metavar="JSON", help="write each run's status and wall time, with the CPU and "
                        "its load, to this file after every run (e.g. results/benchmarks/batch_tiny.json)")
    args = parser.parse_args(argv)
    try:
        runs = load_batch(args.batch)
        mismatches, timings = [], {"batch": str(args.batch), "cpu": cpu_info(), "cores": os.cpu_count(),
                                   "load_average_1min_start": os.getloadavg()[0], "runs": []}
        selected = [r for r in runs if not args.only or r["notebook"] in args.only]
        for i, run in enumerate(selected, 1):
            label = f"[{i}/{len(selected)}] {run['notebook']} {run['run_id']} {run['overrides']}"
            if args.list:
                print(label)
                continue
            print(label, "...", flush=True)
            started = time.perf_counter()
            status = execute(run, args.force)
            print(f"    {status}", flush=True)
            if args.timings:
                timings["runs"].append({"notebook": run["notebook"], "run_id": run["run_id"], "status": status,
                                        "seconds": round(time.perf_counter() - started, 1)})
                made = [r["seconds"] for r in timings["runs"] if r["status"] == "done"]
                atomic_write_json(args.timings, {**timings, "made_runs": len(made), "made_minutes": round(sum(made) / 60, 2),
                                                 "load_average_1min_now": os.getloadavg()[0]})
            mismatch = rerun_mismatch(run) if status == "done" else []
            if mismatch:
                mismatches.append(f"{run['notebook']}/{run['run_id']}")
                reproduced = _reproduced(run)
                print("    WARNING: " + rerun_message(f"{run['notebook']}/{run['run_id']}", mismatch,
                                                     reproduced.get("stored_capability"),
                                                     reproduced.get("capability", "unknown")), flush=True)
            write_manifest(runs, args.batch)
        if mismatches:
            print(f"{len(mismatches)} run(s) did not reproduce their stored results: {mismatches}. Runs kept "
                  "downstream of them were computed from the stored results; for a consistent set run "
                  "`make clean-results && make reproduce`.", file=sys.stderr)
    except BatchError as err:
        print(f"batch failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
