"""The README's tables name things that exist: the tests of the fault table, the modules of the module map,
the notebooks of the artifact map, and runtimes that are the stored batch timing's."""
from __future__ import annotations

import ast
import json
import re

from helpers.runs import ROOT

README = (ROOT / "README.md").read_text()


def _table_rows(header: str) -> list[list[str]]:
    """The body rows of the README table whose header line starts with `header`, as lists of cells."""
    lines = README[README.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_test_the_fault_table_names_exists():
    rows = _table_rows("| fault or bad input |")
    assert len(rows) >= 15
    for fault, _, test in rows:
        (ref,) = re.findall(r"`([\w/.]+\.py)::(\w+)`", test) or [None]
        assert ref is not None, f"row {fault!r} names no test"
        path, name = ref
        source = ROOT / "tests" / "unit" / path
        assert source.exists(), f"{path} (row {fault!r})"
        functions = {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in functions, f"{path}::{name} (row {fault!r}) does not exist"


def test_the_module_map_names_every_helpers_module_and_only_those():
    named = {m for row in _table_rows("| floor | module | owns |") for m in re.findall(r"`(\w+)`", row[1])}
    modules = {p.stem for p in (ROOT / "helpers").glob("*.py") if p.stem != "__init__"}
    assert named == modules, f"missing from the map: {sorted(modules - named)}; not modules: {sorted(named - modules)}"


def test_the_artifact_map_lists_every_notebook_with_the_stored_batch_runtime():
    rows = {row[0].strip("`"): row for row in _table_rows("| notebook | purpose |")}
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(rows) == notebooks
    timing = json.loads((ROOT / "results" / "benchmarks" / "batch_tiny.json").read_text())
    assert timing["made_runs"] == len(timing["runs"]), "the stored timing must be a batch made from nothing"
    for notebook in {r["notebook"] for r in timing["runs"]}:
        minutes = sum(r["seconds"] for r in timing["runs"] if r["notebook"] == notebook) / 60
        assert rows[notebook][-1] == f"{minutes:.1f} min", notebook
    total = sum(r["seconds"] for r in timing["runs"]) / 60
    assert f"{total:.1f} min" in README
