"""Infrared small-target segmentation at tiny scale (companion paper 4, SPMix-Q; research page spmixq.md).

- A synthetic SIRST-like set: warm targets of 1-9 px (Gaussian, sigma = d/4) in cluttered thermal
  backgrounds (1/f clouds, buildings, a sea horizon with glint, sensor noise) plus elongated warm
  distractors, written in the layout of the public sets as DNANet reads them
  (`images/<name>.png`, `masks/<name>.png`, `50_50/train.txt`, `50_50/test.txt`), so the same
  loader reads NUAA-SIRST or IRSTD-1k once downloaded.
- A small U-Net-like encoder-decoder with BatchNorm (res_UNet layout: a residual block per level,
  max-pool down, bilinear up + concat), blocks named stem, enc0..enc3, dec2..dec0, head.
- Training: Adam + cosine, SoftIoU + BCE (DNANet's loss plus pixel BCE), flips; resumable.
- Metrics as the public SIRST code computes them (DNANet `model/metric.py`, open-acm
  `metric/samplewise.py`), at logit > 0 (sigmoid > 0.5): IoU (dataset-level), nIoU (per image,
  every image counted, an empty union scores 0), Pd / Fa (8-connected components, a GT component
  matched by the first remaining predicted component whose centroid lies < 3 px away).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from helpers import runs

SPLIT_DIR = "50_50"
DOWNLOADS = ("NUAA-SIRST: https://github.com/YimianDai/sirst (DNANet's copy: "
             "https://github.com/YeRen123455/Infrared-Small-Target-Detection, dataset/NUAA-SIRST); "
             "IRSTD-1k: https://github.com/RuiZhang97/ISNet")
PD_DISTANCE = 3.0  # px, DNANet / BasicIRSTD PD_FA
NIOU_EPS = float(np.spacing(1))  # open-acm's np.spacing(1)


class SirstError(ValueError):
    pass


# --------------------------------------------------------------------------- synthetic set
def _cloud(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """A 1/f^beta random field on [0, 1] (spectral synthesis)."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f ** (beta / 2)
    spectrum[0, 0] = 0.0
    field = np.fft.ifft2(spectrum).real
    return (field - field.min()) / (np.ptp(field) + 1e-12)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clouds plus one clutter type: buildings, a sea horizon with glint, or plain sky."""
    img = 0.3 + 0.3 * _cloud(rng, size, rng.uniform(1.8, 3.0))
    kind = rng.choice(["sky", "city", "sea"])
    if kind == "city":
        x = 0
        while x < size:
            w, h = rng.integers(6, 16), rng.integers(size // 6, size // 2)
            img[size - h:, x:x + w] = rng.uniform(0.25, 0.65)
            x += w + rng.integers(0, 4)
    elif kind == "sea":
        horizon = rng.integers(size // 3, 2 * size // 3)
        img[horizon:] = 0.2 + 0.15 * _cloud(rng, size, 1.5)[horizon:]
        n = rng.integers(5, 20)  # glint: short bright horizontal streaks, 1 px high
        for y, x0, length in zip(rng.integers(horizon, size, n), rng.integers(0, size, n), rng.integers(2, 6, n)):
            img[y, x0:x0 + length] += rng.uniform(0.15, 0.35)
    return img


def _blob(size: int, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))


def synthetic_image(rng: np.random.Generator, size: int = 64, max_targets: int = 3,
                    empty_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], boolean mask) of one SIRST-like frame."""
    img = _background(rng, size)
    for _ in range(rng.integers(0, 3)):  # elongated warm distractors (the false alarms to avoid)
        cy, cx = rng.uniform(4, size - 4, 2)
        long, short = rng.uniform(3, 6), rng.uniform(0.8, 1.5)
        sy, sx = (long, short) if rng.random() < 0.5 else (short, long)
        img += rng.uniform(0.15, 0.3) * _blob(size, cy, cx, sy, sx)
    mask = np.zeros((size, size), bool)
    n_targets = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_targets + 1))
    noise = rng.uniform(0.01, 0.03)
    for _ in range(n_targets):
        d = float(np.exp(rng.uniform(0.0, math.log(9.0))))  # diameter 1-9 px, log-uniform
        cy, cx = rng.uniform(5, size - 5, 2)
        sigma = max(d / 4, 0.35)
        window = img[int(cy) - 4:int(cy) + 5, int(cx) - 4:int(cx) + 5]
        peak = rng.uniform(3.0, 8.0) * max(float(window.std()), noise)  # SCR 3-8 over the local clutter
        bump = peak * _blob(size, cy, cx, sigma, sigma)
        img += bump
        mask |= bump > 0.5 * peak
        mask[int(round(cy)), int(round(cx))] = True  # at least one pixel
    img += rng.normal(0.0, noise, img.shape)
    return np.clip(img, 0.0, 1.0), mask


def write_synthetic(root: str | Path, n_train: int = 256, n_test: int = 128, size: int = 64, seed: int = 0) -> Path:
    """Write the synthetic set in the public SIRST layout; returns root. Existing complete sets are kept."""
    root = Path(root)
    for name, value in (("n_train", n_train), ("n_test", n_test), ("size", size)):
        if not isinstance(value, int) or value < 1:
            raise SirstError(f"{name} must be a positive integer, got {value!r}")
    if size < 16:
        raise SirstError(f"size must be at least 16 px, got {size}")
    splits = {"train": [f"syn_{i:05d}" for i in range(n_train)], "test": [f"syn_{n_train + i:05d}" for i in range(n_test)]}
    if all((root / SPLIT_DIR / f"{s}.txt").exists() for s in splits) and \
            sum(1 for _ in (root / "images").glob("*.png")) == n_train + n_test:
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / SPLIT_DIR).mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])  # a fixed seed per split
        for name in names:
            img, mask = synthetic_image(rng, size)
            Image.fromarray((img * 255).round().astype(np.uint8)).save(root / "images" / f"{name}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
        (root / SPLIT_DIR / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


# --------------------------------------------------------------------------- loader
class SirstSet(torch.utils.data.Dataset):
    """A SIRST-layout split: images/<name>.png, masks/<name>.png (or NUAA's <name>_pixels0.png), <split_dir>/<split>.txt.

    Items are (1xHxW float image in [0, 1], 1xHxW float mask in {0, 1}); `size` resizes both
    (bilinear / nearest), as the public sets have frames of several sizes.
    """

    def __init__(self, root: str | Path, split: str = "train", split_dir: str = SPLIT_DIR, size: int | None = None,
                 limit: int | None = None):
        self.root = Path(root)
        split_file = self.root / split_dir / f"{split}.txt"
        if not (self.root / "images").is_dir() or not split_file.exists():
            raise FileNotFoundError(
                f"no SIRST-layout set at {self.root} (needs images/, masks/ and {split_dir}/{split}.txt). Write the "
                f"synthetic one with helpers.sirst.write_synthetic({str(root)!r}) or download a public set "
                f"({DOWNLOADS}) and point DATA_ROOT at it")
        self.names = [n.strip() for n in split_file.read_text().split() if n.strip()][:limit]
        if not self.names:
            raise SirstError(f"{split_file} lists no images")
        self.size = size

    def __len__(self) -> int:
        return len(self.names)

    def _mask_path(self, name: str) -> Path:
        for candidate in (f"{name}.png", f"{name}_pixels0.png"):
            if (self.root / "masks" / candidate).exists():
                return self.root / "masks" / candidate
        raise FileNotFoundError(f"no mask for {name} in {self.root / 'masks'}")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.names[i]
        img = Image.open(next((self.root / "images").glob(f"{name}.*"))).convert("L")
        mask = Image.open(self._mask_path(name)).convert("L")
        if self.size:
            img, mask = img.resize((self.size, self.size), Image.BILINEAR), mask.resize((self.size, self.size), Image.NEAREST)
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0)[None]
        y = torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))[None]
        return x, y


def stack(dataset: SirstSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as two tensors (N, 1, H, W): the tiny sets fit in memory."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack(ys)


# --------------------------------------------------------------------------- model
class ResBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + (1x1 conv-BN) shortcut, then ReLU (res_UNet's residual block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class TinyUNet(nn.Module):
    """Encoder enc0..enc3 (enc3 = bottleneck), decoder dec2..dec0, stem conv and 1x1 head; input 1xHxW in [0, 1]."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64), mean: float = 0.4, std: float = 0.15):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.levels = len(widths)
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.enc = nn.ModuleList(ResBlock(widths[max(i - 1, 0)], w) for i, w in enumerate(widths))
        self.dec = nn.ModuleList(ResBlock(widths[i] + widths[i + 1], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], 1, 1)
        nn.init.constant_(self.head.bias, -3.0)  # a rare-foreground prior, so BCE does not first drive every logit down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem((x - self.mean) / self.std)
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(self.levels - 1)):
            x = F.interpolate(x, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.dec[i](torch.cat([x, skips[i]], 1))
        return self.head(x)


def block_names(model: TinyUNet) -> dict[str, tuple[str, int, str]]:
    """Block name -> (module prefix, level, side) in forward order (levels 0 = full resolution)."""
    out = {"stem": ("stem", 0, "stem")}
    out.update({f"enc{i}": (f"enc.{i}", i, "encoder") for i in range(model.levels)})
    out.update({f"dec{i}": (f"dec.{i}", i, "decoder") for i in reversed(range(model.levels - 1))})
    out["head"] = ("head", 0, "head")
    return out


def blocks(model: nn.Module) -> dict[str, list[str]]:
    """Block name -> its conv layer names, in forward order."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return {name: [c for c in convs if c == prefix or c.startswith(prefix + ".")]
            for name, (prefix, _, _) in block_names(model).items()}


# --------------------------------------------------------------------------- training
def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """DNANet's SoftIoULoss: 1 - (sum p t + 1) / (sum p + sum t - sum p t + 1), batch-summed."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1.0 - (inter + smooth) / (p.sum() + target.sum() - inter + smooth)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return soft_iou_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def _flip(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.rand((), generator=g) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand((), generator=g) < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    return x, y


def fit(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, checkpoint: Path, log_path: Path,
        epochs: int = 6, batch_size: int = 16, lr: float = 3e-3, seed: int = 0, train_bn: bool = True,
        teacher: nn.Module | None = None, progress: bool | None = None) -> list[dict]:
    """Train `model` (float or a QAT student) with Adam + cosine on SoftIoU + BCE (+ BCE to a teacher's
    sigmoid map when given), random flips. Each epoch reseeds its shuffle from (seed, epoch), writes
    `checkpoint` atomically and appends to `log_path`; a rerun resumes after the last finished epoch.
    `train_bn=False` keeps BN in eval mode (QAT from a calibrated model)."""
    if not isinstance(epochs, int) or epochs < 1 or batch_size < 1:
        raise SirstError(f"epochs and batch_size must be positive integers, got {epochs}, {batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = math.ceil(len(images) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps, eta_min=lr * 0.01)
    start, checkpoint, log_path = 0, Path(checkpoint), Path(log_path)
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        start = state["epoch"] + 1
    log = [r for r in runs.read_jsonl(log_path) if r["epoch"] < start]
    runs.write_jsonl(log_path, log)
    kwargs = {} if progress is None else {"disable": not progress}
    for epoch in tqdm(range(start, epochs), desc="train", initial=start, total=epochs, leave=False, **kwargs):
        model.train(train_bn)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=g)
        total = 0.0
        for k in range(steps):
            idx = order[k * batch_size:(k + 1) * batch_size]
            x, y = _flip(images[idx], masks[idx], g)
            logits = model(x)
            loss = seg_loss(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = torch.sigmoid(teacher(x))
                loss = loss + F.binary_cross_entropy_with_logits(logits, soft)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {float(loss)} at epoch {epoch} step {k}; lower lr ({lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) / steps
        row = {"epoch": epoch, "loss": total, "lr": optimizer.param_groups[0]["lr"]}
        runs.atomic_torch_save(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "lr_scheduler": scheduler.state_dict(), "epoch": epoch})
        runs.append_jsonl(log_path, row)
        log.append(row)
    model.eval()
    return log


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------- metrics
def _components(binary: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """Areas and centroids (row, col) of 8-connected components, in raster label order (skimage.measure.label,
    connectivity=2, and scipy.ndimage.label number components the same way)."""
    labels, n = ndimage.label(binary, structure=np.ones((3, 3), int))
    if n == 0:
        return [], []
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index).astype(int).tolist()
    centroids = [np.asarray(c) for c in ndimage.center_of_mass(np.ones_like(labels, float), labels, index)]
    return areas, centroids


def pd_fa_counts(pred: np.ndarray, gt: np.ndarray, compat: bool = False) -> dict:
    """One image's PD_FA update: matched GT components, GT components, unmatched predicted pixels.

    compat=True reproduces the public code's quirk: unmatched components are found by area value,
    so an unmatched blob with the same area as a matched one is not counted.
    """
    pred_areas, pred_cent = _components(np.asarray(pred, bool))
    _, gt_cent = _components(np.asarray(gt, bool))
    remaining = list(range(len(pred_areas)))
    matched = []
    for g in gt_cent:
        for j in remaining:
            if np.linalg.norm(g - pred_cent[j]) < PD_DISTANCE:
                matched.append(j)
                remaining.remove(j)
                break
    if compat:
        matched_areas = [pred_areas[j] for j in matched]
        false_pixels = sum(a for a in pred_areas if a not in matched_areas)
    else:
        false_pixels = sum(pred_areas[j] for j in remaining)
    return {"matched": len(matched), "targets": len(gt_cent), "false_pixels": int(false_pixels)}


def segmentation_metrics(logits: torch.Tensor, masks: torch.Tensor, compat: bool = False) -> dict:
    """IoU, nIoU, Pd, Fa over a set of (N, 1, H, W) logits and masks, binarised at logit > 0 (sigmoid > 0.5).

    IoU = sum inter / sum union over all pixels (DNANet's "mIoU"); nIoU = mean over all images of
    inter / (union + eps) (open-acm, an empty union scores 0); Pd = matched / GT components;
    Fa = unmatched predicted pixels / all pixels. Returned as fractions (print IoU, Pd x1e2 and Fa x1e6).
    """
    if logits.shape != masks.shape:
        raise SirstError(f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} differ in shape")
    pred = (logits > 0).cpu().numpy().reshape(len(logits), *logits.shape[-2:])
    gt = (masks > 0.5).cpu().numpy().reshape(pred.shape)
    inter = (pred & gt).reshape(len(pred), -1).sum(1)
    union = (pred | gt).reshape(len(pred), -1).sum(1)
    counts = [pd_fa_counts(p, g, compat) for p, g in zip(pred, gt)]
    targets = sum(c["targets"] for c in counts)
    return {"IoU": float(inter.sum() / max(union.sum(), 1)),
            "nIoU": float(np.mean(inter / (union + NIOU_EPS))),
            "Pd": float(sum(c["matched"] for c in counts) / targets) if targets else float("nan"),
            "Fa": float(sum(c["false_pixels"] for c in counts) / pred.size),
            "images": int(len(pred)), "targets": int(targets)}


# --------------------------------------------------------------------------- data-free images and scores
def distill_images(model: nn.Module, num_images: int = 32, size: int = 64, iterations: int = 100, lr: float = 0.1,
                   seed: int = 0, progress: bool | None = None) -> torch.Tensor:
    """Images (N, 1, size, size) in [0, 1] distilled from the segmenter's BN statistics (notebook 03's method:
    helpers.distill.BNStatisticsLoss, mean-only loss, Adam lr 0.1, pixels clamped to [0, 1] after each step).
    The variable lives in the model's normalised space (x = mean + std * z), so z starts as N(0, 1)."""
    from helpers import distill
    if not isinstance(num_images, int) or num_images < 1 or not isinstance(iterations, int) or iterations < 1:
        raise SirstError(f"num_images and iterations must be positive integers, got {num_images}, {iterations}")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, 1, size, size, generator=g).requires_grad_(True)
    mean, std = float(model.mean), float(model.std)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    model.eval()
    optimizer = torch.optim.Adam([z], lr=lr)
    kwargs = {} if progress is None else {"disable": not progress}
    try:
        with distill.BNStatisticsLoss(model, "mean", input_stats=False) as criterion:
            for it in tqdm(range(iterations), desc="distill", leave=False, **kwargs):
                total, _, _ = criterion(mean + std * z)
                if not torch.isfinite(total):
                    raise FloatingPointError(f"distillation loss is {float(total)} at iteration {it}; lower lr ({lr})")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                with torch.no_grad():
                    z.clamp_(-mean / std, (1 - mean) / std)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return (mean + std * z.detach()).clamp(0, 1)


def bernoulli_sym_kl(reference_logits: torch.Tensor, logits: torch.Tensor, top: float = 0.01) -> float:
    """Label-free discrepancy: per image, the symmetric KL between Bernoulli(sigmoid) maps over the `top`
    fraction of pixels with the highest reference logits (where targets would be), averaged over images."""
    ref, out = reference_logits.flatten(1), logits.flatten(1)
    k = max(1, int(round(top * ref.shape[1])))
    idx = ref.topk(k, dim=1).indices
    p, q = torch.sigmoid(ref.gather(1, idx)).clamp(1e-6, 1 - 1e-6), torch.sigmoid(out.gather(1, idx)).clamp(1e-6, 1 - 1e-6)
    kl_pq = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    kl_qp = q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()
    return float((kl_pq + kl_qp).mean())


def evaluator(images: torch.Tensor, masks: torch.Tensor | None, reference_logits: torch.Tensor):
    """evaluate(qmodel) -> metrics on `images`: IoU/nIoU/Pd/Fa when `masks` are given, always the label-free
    discrepancy to the float model (`sym_kl`) and the output SQNR in dB."""
    from helpers.mixed_precision import sqnr_db

    def evaluate(qmodel: nn.Module) -> dict:
        logits = predict(qmodel, images)
        out = {"sym_kl": bernoulli_sym_kl(reference_logits, logits), "sqnr_db": sqnr_db(reference_logits, logits)}
        if masks is not None:
            out.update({k: v for k, v in segmentation_metrics(logits, masks).items() if k in ("IoU", "nIoU", "Pd", "Fa")})
        return out
    return evaluate


# --------------------------------------------------------------------------- notebook 08's experiment (resumable)
class Experiment:
    """Notebook 08's segmentation study on one run folder. Every step stores its rows (JSON / JSONL) and, when
    they are complete, returns them without touching the model or the data: a finished run is read back,
    never recomputed. The model, data and distilled images are built lazily on the first step that needs them."""

    def __init__(self, run, data_root: str, n_train: int, n_test: int, size: int, seed: int, epochs: int, lr: float,
                 distill_images: int, distill_iterations: int, calib_images: int, symmetric: bool):
        self.run, self.data_root, self.n_train, self.n_test, self.size = run, data_root, n_train, n_test, size
        self.seed, self.epochs, self.lr, self.symmetric = seed, epochs, lr, symmetric
        self.n_distill, self.distill_iterations, self.calib_images = distill_images, distill_iterations, calib_images
        self._cache: dict = {}

    # lazily built inputs
    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def data(self) -> dict:
        def build():
            root = Path(runs.resolve_path(self.data_root))
            if not (root / SPLIT_DIR).exists() and root.name.startswith("sirst_synthetic"):
                write_synthetic(root, self.n_train, self.n_test, self.size, self.seed)
            (tx, ty), (vx, vy) = stack(SirstSet(root, "train", size=self.size)), stack(SirstSet(root, "test", size=self.size))
            return {"train": (tx, ty), "test": (vx, vy)}
        return self._get("data", build)

    @property
    def model(self) -> TinyUNet:
        def build():
            torch.manual_seed(self.seed)
            model = TinyUNet()
            fit(model, *self.data["train"], self.run.path("segmenter_train.pt"), self.run.path("train_log.jsonl"),
                epochs=self.epochs, lr=self.lr, seed=self.seed)
            return model.eval()
        return self._get("model", build)

    @property
    def distilled(self) -> torch.Tensor:
        def build():
            path = self.run.path("distilled.pt")
            if path.exists():
                return torch.load(path, weights_only=True)
            images = distill_images(self.model, self.n_distill, self.size, self.distill_iterations, seed=self.seed)
            runs.atomic_torch_save(path, images)
            return images
        return self._get("distilled", build)

    def reference(self, source: str) -> torch.Tensor:
        return self._get(("ref", source), lambda: predict(self.model, self.images(source)))

    def images(self, source: str) -> torch.Tensor:
        return self.data["test"][0] if source == "real" else self.distilled

    def evaluator(self, source: str):
        return evaluator(self.images(source), self.data["test"][1] if source == "real" else None, self.reference(source))

    def calibration(self, source: str) -> list[torch.Tensor]:
        """Real: the first training images; distilled: the distilled set (the zero-shot setting)."""
        return [self.data["train"][0][:self.calib_images] if source == "real" else self.distilled]

    @property
    def blocks(self) -> dict[str, list[str]]:
        return blocks(TinyUNet())

    @property
    def levels(self) -> dict[str, tuple[int, str]]:
        return {n: (lv, side) for n, (_, lv, side) in block_names(TinyUNet()).items() if side in ("encoder", "decoder")}

    @property
    def fixed(self) -> dict:
        return {"stem": (8, 8), "head": (8, 8)}

    @property
    def stats(self) -> dict:
        from helpers import mixed_precision as mp
        return self._get("stats", lambda: mp.block_stats(TinyUNet().eval(), self.blocks, torch.zeros(1, 1, self.size, self.size)))

    # steps
    def float_metrics(self) -> dict:
        path = self.run.path("float.json")
        if path.exists():
            import json
            return json.loads(path.read_text())
        x, y = self.data["test"]
        out = {**segmentation_metrics(self.reference("real"), y), "params": sum(p.numel() for p in self.model.parameters()),
               "train_loss": runs.read_jsonl(self.run.path("train_log.jsonl"))[-1]["loss"], "test_images": len(x)}
        runs.atomic_write_json(path, out)
        return out

    def sensitivity(self, source: str, bits, modes) -> list[dict]:
        from helpers import mixed_precision as mp
        path = self.run.path(f"sensitivity_{source}.jsonl")
        expected = mp.sensitivity_settings(self.blocks, None, bits, modes)
        rows = runs.read_jsonl(path) if path.exists() else []
        if {(r["block"], r["mode"], r["bits"]) for r in rows} >= set(expected):
            return rows
        return mp.block_sensitivity(self.model, self.blocks, self.evaluator(source), self.calibration(source), bits, modes,
                                    done=rows, on_row=lambda r: runs.append_jsonl(path, r), symmetric=self.symmetric)

    def hessian_traces(self, samples: int = 8, batch: int = 16) -> dict[str, float]:
        from helpers import mixed_precision as mp
        path = self.run.path("hessian_traces.json")
        if path.exists():
            import json
            return json.loads(path.read_text())
        x, y = (t[:batch] for t in self.data["train"])
        traces = mp.hutchinson_trace(self.model, lambda m: seg_loss(m(x), y), self.blocks, samples, self.seed)
        runs.atomic_write_json(path, traces)
        return traces

    def policy_rows(self, budgets, tables: dict, omega: dict, qat_budgets=(), qat_epochs: int = 2, qat_lr: float = 1e-3,
                    random_seeds=(0, 1)) -> list[dict]:
        """One row per (budget, policy, stage): PTQ (calibrated on real training images) at every budget, then a
        short STE QAT from that PTQ model at the budgets in `qat_budgets`."""
        from helpers import mixed_precision as mp
        path = self.run.path("policies.jsonl")
        rows = runs.read_jsonl(path) if path.exists() else []
        done = {(tuple(r["budget"]), r["policy"], r["stage"]) for r in rows}
        for budget in budgets:
            allocs = mp.policy_allocations(self.levels, self.stats, budget[0], budget[1], tables, omega, self.fixed,
                                           random_seeds)
            for policy, alloc in allocs.items():
                stages = ["ptq"] + (["qat"] if list(budget) in [list(b) for b in qat_budgets] else [])
                for stage in [s for s in stages if (tuple(budget), policy, s) not in done]:
                    q = mp.quantize_allocation(self.model, self.blocks, alloc, symmetric=self.symmetric)
                    mp.calibrate_if_needed(q, self.calibration("real"))
                    if stage == "qat":
                        student = mp.qat_student(self.model, q)
                        tag = f"{budget[0]}_{budget[1]}_{policy}"
                        fit(student, *self.data["train"], self.run.path(f"qat_{tag}.pt"), self.run.path(f"qat_{tag}.jsonl"),
                            epochs=qat_epochs, lr=qat_lr, seed=self.seed, train_bn=False, teacher=self.model, progress=False)
                        q = mp.to_quantized(student)
                    row = {"budget": list(budget), "policy": policy, "stage": stage,
                           **mp.allocation_row(q, self.stats, self.levels, alloc), **self.evaluator("real")(q)}
                    runs.append_jsonl(path, row)
                    rows.append(row)
        return rows


def format_metrics(m: dict) -> str:
    """IoU, nIoU, Pd in x1e-2 and Fa in x1e-6, as the SIRST papers print them."""
    return (f"IoU {100 * m['IoU']:.2f} | nIoU {100 * m['nIoU']:.2f} | Pd {100 * m['Pd']:.2f} | Fa {1e6 * m['Fa']:.1f} (x1e-2, Fa x1e-6)")
