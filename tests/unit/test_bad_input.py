"""Every bad input stops with a clear error before work starts, and nothing already on disk is overwritten."""
import json
import math
import shutil

import pytest
import torch

from helpers import batch, data, distill, models, quant, runs, train, zsq


def _copy(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "FLIR_ADAS_1_3", root / "FLIR_ADAS_1_3")
    return root, root / "FLIR_ADAS_1_3" / "val" / "thermal_annotations.json"


def _fit(dataset, run_dir, epochs=1, lr=1e-3):  # a tiny SGD training of `epochs` epochs in `run_dir`
    torch.manual_seed(0)
    model = models.build_detector(models.TINY_ARCH, 4, 64, 80)
    schedule = train.Schedule(epochs, "sgd", lr, lr_schedule="step")
    return model, train.fit(model, data.make_loader(dataset, 2, train=True), schedule, run_dir, seed=0)


def _untouched(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_missing_and_empty_dataset_folders_say_what_to_download(tmp_path):
    with pytest.raises(data.DatasetError, match="Download FLIR ADAS v1.3"):
        data.CocoDetectionSet(tmp_path, "flir", "val")
    (tmp_path / "FLIR_ADAS_1_3" / "val").mkdir(parents=True)  # folder there, nothing in it
    with pytest.raises(data.DatasetError, match="thermal_annotations.json does not exist"):
        data.CocoDetectionSet(tmp_path, "flir", "val")
    (tmp_path / "FLIR_ADAS_1_3" / "val" / "thermal_annotations.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    with pytest.raises(data.DatasetError, match="lists no images"):
        data.CocoDetectionSet(tmp_path, "flir", "val")


@pytest.mark.parametrize("text,match", [("{\"images\": [", "not valid JSON"), ("[]", "expected a COCO object"),
                                        ("{\"images\": []}", "missing the COCO list 'annotations'")])
def test_malformed_annotation_json_names_the_file(tiny_root, tmp_path, text, match):
    root, ann = _copy(tiny_root, tmp_path)
    ann.write_text(text)
    with pytest.raises(data.DatasetError, match=match):
        data.CocoDetectionSet(root, "flir", "val")


def test_listed_image_missing_fails_at_construction(tiny_root, tmp_path):
    root, ann = _copy(tiny_root, tmp_path)
    name = json.loads(ann.read_text())["images"][1]["file_name"]
    (ann.parent / name).unlink()
    with pytest.raises(data.DatasetError, match=rf"1 of \d+ listed images are not in .*{name.split('/')[-1]}"):
        data.CocoDetectionSet(root, "flir", "val")


def test_unreadable_image_stops_training_before_anything_is_written(tiny_root, tmp_path):
    root, _ = _copy(tiny_root, tmp_path)
    ds = data.CocoDetectionSet(root, "flir", "train", data.FLIR_CLASSES, limit=4)
    (ds.image_dir / ds.coco.imgs[ds.ids[2]]["file_name"]).write_bytes(b"not a jpeg")
    run_dir = tmp_path / "run"
    with pytest.raises(data.DatasetError, match=rf"image id {ds.ids[2]} .*cannot be read"):
        _fit(ds, run_dir)
    assert not (run_dir / "checkpoint.pth").exists() and not (run_dir / "train_log.jsonl").exists()


def test_unknown_category_lists_the_files_categories(tiny_root):
    with pytest.raises(data.DatasetError, match=r"no categories named \['truck'\]; it has"):
        data.CocoDetectionSet(tiny_root, "flir", "val", classes=("person", "truck"))


def test_corrupt_checkpoint_is_named_and_not_overwritten(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pth").write_bytes(b"PK\x03\x04 truncated")
    before = _untouched(run_dir)
    ds = data.CocoDetectionSet(tiny_root, "flir", "train", data.FLIR_CLASSES, limit=2)
    with pytest.raises(train.CheckpointError, match="checkpoint.pth cannot be read.*delete it"):
        _fit(ds, run_dir)
    assert _untouched(run_dir) == before
    with pytest.raises(train.CheckpointError, match="cannot be read"):
        models.build_detector(models.TINY_ARCH, 4, 64, 80, weights=str(run_dir / "checkpoint.pth"))
    torch.save({"optimizer": {}}, run_dir / "other.pth")
    with pytest.raises(train.CheckpointError, match=r"lacks \['model'"):
        train.load_checkpoint(run_dir / "other.pth")


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    small = models.build_detector(models.TINY_ARCH, 4, 64, 80)
    train.save_weights(small, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="does not match the architecture"):
        models.build_detector("retinanet_resnet18_fpn_tiny", 4, 64, 80, weights=str(tmp_path / "model.pth"))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code when unpickled is an error, not executed."""
    torch.save({"model": {}, "hook": math.floor}, tmp_path / "evil.pth")
    with pytest.raises(train.CheckpointError, match="cannot be read"):
        train.load_checkpoint(tmp_path / "evil.pth")


def test_unknown_parameter_common_key_or_profile_in_a_params_file(tmp_path):
    cases = {"runs:\n  - notebook: 02_train_detector\n    parameters: {EPOCS: 3}\n": "does not declare",
             "common: {SEDD: 1}\nruns:\n  - notebook: 01_prepare_data\n": "no notebook .* declares",
             "common: {PROFILE: papr}\nruns:\n  - notebook: 01_prepare_data\n": r"PROFILE 'papr'; the profiles are",
             "runs:\n  - notebook: 11_nothing\n": "11_nothing.ipynb not found"}
    for i, (text, match) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(batch.BatchError, match=match):
            batch.load_batch(path)
        assert batch.main([str(path), "--list"]) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("setting", ["W9A8", "W8A1", "W0A8", "8A8", "W16A16"])
def test_impossible_bit_width_fails_before_any_row(tmp_path, setting):
    with pytest.raises(ValueError, match="bit setting|must be an integer in 2..8"):
        zsq.run_grid(None, {None: []}, True, None, ["W8A8", setting], tmp_path / "rows.jsonl")
    assert not (tmp_path / "rows.jsonl").exists()
    with pytest.raises(ValueError, match="2..8"):
        quant.check_bits(1)


def test_nan_loss_in_training_stops_and_keeps_the_last_good_epoch(tiny_root, tmp_path):
    ds = data.CocoDetectionSet(tiny_root, "flir", "train", data.FLIR_CLASSES, limit=4)
    _fit(ds, tmp_path, epochs=1)
    before = _untouched(tmp_path)
    class Poisoned(torch.utils.data.Dataset):  # a NaN frame (a broken sensor read) in epoch 1
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            image, target = ds[i]
            return torch.full_like(image, float("nan")), target
    with pytest.raises(train.TrainingDiverged, match="loss is nan at epoch 1, iteration 0.*lower the learning rate"):
        _fit(Poisoned(), tmp_path, epochs=2)
    assert _untouched(tmp_path) == before


def test_nan_in_the_bn_statistics_stops_distillation(tmp_path):
    model = models.build_detector(models.TINY_ARCH, 4, 64, 80).eval()
    model.backbone.body.bn1.running_mean[0] = float("nan")
    with pytest.raises(distill.DistillationDiverged, match="loss is nan at iteration 0 of batch 0"):
        distill.distill(model, num_images=2, batch_size=2, iterations=3, progress=False)
    run = runs.open_run("03_distill_calibration_data", {"X": 1})
    with pytest.raises(distill.DistillationDiverged):
        distill.distill_or_load(run, model, [0, 3], num_images=2, batch_size=2, iterations=3)
    assert not run.path("distilled.pt").exists() and not run.path("loss_curves.json").exists()
