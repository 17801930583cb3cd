import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from helpers import synth
from helpers.data import CocoDetectionSet


def test_flir_layout_loads_with_pycocotools_and_round_trips(tiny_root):
    ann_file = tiny_root / "FLIR_ADAS_1_3" / "train" / "thermal_annotations.json"
    coco = COCO(str(ann_file))
    assert len(coco.getImgIds()) == 12
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"person", "bicycle", "car", "dog"}
    first = coco.loadImgs(coco.getImgIds())[0]
    assert first["file_name"].startswith("thermal_8_bit/FLIR_") and first["file_name"].endswith(".jpeg")
    image = Image.open(tiny_root / "FLIR_ADAS_1_3" / "train" / first["file_name"])
    assert image.mode == "L" and image.size == (first["width"], first["height"])
    # every box of the JSON comes back from the loader, in XYXY
    ds = CocoDetectionSet(tiny_root, "flir", "train", classes=("person", "bicycle", "car", "dog"))
    for index in range(len(ds)):
        _, target = ds[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=target["image_id"]))
        expected = sorted([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns)
        assert sorted(target["boxes"].tolist()) == expected


def test_coco_layout_has_more_classes_than_flir(tiny_root):
    coco = COCO(str(tiny_root / "coco" / "annotations" / "instances_val2017.json"))
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert {"person", "bicycle", "car", "dog"} < names and len(names) >= 6
    assert all(img["file_name"].endswith(".jpg") for img in coco.loadImgs(coco.getImgIds()))


def test_generation_is_deterministic_and_seed_dependent():
    spec = synth.SceneSpec()
    a, anns_a = synth.generate_scene(synth.image_rng(0, "train", 5, False), spec, rgb=False)
    b, anns_b = synth.generate_scene(synth.image_rng(0, "train", 5, False), spec, rgb=False)
    c, _ = synth.generate_scene(synth.image_rng(1, "train", 5, False), spec, rgb=False)
    assert np.array_equal(a, b) and anns_a == anns_b
    assert not np.array_equal(a, c)


def test_scenes_are_crowded_small_and_contain_dogs():
    spec = synth.SceneSpec()
    heights, counts, names = [], [], set()
    for i in range(60):
        _, anns = synth.generate_scene(synth.image_rng(0, "train", i, False), spec, rgb=False)
        counts.append(len(anns))
        heights += [a["bbox"][3] for a in anns]
        names |= {a["category"] for a in anns}
    assert names == {"person", "bicycle", "car", "dog"}
    assert max(counts) >= 8
    assert np.mean(np.array(heights) < 16) > 0.2  # many small, distant objects


def test_rerun_is_skipped_and_foreign_data_is_protected(tmp_path):
    root = tmp_path / "FLIR_ADAS_1_3"
    synth.write_dataset(root, "flir", 2, 1, seed=0)
    ann = root / "train" / "thermal_annotations.json"
    before = ann.stat().st_mtime_ns
    synth.write_dataset(root, "flir", 2, 1, seed=0)
    assert ann.stat().st_mtime_ns == before
    foreign = tmp_path / "real" / "FLIR_ADAS_1_3"
    foreign.mkdir(parents=True)
    (foreign / "something.json").write_text(json.dumps({}))
    import pytest
    with pytest.raises(FileExistsError, match="did not write"):
        synth.write_dataset(foreign, "flir", 2, 1)


def test_crowd_knobs_add_people_and_spread_them():
    from dataclasses import replace

    def people(spec):
        boxes = []
        for i in range(40):
            _, anns = synth.generate_scene(synth.image_rng(0, "train", i, False), spec, rgb=False)
            boxes.append([a["bbox"] for a in anns if a["category"] == "person"])
        return boxes

    base = synth.SceneSpec()  # every size drawn, so crowds far away count too
    always, never = people(replace(base, crowds=1.0)), people(replace(base, crowds=0.0))
    assert sum(map(len, always)) > sum(map(len, never)) + 10  # most group members hide behind the first one
    wide = people(replace(base, crowds=1.0, crowd_spread=30.0))
    centre_sd = lambda frames: np.mean([np.std([b[0] + b[2] / 2 for b in f]) for f in frames if len(f) > 1])
    assert centre_sd(wide) > centre_sd(always)
