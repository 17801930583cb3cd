"""A small patch-classification task cut from the (synthetic or real) FLIR thermal set, for DF-MPC.

DF-MPC (issue 5, `helpers/dfmpc.py`) is evaluated by the paper on classifiers, so we need one that
trains in minutes on a CPU. `build_patch_set` crops every annotated box of a FLIR-layout split
(person, bicycle, car, dog) into a square grayscale patch, adds random background crops that overlap
no box, resizes them to `size` x `size`, replicates the gray channel 3 times and caps every class at
`max_per_class` (deterministic by `seed`). `build_classifier` is the ResNet-18 topology (BasicBlock
[2, 2, 2, 2], BatchNorm kept) with a 3x3 stride-1 stem, no max-pool, and narrow widths
(`width`, 2w, 4w, 8w), so that `helpers.dfmpc.find_pairs` finds its BasicBlock conv1 -> conv2 links.

`thermal_patch_task` (tiny profile) cuts the sets and trains the classifier once, storing its
weights; `imagenet_task` (paper profile) loads torchvision's ImageNet ResNet-18 / ResNet-50 and an
ImageNet validation folder, and says what to download when either is missing. Both return a
`ClassifierTask` (model, val set, a few calibration images for the data-fit diagnostic).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.models.resnet import BasicBlock
from tqdm.auto import tqdm

from helpers.data import DatasetError, split_paths
from helpers.models import WeightsMissing, cached_weights
from helpers.runs import atomic_torch_save, atomic_write_json, resolve_path

PATCH_CLASSES = ("person", "bicycle", "car", "dog", "background")
FLIR_CATEGORY_TO_LABEL = {1: 0, 2: 1, 3: 2, 18: 3}  # COCO / FLIR category id -> patch label
BACKGROUND = 4


# --------------------------------------------------------------------------- data
class PatchSet(TensorDataset):
    """`images` float32 (N, 3, S, S) in [0, 1], `labels` int64 (N,) in 0..4 (see `PATCH_CLASSES`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes=PATCH_CLASSES):
        super().__init__(images, labels)
        self.images, self.labels, self.classes = images, labels, tuple(classes)

    def counts(self) -> dict[str, int]:
        n = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, n))


def _square(x: float, y: float, w: float, h: float, pad: float) -> tuple[float, float, float]:
    """Centre and side of the square that holds the box plus `pad` (fraction of the long side)."""
    return x + w / 2, y + h / 2, max(w, h) * (1 + pad)


def _crop(img: Image.Image, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Square crop (edge-replicated beyond the image), resized to size x size, as uint8 (size, size)."""
    half = side / 2
    box = (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half)))
    arr = np.asarray(img)
    pad = max(0, -box[0], -box[1], box[2] - arr.shape[1], box[3] - arr.shape[0])
    if pad:
        arr = np.pad(arr, pad, mode="edge")
        box = tuple(b + pad for b in box)
    patch = Image.fromarray(arr[box[1]:box[3], box[0]:box[2]])
    return np.asarray(patch.resize((size, size), Image.BILINEAR))


def _overlaps(x0, y0, x1, y1, boxes) -> bool:
    return any(x0 < bx + bw and bx < x1 and y0 < by + bh and by < y1 for bx, by, bw, bh in boxes)


def build_patch_set(data_root: str | Path, split: str, size: int = 48, seed: int = 0,
                    max_per_class: int | None = 300, backgrounds_per_image: int = 1, pad: float = 0.1,
                    min_side: float = 6.0, tries: int = 30, progress: bool | None = None) -> PatchSet:
    """Patches from the FLIR-layout split `data_root/FLIR_ADAS_1_3/<split>` (deterministic by `seed`).

    Objects: every non-crowd box with both sides >= `min_side` px, as a square of side
    max(w, h) * (1 + pad) around its centre. Background: up to `backgrounds_per_image` random squares
    per image (side drawn from the object sides seen so far in that split, at least 16 px) that overlap
    no box at all; `tries` attempts each. Each class is then subsampled to `max_per_class` (None: keep
    all), so classes are balanced as far as the data allows (dog is the rarest in FLIR).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    images_dir, ann_path = split_paths(data_root, "flir", split)
    coco = json.loads(Path(ann_path).read_text())
    boxes_by_image: dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        boxes_by_image.setdefault(a["image_id"], []).append(a)
    rng = np.random.default_rng(seed)
    patches, labels = [], []
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]] or [32.0]
    lo_side, hi_side = max(16.0, float(np.percentile(sides, 10))), max(16.0, float(np.percentile(sides, 90)))
    for im in tqdm(sorted(coco["images"], key=lambda i: i["id"]), desc=f"patches {split}", leave=False,
                   **({} if progress is None else {"disable": not progress})):
        img = Image.open(Path(images_dir) / im["file_name"]).convert("L")
        W, H = img.size
        anns = boxes_by_image.get(im["id"], [])
        for a in anns:
            label = FLIR_CATEGORY_TO_LABEL.get(a["category_id"])
            x, y, w, h = a["bbox"]
            if label is None or a.get("iscrowd", 0) or min(w, h) < min_side:
                continue
            patches.append(_crop(img, *_square(x, y, w, h, pad), size))
            labels.append(label)
        all_boxes = [a["bbox"] for a in anns]
        for _ in range(backgrounds_per_image):
            for _ in range(tries):
                side = float(rng.uniform(lo_side, min(hi_side, W, H)))
                x0, y0 = rng.uniform(0, W - side), rng.uniform(0, H - side)
                if not _overlaps(x0, y0, x0 + side, y0 + side, all_boxes):
                    patches.append(_crop(img, x0 + side / 2, y0 + side / 2, side, size))
                    labels.append(BACKGROUND)
                    break
    labels_np = np.asarray(labels, dtype=np.int64)
    keep = []
    for c in range(len(PATCH_CLASSES)):
        idx = np.flatnonzero(labels_np == c)
        if max_per_class is not None and len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        keep.append(idx)
    keep = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    if len(keep) == 0:
        raise ValueError(f"no patches could be cut from {ann_path}")
    arr = np.stack([patches[i] for i in keep]).astype(np.float32) / 255.0
    x = torch.from_numpy(arr)[:, None].expand(-1, 3, -1, -1).contiguous()
    return PatchSet(x, torch.from_numpy(labels_np[keep]))


# --------------------------------------------------------------------------- model
class SmallResNet(nn.Module):
    """ResNet-18 topology for small inputs: 3x3 stride-1 stem, no max-pool, widths w, 2w, 4w, 8w.

    Attribute names follow torchvision's ResNet (conv1, bn1, layer1..4, fc) and the blocks are
    torchvision `BasicBlock`s, so `helpers.dfmpc.compensate` applies unchanged.
    """

    def __init__(self, num_classes: int, width: int = 16, layers=(2, 2, 2, 2), in_channels: int = 3):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(2 * width, layers[1], 2)
        self.layer3 = self._make_layer(4 * width, layers[2], 2)
        self.layer4 = self._make_layer(8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        mods = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        mods += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_classifier(num_classes: int = len(PATCH_CLASSES), width: int = 16, layers=(2, 2, 2, 2)) -> SmallResNet:
    """Narrow ResNet-18 (BasicBlock [2, 2, 2, 2], BatchNorm) for 32-64 px patches; see `SmallResNet`."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return SmallResNet(num_classes, width, layers)


# --------------------------------------------------------------------------- training / evaluation
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and +-4 px translation (edge-replicated border), per sample."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    p = 4
    xp = nn.functional.pad(x, (p, p, p, p), mode="replicate")
    dx = torch.randint(0, 2 * p + 1, (x.shape[0],), generator=g)
    dy = torch.randint(0, 2 * p + 1, (x.shape[0],), generator=g)
    S = x.shape[-1]
    return torch.stack([xp[i, :, dy[i]:dy[i] + S, dx[i]:dx[i] + S] for i in range(x.shape[0])])


def train_classifier(model: nn.Module, train_set: Dataset, epochs: int = 5, lr: float = 3e-3, seed: int = 0,
                     batch_size: int = 64, weight_decay: float = 5e-4, augment: bool = True,
                     max_steps: int | None = None, progress: bool | None = None) -> dict:
    """AdamW + per-step cosine decay to 0, cross-entropy, deterministic by `seed`. Trains IN PLACE.

    Returns {"losses": per-step loss list, "epoch_loss": mean loss per epoch, "seconds": wall time}.
    `max_steps` stops early (tests).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(train_set) > batch_size)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    losses, epoch_loss, step = [], [], 0
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc="train classifier", **({} if progress is None else {"disable": not progress}))
    for _ in range(epochs):
        run = []
        for x, y in loader:
            if step >= total:
                break
            if augment:
                x = _augment(x, g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            run.append(losses[-1])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{run[-1]:.3f}")
        if run:
            epoch_loss.append(sum(run) / len(run))
    bar.close()
    model.eval()
    return {"losses": losses, "epoch_loss": epoch_loss, "seconds": time.perf_counter() - t0}


def default_device() -> torch.device:
    """CUDA when present, else the CPU (the paper profile's ImageNet models; the tiny task stays on the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, batch_size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) on the model's device, in eval mode (its train/eval state is restored)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size, num_workers=num_workers):
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(y)
    model.train(was)
    return torch.cat(preds), torch.cat(labels)


def top1(model: nn.Module, val_set: Dataset, batch_size: int = 256, num_workers: int = 0) -> float:
    """Top-1 accuracy in [0, 1] (on the model's device)."""
    preds, labels = predict(model, val_set, batch_size, num_workers)
    return float((preds == labels).float().mean())


@torch.no_grad()
def forward_all(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> None:
    """Push `images` through the model (eval mode, on its device), e.g. to feed forward hooks."""
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size].to(device))


def calibration_images(data: Dataset, n: int, seed: int = 0, stack: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """`n` images of `data` (all if it has fewer) picked by a seeded permutation, for the data-fit
    diagnostic: one tensor, or a list when `stack=False` (detection images may differ in size)."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    images = [data[int(i)][0] for i in idx]
    return torch.stack(images) if stack else images


# --------------------------------------------------------------------------- tasks
@dataclass
class ClassifierTask:
    """A classifier to quantize, its validation set and a few calibration images (data-fit diagnostic only)."""
    name: str
    model: nn.Module
    val_set: Dataset
    calibration: torch.Tensor
    info: dict = field(default_factory=dict)  # stable facts to print and store (counts, training loss)
    num_workers: int = 0
    device: str = "cpu"  # the tiny task stays on the CPU, whose results the committed notebook shows

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """{"top1": accuracy in [0, 1]} on `val_set`, with the model moved to `device`."""
        return {"top1": top1(model.to(self.device), self.val_set, num_workers=self.num_workers)}

    def calibrate(self, model: nn.Module) -> None:
        forward_all(model, self.calibration)


def thermal_patch_task(data_root: str | Path, weights_path: str | Path, size: int = 48, max_per_class: int = 300,
                       val_per_class: int | None = 150, width: int = 16, epochs: int = 6, lr: float = 3e-3,
                       seed: int = 0, n_calibration: int = 256, progress: bool | None = None) -> ClassifierTask:
    """The tiny-profile classifier: patches of the FLIR-layout train split (seed `seed`, `max_per_class`)
    and val split (seed + 1, `val_per_class`), and a `SmallResNet` (initialised and trained with
    `seed`) trained on them once: its weights go to `weights_path` and its per-epoch loss to the same
    name with `.json`; both are loaded, not retrained, when they exist. `info` holds the patch counts
    and the per-epoch mean training loss. Cutting the patches takes seconds and shows no progress bar
    (a notebook would keep its widget as output); `progress` applies to the training bar."""
    train_set = build_patch_set(data_root, "train", size, seed, max_per_class, progress=False)
    val_set = build_patch_set(data_root, "val", size, seed + 1, val_per_class, progress=False)
    torch.manual_seed(seed)  # the initial weights
    model = build_classifier(len(PATCH_CLASSES), width)
    path = resolve_path(weights_path)
    log = path.with_suffix(".json")
    if path.exists() and log.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        history = train_classifier(model, train_set, epochs, lr, seed, progress=progress)
        atomic_write_json(log, {"epoch_loss": history["epoch_loss"]})
        atomic_torch_save(path, model.state_dict())
    info = {"patches_train": train_set.counts(), "patches_val": val_set.counts(),
            "epoch_loss": json.loads(log.read_text())["epoch_loss"]}
    return ClassifierTask("thermal_patches", model.eval(), val_set, calibration_images(train_set, n_calibration, seed), info)


IMAGENET_ARCHS = ("resnet18", "resnet50")


def imagenet_classifier(arch: str) -> nn.Module:
    """torchvision's ImageNet ResNet (IMAGENET1K_V1) from the local torch hub cache; never downloads.

    The paper's weights came from pytorchcv, whose ResNet-18 is stronger (71.47 vs 69.76 top-1), so
    expect small differences from its Table 3.
    """
    import torchvision
    if arch not in IMAGENET_ARCHS:
        raise ValueError(f"arch must be one of {IMAGENET_ARCHS}, got {arch!r}")
    weights = torchvision.models.get_weight(f"{'ResNet18' if arch == 'resnet18' else 'ResNet50'}_Weights.IMAGENET1K_V1")
    path = cached_weights(weights, f"ImageNet {arch}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def imagenet_val_set(root: str | Path, limit: int = 0, seed: int = 0) -> Dataset:
    """The ILSVRC2012 validation images as an ImageFolder (1000 WordNet-id folders, sorted = torchvision's
    class order), resized to 256 and centre-cropped to 224, normalised. `limit` > 0 keeps that many
    images picked by a seeded permutation (0: all 50,000)."""
    from torchvision import datasets, transforms
    path = resolve_path(root)
    folders = sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    if len(folders) != 1000 or not all(f.startswith("n") for f in folders):
        raise DatasetError(
            f"ImageNet validation folder not found at {path} (expected 1000 class folders named by WordNet id, "
            f"found {len(folders)}).\nDownload ILSVRC2012_img_val.tar (6.3 GB) and the devkit from "
            f"https://image-net.org/download-images.php (account needed), extract the 50,000 JPEGs and sort them "
            f"into n01440764/ ... n15075141/ (e.g. with the widely used valprep.sh), then pass that folder as IMAGENET_VAL.")
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = datasets.ImageFolder(str(path), tf)
    if limit:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
        data = torch.utils.data.Subset(data, sorted(idx.tolist()))
    return data


def imagenet_task(arch: str, val_root: str | Path, limit: int = 0, seed: int = 0, n_calibration: int = 256,
                  num_workers: int = 8) -> ClassifierTask:
    """The paper-profile classifier: torchvision ImageNet weights and the ImageNet val folder, both checked
    before anything runs (one error names everything missing). Calibration images for the data-fit
    diagnostic come from the val set."""
    problems, missing_data = [], False
    try:
        model = imagenet_classifier(arch)
    except WeightsMissing as err:
        problems.append(str(err))
    try:
        val_set = imagenet_val_set(val_root, limit, seed)
    except DatasetError as err:
        problems.append(str(err))
        missing_data = True
    if problems:
        raise (DatasetError if missing_data else WeightsMissing)("\n\n".join(problems))
    device = str(default_device())
    return ClassifierTask(arch, model.to(device), val_set, calibration_images(val_set, n_calibration, seed),
                          {"val_images": len(val_set)}, num_workers, device)
