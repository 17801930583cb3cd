import json

import pytest

from tools import difficulty_sweep as ds

TRIAL_A = {"name": "a", "overrides": {"clutter": 0, "noise": [0.01, 0.02]}, "epochs": 1, "why": "test"}
TRIAL_B = {"name": "b", "overrides": {"min_height": 24.0}, "epochs": 1}
SMALL = {"weights": "none", "n_train": 12, "n_val": 4}  # 16 images, random init (no pretrain run needed)


def test_sweep_writes_each_trial_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "results" / "benchmarks" / "difficulty_sweep.json"
    state = ds.sweep([TRIAL_A], data_dir=tmp_path / "data", **SMALL)
    assert out.exists() and json.loads(out.read_text()) == state  # default path follows IRZSQ_RESULTS_DIR
    rec = state["trials"]["a"]
    assert rec["overrides"] == TRIAL_A["overrides"] and rec["epochs"] == 1 and rec["spec"]["clutter"] == 0
    assert rec["spec"]["noise"] == [0.01, 0.02] and rec["spec"]["min_height"] == ds.BASE_SPEC.min_height
    assert set(ds.FINAL_KEYS) <= set(rec["final"]) and set(rec["final"]["per_class_AP"]) == set(ds.CLASSES)
    assert [e["epoch"] for e in rec["val_AP_per_epoch"]] == [1] and len(rec["loss_per_epoch"]) == 1
    assert rec["box_statistics_val"]["objects_per_image"] > 0 and rec["val_summary"]["images"] == 4
    assert rec["train_seconds"] > 0 and "converged" in rec["convergence"]
    assert rec["lands_in_window"] == (rec["difficulty_window"]["AP_in_window"] and rec["difficulty_window"]["AP50_below_max"])
    assert not (tmp_path / "data" / "a" / "run" / "checkpoint.pth").exists()  # dropped once recorded
    assert (tmp_path / "data" / "a" / "run" / "train_log.jsonl").exists()
    assert state["setup"]["n_train"] == 12 and state["setup"]["schedule"] == ds.FINETUNE

    ran = []  # the second sweep must run only the new trial (a stub: one real training is enough here)
    monkeypatch.setattr(ds, "run_trial", lambda trial, *a, **k: ran.append(trial["name"]) or
                        dict(rec, name=trial["name"], overrides=trial["overrides"], epochs=trial["epochs"]))
    state2 = ds.sweep([TRIAL_A, TRIAL_B], data_dir=tmp_path / "data", **SMALL)
    assert ran == ["b"]  # a was recorded: skipped
    assert state2["trials"]["a"] == rec and [state2["trials"][n]["order"] for n in "ab"] == [0, 1]
    assert "b" in ds.summary_table(state2)

    with pytest.raises(ValueError, match="new name"):  # a recorded name with other overrides is refused
        ds.sweep([dict(TRIAL_A, overrides={"clutter": 1})], data_dir=tmp_path / "data", **SMALL)
    with pytest.raises(ValueError, match="new name"):  # and with another schedule
        ds.sweep([dict(TRIAL_A, schedule={"lr": 0.003})], data_dir=tmp_path / "data", **SMALL)
    with pytest.raises(ValueError, match="another setup"):  # so is another data size into the same file
        ds.sweep([TRIAL_A], data_dir=tmp_path / "data", weights="none", n_train=8, n_val=4)


def test_make_spec_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown SceneSpec fields"):
        ds.make_spec({"clutterr": 1})
    assert ds.make_spec({}) == ds.BASE_SPEC


def test_trials_are_unique_and_valid():
    names = [t["name"] for t in ds.TRIALS]
    assert len(names) == len(set(names)) and names[0] == "baseline"
    for t in ds.TRIALS:
        ds.make_spec(t["overrides"])
        assert isinstance(t["epochs"], int) and t["epochs"] > 0 and t["why"]
        assert set(t.get("schedule", {})) <= set(ds.FINETUNE)


def test_unknown_schedule_key_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown schedule keys"):
        ds.run_trial(dict(TRIAL_B, schedule={"learning_rate": 0.003}), tmp_path / "data", weights="none", n_train=4, n_val=2)
    assert not (tmp_path / "data").exists()


def test_screens_score_a_fixed_detector_and_need_a_sweep(tmp_path):
    import torch
    out = tmp_path / "sweep.json"
    item = {"name": "s", "overrides": {"clutter": 0}}
    weights = tmp_path / "detector.pth"
    torch.save(ds.models.build_detector(ds.ARCH, len(ds.CLASSES) + 1, ds.MIN_SIZE, ds.MAX_SIZE).state_dict(), weights)
    with pytest.raises(FileNotFoundError, match="run the trials first"):
        ds.screen([item], out, tmp_path / "data", str(weights), n_val=3)
    out.write_text(json.dumps({"setup": {}, "trials": {}}))
    state = ds.screen([item], out, tmp_path / "data", str(weights), n_val=3)
    rec = state["screens"]["s"]
    assert rec["spec"]["clutter"] == 0 and rec["weights"] == str(weights) and set(ds.FINAL_KEYS) <= set(rec["final"])
    assert set(rec["recall"]) == set(ds.CLASSES)
    assert all(0.0 <= r["IoU 0.75"] <= r["IoU 0.5"] <= 1.0 or r["IoU 0.5"] == -1 for r in rec["recall"].values())
    assert json.loads(out.read_text())["screens"]["s"] == rec and "screen s" in ds.summary_table(state)
    with pytest.raises(ValueError, match="new name"):
        ds.screen([dict(item, overrides={"clutter": 1})], out, tmp_path / "data", str(weights), n_val=3)
    gt = ds.data.CocoDetectionSet(tmp_path / "data" / "screen" / "s", "flir", "val", ds.CLASSES, "contiguous").ground_truth()
    anns = gt.loadAnns(gt.getAnnIds())
    exact = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in anns]
    shifted = [dict(d, bbox=[d["bbox"][0] + 0.2 * d["bbox"][2], *d["bbox"][1:]]) for d in exact]  # IoU 0.67
    found = {c: r for c, r in ds.recall_by_class(gt, exact).items() if r["IoU 0.5"] >= 0}
    assert found and all(r == {"IoU 0.5": 1.0, "IoU 0.75": 1.0} for r in found.values())
    assert all(r == {"IoU 0.5": 1.0, "IoU 0.75": 0.0} for c, r in ds.recall_by_class(gt, shifted).items() if c in found)
