"""One COCO-format detection dataset for FLIR ADAS v1.3, FLIR ADAS v2 and COCO 2017, real or synthetic.

Built on torchvision's `CocoDetection` + `wrap_dataset_for_transforms_v2`; adds what the paper
needs on top: keep a subset of categories (FLIR: person, bicycle, car; dog dropped), map them to
contiguous labels 1..K (or keep COCO ids for the torchvision COCO model), and clear errors for
missing folders, malformed JSON and missing images.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2

from helpers.runs import resolve_path

FLIR_CLASSES = ("person", "bicycle", "car")  # the paper drops dog (too few instances)


@dataclass(frozen=True)
class Layout:
    """Where a split's images and annotation file live, relative to the dataset root."""

    folder: str
    images: str      # image root that COCO `file_name`s are relative to
    annotations: str
    download: str    # what to tell a user whose folder is missing


LAYOUTS = {
    "flir": Layout("FLIR_ADAS_1_3", "{split}", "{split}/thermal_annotations.json",
                   "FLIR ADAS v1.3 (thermal_8_bit + thermal_annotations.json per split) from "
                   "https://www.flir.com/oem/adas/adas-dataset-form/"),
    # v2: one folder per split with coco.json beside data/; file_names are "data/video-...jpg";
    # category ids as in v2's own list (person 1, bike 2, car 3, ..., dog 17), no "bicycle"
    "flir_v2": Layout("FLIR_ADAS_v2", "images_thermal_{split}", "images_thermal_{split}/coco.json",
                      "FLIR ADAS v2 (images_thermal_train/ and images_thermal_val/, each with coco.json and "
                      "data/) from https://www.flir.com/oem/adas/adas-dataset-form/"),
    "coco": Layout("coco", "{split}2017", "annotations/instances_{split}2017.json",
                   "COCO 2017 images (train2017/val2017) and annotations_trainval2017 from "
                   "https://cocodataset.org/#download"),
}


# the paper's class names as each layout's annotation file spells them (FLIR v2 calls bicycles "bike")
CATEGORY_ALIASES = {"flir_v2": {"bicycle": "bike"}}
DATA_ROOT_VARIABLE = "IRZSQ_DATA_ROOT"  # where the real datasets are, if not under the project's data/
PAPER_DATA_ROOT = "data"


def dataset_root(root: str | Path) -> Path:
    """The dataset root: `root` relative to the project, except that the paper batch's "data" is replaced
    by $IRZSQ_DATA_ROOT when that is set (the datasets stay where they are; run ids do not change)."""
    if str(root) == PAPER_DATA_ROOT and os.environ.get(DATA_ROOT_VARIABLE):
        return Path(os.environ[DATA_ROOT_VARIABLE]).expanduser()
    return resolve_path(root)


class DatasetError(RuntimeError):
    """A dataset on disk is missing or malformed; the message says which file and how to fix it."""


def split_paths(data_root: str | Path, dataset: str, split: str) -> tuple[Path, Path]:
    if dataset not in LAYOUTS:
        raise ValueError(f"dataset must be one of {sorted(LAYOUTS)}, got {dataset!r}")
    layout = LAYOUTS[dataset]
    base = dataset_root(data_root) / layout.folder
    images = base / layout.images.format(split=split)
    annotations = base / layout.annotations.format(split=split)
    if not annotations.exists() or not images.is_dir():
        missing = annotations if images.is_dir() else images
        raise DatasetError(
            f"{dataset} {split} split not found: {missing} does not exist.\n"
            f"Download {layout.download} and unpack it so that {annotations} and {images}/ exist "
            f"(expected layout: {base}/{layout.annotations.format(split=split)}). "
            "For the synthetic stand-in run notebooks/01_prepare_data.ipynb.")
    return images, annotations


def validate_coco_json(path: Path) -> dict:
    """Load and check a COCO annotation file; errors name the file and the offending entry."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO object with 'images', 'annotations', 'categories'; got {type(data).__name__}.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing the COCO list '{key}'.")
    if not data["images"]:
        raise DatasetError(f"{path}: lists no images; the split is empty (an unfinished download or copy?).")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not {"id", "file_name"} <= set(img):
            raise DatasetError(f"{path}: images[{i}] lacks 'id' or 'file_name': {img}")
        image_ids.add(img["id"])
    category_ids = {c.get("id") for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox")
        where = f"{path}: annotations[{i}] (id {ann.get('id')})"
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"{where} has bbox {bbox!r}; expected [x, y, width, height].")
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'.")
        if ann.get("category_id") not in category_ids:
            raise DatasetError(f"{where} has category_id {ann.get('category_id')!r}, not in 'categories'.")
    return data


def detection_transforms(train: bool) -> v2.Compose:
    """uint8 image -> float [0, 1]; the detector's own transform normalises and resizes."""
    ops = [v2.ToImage()]
    if train:
        ops.append(v2.RandomHorizontalFlip(0.5))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


class CocoDetectionSet(Dataset):
    """COCO/FLIR detection split with category filtering and label remapping.

    Images are read as RGB, so single-channel thermal frames are duplicated to three channels as
    in the paper (section 4.1.2). Targets: `boxes` (XYXY, `tv_tensors.BoundingBoxes`), `labels`
    (1..K, or COCO category ids when `labels='category_id'`) and `image_id`.
    """

    def __init__(self, data_root: str | Path, dataset: str, split: str, classes: tuple[str, ...] | None = None,
                 labels: str = "contiguous", train: bool = False, limit: int | None = None):
        if labels not in ("contiguous", "category_id"):
            raise ValueError(f"labels must be 'contiguous' or 'category_id', got {labels!r}")
        self.train = train
        self.image_dir, self.annotation_file = split_paths(data_root, dataset, split)
        raw = validate_coco_json(self.annotation_file)
        by_name = {c["name"]: c["id"] for c in raw["categories"]}
        aliases = CATEGORY_ALIASES.get(dataset, {})
        by_name.update({paper: by_name[own] for paper, own in aliases.items() if own in by_name and paper not in by_name})
        classes = tuple(classes) if classes else tuple(c["name"] for c in raw["categories"])
        unknown = [c for c in classes if c not in by_name]
        if unknown:
            raise DatasetError(f"{self.annotation_file}: no categories named {unknown}; it has {sorted(by_name)}.")
        missing = [img["file_name"] for img in raw["images"] if not (self.image_dir / img["file_name"]).is_file()]
        if missing:
            raise DatasetError(f"{self.annotation_file}: {len(missing)} of {len(raw['images'])} listed images are not in "
                               f"{self.image_dir} (first: {missing[:3]}); complete the download or fix 'file_name'.")
        self.classes = classes
        self.category_ids = [by_name[c] for c in classes]
        self.cat_to_label = {cid: (i + 1 if labels == "contiguous" else cid) for i, cid in enumerate(self.category_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            base = datasets.CocoDetection(str(self.image_dir), str(self.annotation_file),
                                          transforms=detection_transforms(train))
        self.base = datasets.wrap_dataset_for_transforms_v2(base, target_keys=("boxes", "labels", "image_id"))
        self.coco = base.coco
        self.ids = base.ids if limit is None else base.ids[:limit]
        self._base_index = {img_id: i for i, img_id in enumerate(base.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        try:
            image, target = self.base[self._base_index[image_id]]
        except (FileNotFoundError, OSError, RuntimeError) as err:  # missing, or not a decodable image
            info = self.coco.imgs[image_id]
            raise DatasetError(f"{self.annotation_file}: image id {image_id} ('{info['file_name']}') "
                               f"cannot be read from {self.image_dir}: {err}") from None
        boxes = target.get("boxes", tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                                             canvas_size=tuple(image.shape[-2:])))
        labels = target.get("labels", torch.zeros(0, dtype=torch.int64))
        keep = torch.tensor([int(c) in self.cat_to_label for c in labels], dtype=torch.bool)
        keep &= (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)  # degenerate boxes break the loss
        mapped = torch.tensor([self.cat_to_label[int(c)] for c in labels[keep]], dtype=torch.int64)
        return image, {"boxes": boxes[keep], "labels": mapped, "image_id": image_id}

    @property
    def num_classes(self) -> int:
        """What RetinaNet's `num_classes` must be: labels index the logits directly."""
        return max(self.label_to_cat) + 1

    def ground_truth(self):
        """A pycocotools COCO of this split restricted to the kept classes, for COCOeval.

        Annotation ids are renumbered from 1 because COCOeval treats id 0 as 'unmatched'.
        """
        from pycocotools.coco import COCO
        anns = [a for a in self.coco.dataset["annotations"]
                if a["category_id"] in self.cat_to_label and a["image_id"] in set(self.ids)]
        images = [self.coco.imgs[i] for i in self.ids]
        data = {"images": images, "categories": [dict(self.coco.cats[c], name=name) for c, name in zip(self.category_ids, self.classes)],
                "annotations": [dict(a, id=i + 1, area=a.get("area", a["bbox"][2] * a["bbox"][3]),
                                     iscrowd=a.get("iscrowd", 0)) for i, a in enumerate(anns)]}
        gt = COCO()
        gt.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt

    def summary(self) -> dict:
        """Counts per kept class and of dropped instances (stable, for notebooks)."""
        ids = set(self.ids)
        counts = {name: 0 for name in self.classes}
        dropped = 0
        for a in self.coco.dataset["annotations"]:
            if a["image_id"] not in ids:
                continue
            if a["category_id"] in self.cat_to_label:
                counts[self.classes[self.category_ids.index(a["category_id"])]] += 1
            else:
                dropped += 1
        return {"images": len(self.ids), "instances": counts, "dropped_instances": dropped}


class Preloaded(Dataset):
    """A split read and decoded once and then served from memory, for sets that are evaluated many
    times over (notebook 04 scores every calibrated model on the same validation images). Only
    for splits without random transforms; everything else (`ground_truth`, `label_to_cat`, ...)
    comes from the wrapped set."""

    def __init__(self, dataset: CocoDetectionSet):
        if getattr(dataset, "train", False):
            raise ValueError("Preloaded would freeze one draw of the training augmentation; wrap an evaluation split")
        self.source = dataset
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def box_statistics(dataset: CocoDetectionSet) -> dict:
    """How small and crowded the kept objects are (a difficulty fingerprint of a set)."""
    import numpy as np
    ids = set(dataset.ids)
    anns = [a for a in dataset.coco.dataset["annotations"] if a["image_id"] in ids and a["category_id"] in dataset.cat_to_label]
    heights = np.array([a["bbox"][3] for a in anns]) if anns else np.zeros(1)
    return {"height_p10_p50_p90": [round(float(v), 1) for v in np.percentile(heights, [10, 50, 90])],
            "share_under_16px": round(float((heights < 16).mean()), 3),
            "objects_per_image": round(len(anns) / max(len(ids), 1), 2)}


def collate(batch):
    return tuple(zip(*batch))


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """Seeded loader: shuffling order depends only on `seed` (and the epoch, via the generator state)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, collate_fn=collate, generator=generator,
                      num_workers=num_workers, drop_last=False, persistent_workers=num_workers > 0)
