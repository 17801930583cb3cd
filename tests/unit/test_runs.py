import json
import os

import pytest
import torch

from helpers import runs


def test_run_id_depends_only_on_parameters():
    assert runs.run_id({"a": 1, "b": [1, 2]}) == runs.run_id({"b": [1, 2], "a": 1})
    assert runs.run_id({"a": 1}) != runs.run_id({"a": 2})


def test_collect_parameters_takes_upper_case_literals():
    namespace = {"SEED": 0, "LR": 0.1, "CLASSES": ["car"], "run": object(), "lower": 1, "MODULE": os}
    assert runs.collect_parameters(namespace) == {"SEED": 0, "LR": 0.1, "CLASSES": ["car"]}


def test_atomic_json_is_sorted_rounded_and_leaves_no_temp_files(tmp_path):
    path = runs.atomic_write_json(tmp_path / "m.json", {"b": 0.123456789, "a": [1.0 / 3]}, digits=4)
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert json.loads(path.read_text()) == {"a": [0.3333], "b": 0.1235}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    with pytest.raises(ValueError):
        runs.atomic_write_json(tmp_path / "m.json", {"x": float("nan")})
    assert json.loads(path.read_text())["b"] == 0.1235  # a failed write keeps the old file


def test_torn_jsonl_line_is_dropped(tmp_path):
    runs.append_jsonl(tmp_path / "log.jsonl", {"epoch": 0})
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write('{"epoch": 1, "lo')
    assert runs.read_jsonl(tmp_path / "log.jsonl") == [{"epoch": 0}]


def test_runs_are_found_by_parameters():
    run = runs.open_run("02_train_detector", {"STAGE": "pretrain", "SEED": 0})
    with pytest.raises(FileNotFoundError, match="No finished run of 02_train_detector with STAGE='pretrain'"):
        runs.find_run("02_train_detector", STAGE="pretrain")
    run.finish({"AP": 0.5})
    assert runs.find_run("02_train_detector", STAGE="pretrain").dir == run.dir
    assert runs.open_run("02_train_detector", {"STAGE": "pretrain", "SEED": 0}).dir == run.dir
    assert (run.dir / "env.json").exists()


def test_a_run_whose_artifacts_vanished_is_not_finished():
    run = runs.open_run("02_train_detector", {"STAGE": "finetune", "SEED": 1})
    with pytest.raises(FileNotFoundError, match="artifacts not written"):
        run.finish({"AP": 0.5}, artifacts=[run.path("model.pth")])
    run.path("model.pth").write_bytes(b"weights")
    run.finish({"AP": 0.5}, artifacts=[run.path("model.pth")])
    assert run.finished and runs.is_finished(run.dir)
    run.path("model.pth").unlink()  # e.g. a fresh clone: metrics committed, checkpoints not
    assert not run.finished
    with pytest.raises(FileNotFoundError):
        runs.find_run("02_train_detector", STAGE="finetune")


def test_runs_are_ordered_by_recorded_finish_time_not_file_mtime():
    older = runs.open_run("04_quantize_evaluate", {"SOURCE": "real", "SEED": 0})
    newer = runs.open_run("04_quantize_evaluate", {"SOURCE": "real", "SEED": 1})
    for run, stamp in ((older, "2026-01-01T00:00:00"), (newer, "2026-01-02T00:00:00")):
        run.finish({"AP": 0.5})
        env = json.loads(run.path("env.json").read_text())
        runs.atomic_write_json(run.path("env.json"), {**env, "time": stamp})
    os.utime(older.path("metrics.json"), (2e9, 2e9))  # a fresh clone's checkout order says nothing
    assert [r.id for r in runs.list_runs("04_quantize_evaluate")] == [older.id, newer.id]


def test_an_ambiguous_upstream_run_fails_unless_one_batch_made_it():
    first = runs.open_run("02_train_detector", {"STAGE": "finetune", "SEED": 7, "EPOCHS": 24})
    other = runs.open_run("02_train_detector", {"STAGE": "finetune", "SEED": 7, "EPOCHS": 30})  # a rerun with other epochs
    for run in (first, other):
        run.finish({"AP": 0.5})
    with pytest.raises(runs.AmbiguousRun, match=r"2 finished runs .*(EPOCHS=24.*EPOCHS=30|EPOCHS=30.*EPOCHS=24)"):
        runs.find_run("02_train_detector", STAGE="finetune", SEED=7)
    runs.atomic_write_json(runs.results_dir() / "manifest.json", {"batches": {"tiny": [
        {"notebook": "02_train_detector", "run_id": first.id}]}})
    assert runs.find_run("02_train_detector", STAGE="finetune", SEED=7).id == first.id
    assert runs.find_run("02_train_detector", other.id).id == other.id  # by id, always


def _reproduced(run) -> dict:
    """env.json's `reproduced`, less the CPU kernel families (checked in their own test)."""
    reproduced = json.loads(run.path("env.json").read_text())["reproduced"]
    assert reproduced.pop("capability") == torch.backends.cpu.get_cpu_capability()
    reproduced.pop("stored_capability")
    return reproduced


def test_env_records_the_cpu_and_the_warning_names_another_kernel_family():
    run = runs.open_run("02_train_detector", {"STAGE": "finetune", "SEED": 5})
    run.finish({"AP": 0.5})
    cpu = json.loads(run.path("env.json").read_text())["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability() and isinstance(cpu["isa"], list)
    assert cpu["model"] and runs.stored_capability(run.dir) == cpu["capability"]
    env = json.loads(run.path("env.json").read_text())
    runs.atomic_write_json(run.path("env.json"), {**env, "cpu": {**cpu, "capability": "OTHER_ISA"}})
    with pytest.warns(runs.RerunMismatch, match="made with OTHER_ISA kernels and this one with"):
        run.finish({"AP": 0.4})
    assert json.loads(run.path("env.json").read_text())["reproduced"]["stored_capability"] == "OTHER_ISA"
    env = json.loads(run.path("env.json").read_text())
    runs.atomic_write_json(run.path("env.json"), {k: v for k, v in env.items() if k != "cpu"})
    with pytest.warns(runs.RerunMismatch, match="does not record its CPU kernel family"):
        run.finish({"AP": 0.3})


def test_a_run_made_again_is_compared_with_its_stored_result():
    run = runs.open_run("02_train_detector", {"STAGE": "finetune", "SEED": 2})
    run.finish({"AP": 0.5, "size": 3.0})
    assert "reproduced" not in json.loads(run.path("env.json").read_text())  # first result: nothing to compare
    run.finish({"AP": 0.500001, "size": 3.0})  # equal after rounding to 5 digits
    assert _reproduced(run) == {"same": True, "changed": []}
    with pytest.warns(runs.RerunMismatch, match=r"differ from the stored ones in \['AP'\] \(both were made with"):
        run.finish({"AP": 0.4, "size": 3.0})
    assert _reproduced(run) == {"same": False, "changed": ["AP"]}
    assert run.metrics()["AP"] == 0.4
    with pytest.warns(runs.RerunMismatch, match=r"\['loss_at'\]"):  # a new key is a change
        run.finish({"AP": 0.4, "size": 3, "loss_at": {"50": 4.67259}})
    run.finish({"AP": 0.4, "size": 3.0, "loss_at": {"50": 4.67258}})  # float noise in the 6th digit
    assert _reproduced(run) == {"same": True, "changed": []}
    for changed in ({"50": 4.7}, {"50": 4.67258, "100": 2.8}, [4.67258]):
        with pytest.warns(runs.RerunMismatch, match=r"\['loss_at'\]"):
            run.finish({"AP": 0.4, "size": 3.0, "loss_at": changed})
        with pytest.warns(runs.RerunMismatch):  # and back
            run.finish({"AP": 0.4, "size": 3.0, "loss_at": {"50": 4.67258}})


def test_batch_reports_a_run_that_did_not_reproduce():
    from helpers import batch
    run = runs.open_run("02_train_detector", {"STAGE": "pretrain", "SEED": 3})
    entry = {"notebook": run.notebook, "run_id": run.id}
    run.finish({"AP": 0.2})
    assert batch.rerun_mismatch(entry) == []
    run.finish({"AP": 0.2})
    assert batch.rerun_mismatch(entry) == []
    with pytest.warns(runs.RerunMismatch):
        run.finish({"AP": 0.3, "eval": {"AP50": 0.5}})
    assert batch.rerun_mismatch(entry) == ["AP", "eval"]


def test_a_parameter_added_later_keeps_the_committed_run_ids_at_its_earlier_behaviour():
    before = {"SOURCE": "real", "SEED": 0}
    assert runs.run_id({**before, "SYMMETRIC": True}) == runs.run_id(before)  # what the notebook always did
    assert runs.run_id({**before, "SYMMETRIC": False}) != runs.run_id(before)


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    umask = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        for path in (runs.atomic_write_json(tmp_path / "a.json", {"a": 1}), runs.atomic_write_bytes(tmp_path / "b.bin", b"\0")):
            assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(umask)
