"""Every batch file resolves against the notebooks it names (papermill only warns on unknown names)."""
from pathlib import Path

import papermill
import pytest
import yaml

from helpers import batch

PARAMS = sorted(Path(__file__).resolve().parents[2].joinpath("params").glob("*.yaml"))
BATCHES = [p for p in PARAMS if {"runs", "extends"} & set(yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("batch_file", BATCHES, ids=lambda p: p.name)
def test_every_key_exists_in_the_target_notebook(batch_file):
    spec = batch.batch_spec(batch_file)
    for entry in spec["runs"]:
        declared = papermill.inspect_notebook(str(batch.notebook_path(entry["notebook"])))
        for key in (entry.get("parameters") or {}):
            assert key in declared, f"{batch_file.name}: {entry['notebook']} has no parameter {key}"
        for key, value in (entry.get("parameters") or {}).items():
            default = batch.notebook_defaults(batch.notebook_path(entry["notebook"]))[key]
            assert type(value) is type(default) or (isinstance(default, float) and isinstance(value, int)), \
                f"{batch_file.name}: {key}={value!r} has another type than the default {default!r}"
    assert batch.load_batch(batch_file)  # resolves: notebooks exist, ids computed


def test_extended_batch_takes_the_base_runs_with_its_own_common(tmp_path):
    (tmp_path / "base.yaml").write_text("common: {SEED: 0, PROFILE: tiny}\nruns:\n  - notebook: 01_prepare_data\n"
                                        "  - notebook: 02_train_detector\n    parameters: {STAGE: pretrain}\n")
    (tmp_path / "seed1.yaml").write_text("extends: base.yaml\ncommon: {SEED: 1}\n")
    base, seed1 = batch.load_batch(tmp_path / "base.yaml"), batch.load_batch(tmp_path / "seed1.yaml")
    assert [r["notebook"] for r in seed1] == [r["notebook"] for r in base]
    assert all(r["params"]["SEED"] == 1 and r["params"]["PROFILE"] == "tiny" for r in seed1)
    assert seed1[1]["params"]["STAGE"] == "pretrain"
    assert {r["run_id"] for r in seed1}.isdisjoint(r["run_id"] for r in base)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(batch.BatchError, match="cycle"):
        batch.load_batch(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(batch.BatchError, match="missing.yaml not found .extended by orphan.yaml"):
        batch.load_batch(tmp_path / "orphan.yaml")


def test_extended_batch_excludes_matching_runs_and_rejects_stale_rules(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "runs:\n  - notebook: 01_prepare_data\n  - notebook: 02_train_detector\n    parameters: {STAGE: pretrain}\n"
        "  - notebook: 02_train_detector\n    parameters: {STAGE: finetune}\n")
    (tmp_path / "cut.yaml").write_text("extends: base.yaml\nexclude:\n"
                                       "  - {notebook: 02_train_detector, parameters: {STAGE: pretrain}}\n")
    kept = batch.load_batch(tmp_path / "cut.yaml")
    assert [(r["notebook"], r["overrides"].get("STAGE")) for r in kept] == [("01_prepare_data", None),
                                                                           ("02_train_detector", "finetune")]
    (tmp_path / "stale.yaml").write_text("extends: base.yaml\nexclude:\n  - {notebook: 02_train_detector, "
                                         "parameters: {STAGE: distill}}\n")
    with pytest.raises(batch.BatchError, match=r"exclude\[0\].*matches no run of base.yaml"):
        batch.load_batch(tmp_path / "stale.yaml")
    (tmp_path / "typo.yaml").write_text("extends: base.yaml\nexclude:\n  - {notbook: 01_prepare_data}\n")
    with pytest.raises(batch.BatchError, match=r"exclude\[0\] must be"):
        batch.load_batch(tmp_path / "typo.yaml")


def test_seed_batches_hold_the_runs_their_committed_manifest_lists():
    """The verdicts over seeds compare the same runs in every seed batch (the core runs, not the studies)."""
    import json
    manifest = json.loads((Path(batch.ROOT) / "results" / "manifest.json").read_text())["batches"]
    for name in sorted(manifest):
        if name.startswith("tiny_seed"):
            runs = batch.load_batch(Path(batch.ROOT) / "params" / f"{name}.yaml")
            assert {r["run_id"] for r in runs} == {r["run_id"] for r in manifest[name]}, name


def test_batch_names_unknown_parameters(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  - notebook: 02_train_detector\n    parameters: {EPOCS: 3}\n")
    with pytest.raises(batch.BatchError, match=r"sets \['EPOCS'\], which 02_train_detector.ipynb does not declare"):
        batch.load_batch(bad)


def test_tiny_batch_defaults_resolve_to_the_committed_notebook_runs():
    """nbval re-executes each committed notebook with its defaults; the tiny batch must hold exactly that
    run, so re-execution reuses its finished results instead of training or distilling again."""
    runs = batch.load_batch(Path(batch.ROOT) / "params" / "tiny.yaml")
    # every notebook that records a run (10 only draws figures from stored results)
    notebooks = sorted(p.stem for p in (Path(batch.ROOT) / "notebooks").glob("[0-9]*.ipynb")
                       if "runs.open_run(" in p.read_text())
    assert sorted({r["notebook"] for r in runs}) == notebooks
    for name in notebooks:
        defaults = batch.notebook_defaults(batch.notebook_path(name))
        assert sum(r["params"] == defaults for r in runs if r["notebook"] == name) == 1, name


@pytest.mark.parametrize("notebook", sorted((Path(batch.ROOT) / "notebooks").glob("[0-9]*.ipynb")), ids=lambda p: p.name)
def test_papermill_parses_every_parameter_line(notebook):
    """papermill silently skips lines it cannot parse (e.g. an '=' inside a comment)."""
    import nbformat
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = [line.split(":")[0] for line in cell.source.splitlines() if line and not line.startswith("#")]
    assert sorted(papermill.inspect_notebook(str(notebook))) == sorted(assigned)
