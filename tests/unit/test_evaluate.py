import pytest

from helpers import evaluate


def _gt_as_detections(gt, shift=0.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
             "bbox": [a["bbox"][0] + shift, a["bbox"][1] + shift, a["bbox"][2], a["bbox"][3]]}
            for a in gt.dataset["annotations"]]


def test_ground_truth_as_predictions_scores_one(tiny_root):
    from helpers.data import CocoDetectionSet
    gt = CocoDetectionSet(tiny_root, "flir", "val", classes=("person", "bicycle", "car")).ground_truth()
    perfect = evaluate.coco_map(gt, _gt_as_detections(gt))
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    present = {gt.cats[a["category_id"]]["name"] for a in gt.dataset["annotations"]}
    assert all(perfect["per_class_AP"][name] == pytest.approx(1.0) for name in present)
    shifted = evaluate.coco_map(gt, _gt_as_detections(gt, shift=3.0))
    assert shifted["AP"] < 0.9 * perfect["AP"]
    assert set(evaluate.STAT_NAMES) <= set(shifted)


def test_no_detections_scores_zero(tiny_root):
    from helpers.data import CocoDetectionSet
    gt = CocoDetectionSet(tiny_root, "flir", "val", classes=("person", "bicycle", "car")).ground_truth()
    assert evaluate.coco_map(gt, [])["AP"] == 0.0


def test_zero_annotation_id_is_renumbered(tiny_root):
    """FLIR-style files may start annotation ids at 0, which COCOeval reads as 'unmatched'."""
    from helpers.data import CocoDetectionSet
    ds = CocoDetectionSet(tiny_root, "flir", "val", classes=("person", "bicycle", "car"))
    assert min(a["id"] for a in ds.ground_truth().dataset["annotations"]) == 1


def test_difficulty_window():
    assert evaluate.difficulty_window({"AP": 0.4, "AP50": 0.8}) == {"AP": 0.4, "AP50": 0.8, "AP_in_window": True, "AP50_below_max": True}
    assert evaluate.difficulty_window({"AP": 0.7, "AP50": 0.95})["AP_in_window"] is False


def test_a_size_range_without_ground_truth_is_undefined_not_zero(tiny_root):
    from helpers.data import CocoDetectionSet
    gt = CocoDetectionSet(tiny_root, "flir", "val", classes=("person", "bicycle", "car")).ground_truth()
    gt.dataset["annotations"] = [a for a in gt.dataset["annotations"] if a["area"] <= 96 ** 2]  # no large objects
    gt.createIndex()
    metrics = evaluate.coco_map(gt, _gt_as_detections(gt))
    assert metrics["APl"] is None and metrics["ARl"] is None and metrics["AP"] == pytest.approx(1.0)
    assert "n/a" in evaluate.metrics_table(metrics).splitlines()[1]
