import json
import shutil

import pytest
import torch

from helpers import data


def test_dog_is_dropped_and_labels_are_contiguous(tiny_root):
    with_dog = data.CocoDetectionSet(tiny_root, "flir", "train", classes=("person", "bicycle", "car", "dog"))
    flir = data.CocoDetectionSet(tiny_root, "flir", "train", classes=data.FLIR_CLASSES)
    assert flir.num_classes == 4 and flir.label_to_cat == {1: 1, 2: 2, 3: 3}
    dogs = with_dog.summary()["instances"]["dog"]
    assert dogs > 0, "the fixture must contain dogs to test their removal"
    assert flir.summary()["dropped_instances"] == dogs
    labels = torch.cat([flir[i][1]["labels"] for i in range(len(flir))])
    assert set(labels.tolist()) <= {1, 2, 3}
    assert all(a["category_id"] != 18 for a in flir.ground_truth().dataset["annotations"])


def test_images_are_three_channel_float(tiny_root):
    image, target = data.CocoDetectionSet(tiny_root, "flir", "val", classes=data.FLIR_CLASSES)[0]
    assert image.shape == (3, 128, 160) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grayscale duplicated
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_category_id_labels_for_the_coco_model(tiny_root):
    ds = data.CocoDetectionSet(tiny_root, "coco", "val", labels="category_id")
    assert ds.label_to_cat[18] == 18 and ds.num_classes == 19


def test_missing_dataset_says_what_to_download(tmp_path):
    with pytest.raises(data.DatasetError, match="FLIR ADAS v1.3") as err:
        data.CocoDetectionSet(tmp_path, "flir", "train")
    assert "thermal_annotations.json" in str(err.value)
    with pytest.raises(data.DatasetError, match="COCO 2017"):
        data.CocoDetectionSet(tmp_path, "coco", "val")


def _copy(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root / "FLIR_ADAS_1_3", root / "FLIR_ADAS_1_3")
    return root, root / "FLIR_ADAS_1_3" / "val" / "thermal_annotations.json"


def test_malformed_json_names_file_and_entry(tiny_root, tmp_path):
    root, ann = _copy(tiny_root, tmp_path)
    ann.write_text("{not json")
    with pytest.raises(data.DatasetError, match="thermal_annotations.json: not valid JSON"):
        data.CocoDetectionSet(root, "flir", "val")
    good = json.loads((tiny_root / "FLIR_ADAS_1_3" / "val" / "thermal_annotations.json").read_text())
    good["annotations"][2]["bbox"] = [1, 2, 3]
    ann.write_text(json.dumps(good))
    with pytest.raises(data.DatasetError, match=r"annotations\[2\].*\[x, y, width, height\]"):
        data.CocoDetectionSet(root, "flir", "val")
    good["annotations"][2]["bbox"] = [1, 2, 3, 4]
    good["annotations"][3]["image_id"] = 99999
    ann.write_text(json.dumps(good))
    with pytest.raises(data.DatasetError, match=r"annotations\[3\].*image_id 99999"):
        data.CocoDetectionSet(root, "flir", "val")


def test_missing_image_names_file_and_entry(tiny_root, tmp_path):
    root, ann = _copy(tiny_root, tmp_path)
    ds = data.CocoDetectionSet(root, "flir", "val")
    name = ds.coco.imgs[ds.ids[0]]["file_name"]
    (root / "FLIR_ADAS_1_3" / "val" / name).unlink()
    with pytest.raises(data.DatasetError, match=rf"image id {ds.ids[0]} \('{name}'\)"):
        ds[0]


def test_unknown_class_is_rejected(tiny_root):
    with pytest.raises(data.DatasetError, match="no categories named"):
        data.CocoDetectionSet(tiny_root, "flir", "val", classes=("person", "truck"))


def test_preloaded_split_serves_the_same_items_and_ground_truth(tiny_root):
    val = data.CocoDetectionSet(tiny_root, "flir", "val", data.FLIR_CLASSES)
    held = data.Preloaded(val)
    assert len(held) == len(val) and held.label_to_cat == val.label_to_cat
    for i in range(len(val)):
        (image, target), (again, twin) = held[i], val[i]
        assert torch.equal(image, again) and torch.equal(target["boxes"], twin["boxes"])
    assert held.ground_truth().dataset == val.ground_truth().dataset
    with pytest.raises(ValueError, match="augmentation"):
        data.Preloaded(data.CocoDetectionSet(tiny_root, "flir", "train", data.FLIR_CLASSES, train=True))
