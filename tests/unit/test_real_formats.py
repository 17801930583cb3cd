"""The paper-profile loaders on small hand-made fixtures shaped like the real files.

FLIR ADAS v1.3's `thermal_annotations.json` numbers images from 0, may number annotations from 0,
lists more categories than the paper uses, stores `file_name` relative to the split folder
("thermal_8_bit/FLIR_00001.jpeg") and carries extra keys; COCO 2017 uses bare file names and ids
up to 90 with gaps.
"""
import json

import numpy as np
import pytest
from PIL import Image

from helpers import data, evaluate


@pytest.fixture()
def real_like_root(tmp_path):
    split = tmp_path / "FLIR_ADAS_1_3" / "val"
    (split / "thermal_8_bit").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((512, 640), 40 * (i + 1), np.uint8)).save(split / "thermal_8_bit" / f"FLIR_0886{3 + i}.jpeg")
    flir = {
        "info": {"year": 2018, "version": "1.3"}, "licenses": [],
        "categories": [{"id": 1, "name": "person", "supercategory": "unknown"},
                       {"id": 2, "name": "bicycle", "supercategory": "unknown"},
                       {"id": 3, "name": "car", "supercategory": "unknown"},
                       {"id": 4, "name": "motorcycle", "supercategory": "unknown"},
                       {"id": 18, "name": "dog", "supercategory": "unknown"}],
        "images": [{"id": 0, "file_name": "thermal_8_bit/FLIR_08863.jpeg", "width": 640, "height": 512,
                    "extra_info": {}}, {"id": 1, "file_name": "thermal_8_bit/FLIR_08864.jpeg", "width": 640, "height": 512}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "bbox": [100, 120, 30, 80], "area": 2400, "iscrowd": 0, "segmentation": [[]]},
            {"id": 1, "image_id": 0, "category_id": 18, "bbox": [300, 400, 40, 25], "area": 1000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 200, 120, 60], "area": 7200, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 4, "bbox": [400, 220, 50, 40], "area": 2000, "iscrowd": 0}],
    }
    (split / "thermal_annotations.json").write_text(json.dumps(flir))
    coco_dir = tmp_path / "coco"
    (coco_dir / "val2017").mkdir(parents=True)
    (coco_dir / "annotations").mkdir()
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(coco_dir / "val2017" / "000000000139.jpg")
    coco = {"images": [{"id": 139, "file_name": "000000000139.jpg", "width": 640, "height": 480}],
            "categories": [{"id": 1, "name": "person"}, {"id": 62, "name": "chair"}, {"id": 90, "name": "toothbrush"}],
            "annotations": [{"id": 9001, "image_id": 139, "category_id": 62, "bbox": [1, 2, 50, 60], "area": 3000, "iscrowd": 0}]}
    (coco_dir / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    return tmp_path


def test_flir_v13_file_loads_drops_dog_and_other_classes(real_like_root):
    ds = data.CocoDetectionSet(real_like_root, "flir", "val", classes=data.FLIR_CLASSES)
    image, target = ds[0]
    assert image.shape == (3, 512, 640)
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[100, 120, 130, 200]]
    assert ds.summary() == {"images": 2, "instances": {"person": 1, "bicycle": 0, "car": 1}, "dropped_instances": 2}
    gt = ds.ground_truth()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    assert evaluate.coco_map(gt, perfect)["AP"] == pytest.approx(1.0)  # annotation id 0 renumbered


def test_coco_2017_file_keeps_category_ids_for_the_torchvision_model(real_like_root):
    ds = data.CocoDetectionSet(real_like_root, "coco", "val", labels="category_id")
    assert ds.num_classes == 91  # torchvision's COCO RetinaNet: ids up to 90
    _, target = ds[0]
    assert target["labels"].tolist() == [62]


V2_CATEGORIES = [(1, "person"), (2, "bike"), (3, "car"), (4, "motor"), (6, "bus"), (7, "train"), (8, "truck"),
                 (10, "light"), (11, "hydrant"), (12, "sign"), (17, "dog"), (37, "skateboard"), (73, "stroller"),
                 (77, "scooter"), (79, "other vehicle")]


@pytest.fixture()
def flir_v2_root(tmp_path):
    """FLIR ADAS v2 as released: `images_thermal_{train,val}/coco.json` beside `data/`, file names
    "data/video-<id>-frame-<n>-<id>.jpg", v2's own category list (bicycles are "bike", dog is 17, ids
    with gaps), `extra_info` on images and annotations, ids from 0."""
    for split, n in (("train", 3), ("val", 2)):
        folder = tmp_path / "FLIR_ADAS_v2" / f"images_thermal_{split}"
        (folder / "data").mkdir(parents=True)
        images = []
        for i in range(n):
            name = f"data/video-BzZspxAweF8AnKhWK-frame-{i:06d}-SSCRtAHcFjphNPczJ.jpg"
            Image.fromarray(np.full((512, 640, 3), 30 * (i + 1), np.uint8)).save(folder / name)
            images.append({"id": i, "file_name": name, "width": 640, "height": 512, "license": 1,
                           "date_captured": "2021-11-15T10:51:57Z",
                           "extra_info": {"video_id": "BzZspxAweF8AnKhWK", "frame_index": i}})
        anns = [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [100, 120, 30, 80], "area": 2400, "iscrowd": 0,
                 "segmentation": [], "extra_info": {"human_annotated": True}},
                {"id": 1, "image_id": 0, "category_id": 17, "bbox": [300, 400, 40, 25], "area": 1000, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 200, 60, 60], "area": 3600, "iscrowd": 0},
                {"id": 3, "image_id": 1, "category_id": 8, "bbox": [400, 220, 90, 40], "area": 3600, "iscrowd": 0},
                {"id": 4, "image_id": 1, "category_id": 3, "bbox": [200, 250, 120, 60], "area": 7200, "iscrowd": 0}]
        coco = {"info": {"description": "FLIR ADAS v2"}, "licenses": [{"id": 1, "name": "FLIR"}],
                "categories": [{"id": c, "name": name, "supercategory": "unknown"} for c, name in V2_CATEGORIES],
                "images": images, "annotations": anns}
        (folder / "coco.json").write_text(json.dumps(coco))
    return tmp_path


def test_flir_v2_layout_loads_with_the_papers_classes_remapped(flir_v2_root):
    for split in ("train", "val"):
        ds = data.CocoDetectionSet(flir_v2_root, "flir_v2", split, classes=data.FLIR_CLASSES)
        assert ds.classes == data.FLIR_CLASSES and ds.category_ids == [1, 2, 3]  # bicycle -> v2's "bike" (id 2)
        assert ds.num_classes == 4
    assert ds.summary() == {"images": 2, "instances": {"person": 1, "bicycle": 1, "car": 1}, "dropped_instances": 2}
    _, target = ds[1]
    assert target["labels"].tolist() == [2, 3]  # bike and car; the truck is dropped
    _, target = ds[0]
    assert target["labels"].tolist() == [1]  # dog (17) dropped
    gt = ds.ground_truth()
    assert [c["name"] for c in gt.dataset["categories"]] == list(data.FLIR_CLASSES)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    metrics = evaluate.coco_map(gt, perfect)
    assert metrics["AP"] == pytest.approx(1.0) and set(metrics["per_class_AP"]) == set(data.FLIR_CLASSES)


def test_flir_v2_root_from_the_environment(flir_v2_root, monkeypatch):
    monkeypatch.setenv(data.DATA_ROOT_VARIABLE, str(flir_v2_root))
    assert len(data.CocoDetectionSet(data.PAPER_DATA_ROOT, "flir_v2", "val", classes=data.FLIR_CLASSES)) == 2
    with pytest.raises(data.DatasetError, match="images_thermal_val/coco.json"):
        data.CocoDetectionSet("data/nowhere", "flir_v2", "val")  # only the paper's "data" is redirected
