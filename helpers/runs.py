"""Results layout: `results/<notebook>/<run_id>/`, atomic writes, finding upstream runs.

A run is identified by a short hash of its resolved parameters, so rerunning the same
configuration finds (and resumes or skips) the same folder instead of making a new one.
Volatile facts (times, versions, host) go to `env.json`; `metrics.json` holds only results and
marks the run finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(os.environ.get("IRZSQ_ROOT", Path(__file__).resolve().parents[1]))


def results_dir() -> Path:
    """Where runs are written; `IRZSQ_RESULTS_DIR` redirects it (tests, smoke runs)."""
    return Path(os.environ.get("IRZSQ_RESULTS_DIR", ROOT / "results"))


def resolve_path(path: str | Path) -> Path:
    """Paths in parameters are relative to the project root, whatever the working directory."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


# --------------------------------------------------------------------------- atomic writes
def _atomic(path: Path, write) -> Path:
    """Write through a temp file, fsync and `os.replace`; the file gets the permissions a plain
    write would (the umask's), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _rounded(obj: Any, digits: int):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {str(k): _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _close(a: Any, b: Any, rel: float = 1e-4) -> bool:
    """Equal, except floats, which may differ by `rel` of their size: a re-made distillation moves
    its loss in the sixth significant digit (the CPU's reduction order), which is not a new result."""
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float))
                and abs(a - b) <= rel * max(abs(a), abs(b), 1e-12))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    return a == b


def atomic_write_json(path: str | Path, data: Any, digits: int | None = None) -> Path:
    """Write JSON with sorted keys through a temp file and `os.replace` (no half-written files)."""
    if digits is not None:
        data = _rounded(data, digits)
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
    return _atomic(Path(path), lambda fh: fh.write(text.encode()))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` atomically (no half-written file, the previous one intact if the write fails)."""
    return _atomic(Path(path), lambda fh: fh.write(data))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch
    return _atomic(Path(path), lambda fh: torch.save(obj, fh))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one line; a crash mid-write leaves at most one torn last line, which readers drop."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as fh:
        torn = False
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
        # after a torn last line, start a new one: otherwise this record would be glued to the fragment and dropped
        fh.write((("\n" if torn else "") + json.dumps(record, sort_keys=True) + "\n").encode())


def write_jsonl(path: str | Path, records: list[dict], sort_keys: bool = True) -> Path:
    """Replace a JSONL file atomically (e.g. to drop epochs a restarted training will log again).
    `sort_keys=False` keeps each record's key order (a table's column order)."""
    text = "".join(json.dumps(r, sort_keys=sort_keys) + "\n" for r in records)
    return _atomic(Path(path), lambda fh: fh.write(text.encode()))


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # torn last line of an interrupted run
    return rows


# --------------------------------------------------------------------------- run identity
# Parameters added to a notebook after its runs were committed, each with the value that reproduces
# what the notebook did before it existed. At that value a parameter is left out of the run id, so
# the committed runs keep their ids (and their results stay valid); any other value makes a new run.
LATER_PARAMETERS = {"SYMMETRIC": True}  # notebook 04: the quantization scheme (symmetric was the only one)


def run_id(params: dict) -> str:
    """Short stable hash of the resolved parameters (less `LATER_PARAMETERS` at their earlier behaviour)."""
    hashed = {k: v for k, v in params.items() if not (k in LATER_PARAMETERS and v == LATER_PARAMETERS[k])}
    blob = json.dumps(hashed, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def collect_parameters(namespace: dict) -> dict:
    """The notebook's parameters: its UPPER_CASE names bound to plain literals."""
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, plain)}


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def is_finished(directory: Path) -> bool:
    """A run is finished when its metrics.json exists and every artifact it lists still exists."""
    metrics = Path(directory) / "metrics.json"
    if not metrics.exists():
        return False
    artifacts = json.loads(metrics.read_text()).get("artifacts", [])
    return all(resolve_path(a).exists() for a in artifacts)


@dataclass
class Run:
    notebook: str
    params: dict
    dir: Path

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def finished(self) -> bool:
        return is_finished(self.dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def finish(self, metrics: dict, artifacts: Iterable[str | Path] = (), digits: int = 5) -> dict:
        """Write `metrics.json` (marks the run finished) and refresh `env.json`.

        `artifacts` are the files later runs need (weights, datasets). They are listed in
        metrics.json, and the run only counts as finished while they all exist, so a clone that
        has the committed metrics but not the (uncommitted) checkpoints runs the notebook again.

        A run that already had a `metrics.json` (a clone re-making the checkpoints it lacks, or
        `--force`) is compared with it: env.json records `reproduced` ({"same": every value equal up
        to float noise (see `_close`), "changed": the top-level keys that differ}), and a warning
        names the keys, because downstream runs that were kept were computed from the stored result,
        not this one.
        """
        missing = [str(a) for a in artifacts if not resolve_path(a).exists()]
        if missing:
            raise FileNotFoundError(f"cannot finish run {self.id}: artifacts not written: {missing}")
        listed = sorted(_relative(resolve_path(a)) for a in artifacts)
        new = json.loads(json.dumps(_rounded({**metrics, "artifacts": listed}, digits)))
        stored = self.dir / "metrics.json"
        changed, reproduced = None, None
        if stored.exists():
            old = json.loads(stored.read_text())
            changed = sorted(k for k in set(old) | set(new) if not _close(old.get(k), new.get(k)))
            import torch
            before, now = stored_capability(self.dir), torch.backends.cpu.get_cpu_capability()
            reproduced = {"same": not changed, "changed": changed, "stored_capability": before, "capability": now}
            if changed:
                warnings.warn(rerun_message(f"{self.notebook}/{self.id}", changed, before, now),
                              RerunMismatch, stacklevel=2)
        write_env(self.dir, reproduced=reproduced)
        atomic_write_json(stored, new)
        return metrics

    def metrics(self) -> dict:
        return json.loads((self.dir / "metrics.json").read_text())


def open_run(notebook: str, params: dict) -> Run:
    """Create (or reopen) the run folder of `notebook` for these parameters."""
    directory = results_dir() / notebook / run_id(params)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "params.json", {"notebook": notebook, "params": params})
    return Run(notebook, params, directory)


def list_runs(notebook: str, finished: bool = True, **match) -> list[Run]:
    """Runs of `notebook` whose parameters contain `match`, oldest finished first."""
    found = []
    for pfile in sorted((results_dir() / notebook).glob("*/params.json")):
        params = json.loads(pfile.read_text())["params"]
        if all(params.get(k) == v for k, v in match.items()):
            run = Run(notebook, params, pfile.parent)
            if run.finished or not finished:
                found.append(run)
    return sorted(found, key=_finish_order)


def _finish_order(run: Run) -> tuple[str, str]:
    """Sort key: the finish time recorded in env.json (committed with the results, so a fresh clone,
    whose file mtimes are all checkout times, orders runs the same way), then the run id."""
    env = run.dir / "env.json"
    stamp = json.loads(env.read_text()).get("time", "") if run.finished and env.exists() else ""
    return stamp, run.id


class AmbiguousRun(LookupError):
    """More than one finished upstream run matches: taking the newest would let an unrelated rerun
    (say, notebook 02 with other EPOCHS) silently change what every later notebook reads."""


def _manifest_ids(notebook: str) -> set[str]:
    """Ids of the runs of `notebook` that some batch in results/manifest.json made."""
    manifest = results_dir() / "manifest.json"
    if not manifest.exists():
        return set()
    batches = json.loads(manifest.read_text()).get("batches", {})
    return {e["run_id"] for rows in batches.values() for e in rows if e["notebook"] == notebook}


def find_run(notebook: str, run_id_: str | None = None, **match) -> Run:
    """The upstream run a notebook reads from: by id, else the one finished run matching `match`.

    When several match, the one a batch made (listed in results/manifest.json) is taken if it is
    the only such; otherwise `AmbiguousRun` names them, because any choice would be a guess.
    """
    if run_id_:
        runs = [r for r in list_runs(notebook) if r.id == run_id_]
    else:
        runs = list_runs(notebook, **match)
    if len(runs) > 1:
        listed = _manifest_ids(notebook)
        in_batch = [r for r in runs if r.id in listed]
        if len(in_batch) != 1:
            differ = sorted({k for r in runs for k in r.params if any(r.params.get(k) != o.params.get(k) for o in runs)})
            raise AmbiguousRun(
                f"{len(runs)} finished runs of {notebook} match {match}: "
                + "; ".join(f"{r.id} ({', '.join(f'{k}={r.params.get(k)!r}' for k in differ)})" for r in runs)
                + f". Delete the run folders under {results_dir() / notebook} that should not be used "
                  "(or run the batch that made the wanted one, so the manifest names it).")
        runs = in_batch
    if not runs:
        wanted = f"run {run_id_}" if run_id_ else ", ".join(f"{k}={v!r}" for k, v in match.items())
        raise FileNotFoundError(
            f"No finished run of {notebook} with {wanted} under {results_dir()}. "
            f"Run that notebook first, e.g. `python -m helpers.batch params/tiny.yaml`.")
    return runs[-1]


def rerun_message(run: str, changed: list[str], stored_capability: str | None, capability: str) -> str:
    """Why a run made again differs, and what to do: a CPU with another kernel family (AVX2 vs AVX-512)
    rounds floats differently, so a re-made training is a new result, not a failed reproduction."""
    if stored_capability is None:
        origin = "the stored run does not record its CPU kernel family"
    elif stored_capability != capability:
        origin = (f"the stored run was made with {stored_capability} kernels and this one with {capability}: "
                  "float results of another kernel family differ in their last bits, and a training amplifies that")
    else:
        origin = f"both were made with {capability} kernels, so this is not the CPU"
    return (f"run {run} was made again and its results differ from the stored ones in {changed} ({origin}). "
            "Runs downstream of it that were kept were computed from the stored result: recompute them "
            "(`make clean-results && make reproduce`) before comparing or committing, and check the new batch "
            "against the committed one with `make verify` (agreement within the seed spread).")


class RerunMismatch(UserWarning):
    """A run made again gave other results than the ones stored for the same parameters."""


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
_KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def cpu_info() -> dict:
    """The CPU a run was made on: model name, the ISA flags that decide which float and int8 kernels
    run, torch's kernel family (`get_cpu_capability`) and any variable that pins it. Float results
    depend on the kernel family (AVX2 and AVX-512 kernels sum in other orders), so a run made again
    on another family is expected to differ in its last bits."""
    import torch
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "isa": [f for f in _ISA_FLAGS if f in flags],
            "capability": torch.backends.cpu.get_cpu_capability(),
            "pinned": {k: os.environ[k] for k in _KERNEL_ENV if k in os.environ}}


def stored_capability(directory: Path) -> str | None:
    """torch's CPU kernel family recorded in a run's env.json (None for runs recorded before it was)."""
    env = Path(directory) / "env.json"
    if not env.exists():
        return None
    return (json.loads(env.read_text()).get("cpu") or {}).get("capability")


def write_env(directory: Path, reproduced: dict | None = None) -> None:
    """Volatile provenance, kept out of metrics so metrics stay comparable across machines.
    `reproduced`: how a re-made run compares with the result stored before it (see `Run.finish`)."""
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    atomic_write_json(directory / "env.json", {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": platform.python_version(),
        "torch": torch.__version__, "host_cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "git_commit": commit,
        "cpu": cpu_info(),
        **({} if reproduced is None else {"reproduced": reproduced})})
