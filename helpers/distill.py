"""ZeroQ-style data distillation from BatchNorm statistics (paper section 3.2, Formula 2).

Images start from N(0, 1) in the detector's *normalised* input space (the space the first conv
sees, after `GeneralizedRCNNTransform`) at the detector's input size, and are optimised with Adam
so that, at every layer holding running BN statistics (`nn.BatchNorm2d` and torchvision's
`FrozenBatchNorm2d`), the per-image, per-channel mean and standard deviation of the layer's input
match the stored `running_mean` and `sqrt(running_var + eps)`.

Loss, as in ZeroQ's `getDistilData` (amirgholami/ZeroQ, classification/distill_data.py):
for each BN layer i the term ||mu_i - mu~_i||^2 summed over channels and averaged over the images
of the batch (and the same for sigma); term 0 matches the input itself to mean 0 / std 1 per
channel. The paper's Formula 2 writes (1/L) sum_{i=0..L}: L BN layers plus that input term, which
is what `loss` reports ("mean": mean terms only, the paper's choice; "mean+std": both). Statistics
are per image, so with eval-mode BN and Adam (elementwise) a batch of B images behaves like B
independent distillations, as the paper's "repeated the distillation process 128 times".

Speed: only the backbone body runs, parameters are frozen, the forward is cut off at the last BN
layer (nothing after it feeds the loss), and each eval-mode BN layer computes its output and its
input's statistics in one autograd node whose backward adds both gradients in one pass, so one
iteration costs about one forward + backward of the body on that batch.

Distilled pixels drift outside what a [0, 1] image can produce; `clamp=True` projects them, after
every Adam step, onto the per-channel normalised pixel range [(0 - mean) / std, (1 - mean) / std]
taken from the model's transform (data-free: it uses only the normalisation constants).

To calibrate with the result, feed `result.images` (normalised) through
`helpers.quant.calibrate(q, result.images.split(8), normalized=True)`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from helpers import distributed
from helpers.runs import atomic_torch_save, atomic_write_json

LOSSES = ("mean", "mean+std")
STD_EPS = 1e-6  # ZeroQ adds this inside the square roots of both variances


class DistillationDiverged(FloatingPointError):
    pass


class _StopForward(Exception):
    """Raised at the last BN layer: the rest of the network does not affect the loss."""


def bn_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold running BN statistics (BatchNorm*, FrozenBatchNorm2d), by name, in module order."""
    return {name: m for name, m in module.named_modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor)}


def distill_target(model: nn.Module) -> nn.Module:
    """The part that is run: a detector's backbone body (where all BN layers of torchvision's RetinaNets are), else the model."""
    body = getattr(getattr(model, "backbone", None), "body", None)
    return body if isinstance(body, nn.Module) else model


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) a torchvision detector feeds its backbone for a landscape frame: short side min_size, long side max_size."""
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        raise ValueError("the model has no detector transform; pass image_size=(H, W)")
    return int(transform.min_size[-1]), int(transform.max_size)


def pixel_range(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds of normalised images whose pixels lie in [0, 1]: ((0-mean)/std, (1-mean)/std)."""
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "image_mean"):
        raise ValueError("the model has no detector transform with image_mean/image_std")
    mean = torch.as_tensor(transform.image_mean, dtype=torch.float32)
    std = torch.as_tensor(transform.image_std, dtype=torch.float32)
    return (0 - mean) / std, (1 - mean) / std


def to_pixels(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Normalised images back to pixel space (x * std + mean, not clamped), e.g. for display."""
    transform = model.transform
    mean = torch.as_tensor(transform.image_mean, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.as_tensor(transform.image_std, dtype=images.dtype, device=images.device)[:, None, None]
    return images * std + mean


class _MeanSquare(torch.autograd.Function):
    """(mean, mean of squares) over the last dim with a one-pass backward (one addcmul).

    torch.var_mean's CPU forward and backward cost about 9x more here and made a mean+std
    iteration 1.25x a plain forward + backward; these two reductions keep it near 1x.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.save_for_backward(x)
        k = x.shape[-1]
        return x.mean(-1), torch.linalg.vector_norm(x, dim=-1).square() / k

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_square: torch.Tensor):
        (x,) = ctx.saved_tensors
        k = x.shape[-1]
        return torch.addcmul((grad_mean / k)[..., None], x, (grad_square * (2 / k))[..., None])


class _Mean(torch.autograd.Function):
    """Mean over the last dim whose backward hands autograd a broadcast view, not a full tensor.

    torch's MeanBackward materialises grad / K at the input's full size, one more pass over every
    BN input per iteration before autograd adds it to the gradient from the BN itself; the view
    lets that addition read the per-channel value directly (same numbers, about 5 % faster here).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.shape = x.shape
        return x.mean(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad / ctx.shape[-1])[..., None].expand(ctx.shape)


class _EvalBNWithMean(torch.autograd.Function):
    """Eval-mode BN, y = x * scale + shift per channel, that also returns the per-image channel means
    of its input, with a backward of one pass.

    Hooks that read the BN input leave autograd two gradients to add at that input (the BN's and the
    statistics'), one more pass over every BN input per iteration; here the sum is formed in the
    pass that scales the BN's gradient. `scale` and `shift` are constants of shape (1, C, 1, 1)
    (distillation freezes them). This runs once per BN layer and iteration, so it is kept to the
    fewest tensor operations: their fixed cost is a few per cent of a small model's iteration.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        ctx.scale, ctx.k = scale, x.shape[2] * x.shape[3]
        return torch.addcmul(shift, x, scale), x.mean((2, 3))

    @staticmethod
    def backward(ctx, grad_y, grad_mean):
        return torch.addcmul((grad_mean / ctx.k).view(*grad_mean.shape, 1, 1), grad_y, ctx.scale), None, None


class _EvalBNWithMoments(torch.autograd.Function):
    """`_EvalBNWithMean` that also returns the channel means of the input's squares (for mean+std)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        ctx.save_for_backward(x)
        ctx.scale, ctx.k = scale, x.shape[2] * x.shape[3]
        square = torch.linalg.vector_norm(x, dim=(2, 3)).square() / ctx.k
        return torch.addcmul(shift, x, scale), x.mean((2, 3)), square

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_square):
        (x,) = ctx.saved_tensors
        shape = (*grad_mean.shape, 1, 1)
        grad = torch.addcmul((grad_mean / ctx.k).view(shape), grad_y, ctx.scale)
        return grad.addcmul_(x, (grad_square * (2 / ctx.k)).view(shape)), None, None


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BN or FrozenBatchNorm2d, as their own forwards compute them."""
    with torch.no_grad():
        scale = 1 / torch.sqrt(bn.running_var + bn.eps)  # as ATen's CPU batch_norm, to the last bit
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -(bn.running_mean * scale)
        if bn.bias is not None:
            shift = bn.bias + shift
    return scale, shift


class BNStatisticsLoss:
    """Formula 2 on a module: every BN layer's input statistics are collected as the loss terms.

    Use as a context manager (the BN layers are restored on exit); call it with a normalised batch to
    get (total, mean_term, std_term), each already divided by the number of BN layers L. Inside the
    block, eval-mode BN layers on 4-D inputs run `_EvalBNWithMean` (`_EvalBNWithMoments` for mean+std;
    their affine parameters act as constants: no gradient reaches them); others keep their own
    forward and are read by the same terms.

    The layers' statistics are concatenated, in the order the forward met them, and every term is
    formed in one pass over that (batch, channels of all layers) tensor, instead of a dozen small
    operations per layer. Each element's chain of operations is unchanged, so the gradients reaching
    the images are those of per-layer sums to the bit (checked when this replaced them: the committed
    distillation runs came out identical); the loss values can differ in their last bits, as the
    sums run in another order.
    """

    def __init__(self, module: nn.Module, loss: str = "mean", input_stats: bool = True, stop_at_last: bool = True):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.module, self.loss, self.input_stats = module, loss, input_stats
        self.stop_at_last = stop_at_last  # False: the forward runs on (`run` returns its output, e.g. a detector's features)
        self.layers = bn_layers(module)
        if not self.layers:
            raise ValueError("the module has no BatchNorm layers with running statistics to distill from")
        self.seen: list[str] = []
        self._stats: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []  # (mean, mean square, pixels) per layer
        self._patched: list[nn.Module] = []
        self._affine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._targets: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @property
    def _squares(self) -> bool:
        return self.loss == "mean+std"

    def _forward(self, name: str, bn: nn.Module):
        own_forward = type(bn).forward.__get__(bn)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if name not in self.seen:
                self.seen.append(name)
            last = len(self.seen) == len(self.layers)
            if last or bn.training or x.dim() != 4 or not hasattr(bn, "eps"):
                self._stats.append(self._statistics(x))
                if last and self.stop_at_last:  # nothing after the last BN layer feeds the loss
                    raise _StopForward
                return own_forward(x)
            if self._squares:
                y, mean, square = _EvalBNWithMoments.apply(x, *self._affine[name])
            else:
                (y, mean), square = _EvalBNWithMean.apply(x, *self._affine[name]), None
            self._stats.append((mean, square, x.shape[2] * x.shape[3]))
            return y
        return forward

    def _statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        flat = x.flatten(2)
        if not self._squares:
            return _Mean.apply(flat), None, flat.shape[2]
        return (*_MeanSquare.apply(flat), flat.shape[2])

    def _targets_for(self, order: tuple[str, ...], channels: int, pixels: tuple[int, ...],
                     device: torch.device) -> tuple[torch.Tensor, ...]:
        """Concatenated (running means, target stds, unbiased-variance factors) in the forward's layer order."""
        key = (order, channels, pixels, device)
        if key not in self._targets:
            bns = [self.layers[n] for n in order]
            with torch.no_grad():
                means = [bn.running_mean.detach() for bn in bns]
                stds = [(bn.running_var.detach() + STD_EPS).sqrt() for bn in bns]
                if self.input_stats:
                    means.insert(0, torch.zeros(channels, device=device))
                    stds.insert(0, torch.ones(channels, device=device))
                # k / (k - 1) as torch.var's unbiased estimate in ZeroQ; float32, as a Python scalar is rounded
                factors = [torch.full((len(m),), k / max(k - 1, 1), dtype=torch.float32, device=device)
                           for m, k in zip(means, pixels)]
                self._targets[key] = (torch.cat(means), torch.cat(stds), torch.cat(factors))
        return self._targets[key]

    def __enter__(self) -> "BNStatisticsLoss":
        self._affine = {name: tuple(t.view(1, -1, 1, 1) for t in _scale_shift(bn))  # constants while distilling
                        for name, bn in self.layers.items()}
        self._targets = {}
        for name, bn in self.layers.items():
            bn.forward = self._forward(name, bn)  # an instance attribute shadows the class's forward
            self._patched.append(bn)
        return self

    def __exit__(self, *exc) -> None:
        for bn in self._patched:
            del bn.forward
        self._patched = []

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.run(images)[1]

    def run(self, images: torch.Tensor, forward=None) -> tuple[object, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(output of `forward(images)` (default: the module; None when stopped at the last BN layer),
        (total, mean_term, std_term)). A `forward` that runs more than the module (a whole detector
        around its backbone body) needs `stop_at_last=False`."""
        if not self._patched:
            raise RuntimeError("use BNStatisticsLoss inside a `with` block")
        self.seen, self._stats = [], []
        output = None
        try:
            output = (forward or self.module)(images)
        except _StopForward:
            pass
        if len(self.seen) != len(self.layers):
            missing = [n for n in self.layers if n not in self.seen]
            raise RuntimeError(f"{len(missing)} BN layers never ran in the forward: {missing[:5]}")
        if self.input_stats:
            self._stats.insert(0, self._statistics(images))
        batch, layers = images.shape[0], len(self.layers)
        mean_target, std_target, unbiased = self._targets_for(
            tuple(self.seen), images.shape[1], tuple(k for _, _, k in self._stats), images.device)
        mu = torch.cat([m for m, _, _ in self._stats], 1)
        # sum / batch / L: the same scalar factors, in the same order, as each layer's .sum(1).mean() / L
        mean_term = (mu - mean_target).pow(2).sum() / batch / layers
        if not self._squares:
            return output, (mean_term, mean_term, torch.zeros((), device=images.device))
        mean_square = torch.cat([s for _, s, _ in self._stats], 1)
        var = ((mean_square - mu * mu) * unbiased).clamp(min=0.0)
        std_term = ((var + STD_EPS).sqrt() - std_target).pow(2).sum() / batch / layers
        return output, (mean_term + std_term, mean_term, std_term)


@dataclass
class Distilled:
    """Result of `distill`. Arrays of losses have shape (batches, iterations)."""

    images: torch.Tensor                      # (N, 3, H, W) in the model's normalised input space
    loss: np.ndarray                          # total loss per batch and iteration, before that iteration's step
    mean_loss: np.ndarray
    std_loss: np.ndarray
    lr: np.ndarray                            # learning rate used at each iteration's step
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # after k steps: first images of batch 0
    bn_layers: int = 0
    config: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean over batches of the last recorded loss."""
        return float(self.loss[:, -1].mean())


def distill(model: nn.Module, num_images: int = 32, batch_size: int = 32, iterations: int = 500,
            loss: str = "mean", lr: float = 0.1, milestones: tuple[int, ...] | None = None, gamma: float = 0.2,
            clamp: bool = False, image_size: tuple[int, int] | None = None, input_stats: bool = True,
            snapshot_at: tuple[int, ...] = (), snapshot_images: int = 4, seed: int = 0,
            progress: bool | None = None) -> Distilled:
    """Distill `num_images` images from the BN statistics of `model` (a detector or a plain BN network).

    Paper 4.2.2: Adam, lr 0.1; for "mean+std" the learning rate is divided by 5 at iterations 20
    and 75 (`milestones=None` picks (20, 75) for "mean+std" and none for "mean"). Where the paper is
    silent, ZeroQ's defaults: 500 iterations, batches of 32. `image_size` (H, W) defaults to the
    detector's input size. `snapshot_at` lists iteration counts k (0 = the initial noise,
    `iterations` = the result) at which the first `snapshot_images` images of the first batch are
    kept. Deterministic for a given seed and batch size. Raises DistillationDiverged naming the
    iteration if the loss becomes NaN or infinite.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value in (("num_images", num_images), ("batch_size", batch_size), ("iterations", iterations)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    bad = [k for k in snapshot_at if not 0 <= k <= iterations]
    if bad:
        raise ValueError(f"snapshot_at must lie in 0..{iterations}, got {bad}")
    height, width = image_size if image_size is not None else input_size(model)
    bounds = pixel_range(model) if clamp else None
    if milestones is None:
        milestones = (20, 75) if loss == "mean+std" else ()

    body = distill_target(model)
    device = next(body.parameters()).device
    was_training = body.training
    frozen = [(p, p.requires_grad) for p in body.parameters()]
    if bounds is not None:
        low, high = (b.to(device)[None, :, None, None] for b in bounds)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [min(batch_size, num_images - start) for start in range(0, num_images, batch_size)]
    curves = np.zeros((4, len(sizes), iterations))
    images, snapshots = [], {}
    kwargs = {} if progress is None else {"disable": not progress}
    bar = tqdm(total=len(sizes) * iterations, desc="distill", leave=False, **kwargs)
    body.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with BNStatisticsLoss(body, loss, input_stats) as criterion:
            for b, n in enumerate(sizes):
                x = torch.randn(n, 3, height, width, generator=generator).to(device).requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=lr)
                scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
                for it in range(iterations):
                    if b == 0 and it in snapshot_at:
                        snapshots[it] = x.detach()[:snapshot_images].cpu().clone()
                    total, mean_term, std_term = criterion(x)
                    value = total.item()
                    if not np.isfinite(value):
                        raise DistillationDiverged(
                            f"distillation loss is {value} at iteration {it} of batch {b}; check the model's BN "
                            f"statistics for NaN/inf or lower the learning rate (lr={lr})")
                    curves[:, b, it] = value, mean_term.item(), std_term.item(), optimizer.param_groups[0]["lr"]
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    scheduler.step()
                    if bounds is not None:
                        with torch.no_grad():
                            x.clamp_(low, high)
                    bar.update()
                if b == 0 and iterations in snapshot_at:
                    snapshots[iterations] = x.detach()[:snapshot_images].cpu().clone()
                images.append(x.detach().cpu())
    finally:
        bar.close()
        body.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)
    config = {"num_images": num_images, "batch_size": batch_size, "iterations": iterations, "loss": loss, "lr": lr,
              "milestones": list(milestones), "gamma": gamma, "clamp": clamp, "image_size": [height, width],
              "input_stats": input_stats, "seed": seed}
    return Distilled(torch.cat(images), *curves, snapshots, len(bn_layers(body)), config)


# --------------------------------------------------------------------------- the stage's files (notebook 03)
def distill_or_load(run, model, snapshot_at: list[int], num_images: int, batch_size: int = 8,
                    seed: int = 0, **config) -> tuple[dict[int, torch.Tensor], dict]:
    """Distill once per run and keep the result: images at every snapshot iteration (float16, in the
    normalised input space, to halve the files; rounding moves a pixel by at most 0.05 % of its value)
    and the loss curves averaged over images. A rerun of a finished run loads them instead.

    Images are distilled in independent batches of `batch_size` (batch k seeded with seed * 1000 + k),
    the way the paper repeats the distillation; the loss is per image, so this changes only speed
    (batches of 8 cost about 0.03 s per image and iteration on 2 cores, batches of 64 about 0.05 s).
    """
    images_path, curves_path = run.path("distilled.pt"), run.path("loss_curves.json")
    if images_path.exists() and curves_path.exists():
        return torch.load(images_path, weights_only=True), json.loads(curves_path.read_text())
    starts = list(range(0, num_images, batch_size))
    bar = tqdm(total=len(distributed.shard(starts)), desc="distill batches", disable=not distributed.is_writer())

    def one_batch(k: int) -> Distilled:
        size = min(batch_size, num_images - starts[k])
        done = distill(model, num_images=size, batch_size=size, snapshot_at=tuple(snapshot_at),
                       snapshot_images=size, seed=seed * 1000 + k, progress=False, **config)
        bar.update()
        done.images, done.snapshots = done.images.cpu(), {at: v.cpu() for at, v in done.snapshots.items()}
        return done  # on the CPU, as a rerun loads it (and as ranks exchange it)

    # under torchrun each rank distils every world-size-th batch (each seeded by its index, so the
    # result is the single process's); every rank gets all batches back, rank 0 alone writes them
    parts = distributed.map_sharded(one_batch, range(len(starts)))
    bar.close()
    sizes = [p.images.shape[0] for p in parts]

    def average(name: str) -> np.ndarray:  # over images: each batch's curve weighted by its size
        return np.average(np.concatenate([getattr(p, name) for p in parts]), axis=0, weights=sizes)

    snapshots = {int(k): torch.cat([p.snapshots[k] for p in parts]).half() for k in sorted(parts[0].snapshots)}
    curves = {"iteration": list(range(parts[0].loss.shape[1])), "loss": average("loss").tolist(),
              "mean_term": average("mean_loss").tolist(), "std_term": average("std_loss").tolist(),
              "lr": parts[0].lr[0].tolist(), "bn_layers": parts[0].bn_layers,
              "config": {**parts[0].config, "num_images": num_images, "batch_size": batch_size, "seed": seed}}
    if distributed.is_writer():
        atomic_write_json(curves_path, curves, digits=6)
        write_preview(run.path("preview.npz"), snapshots, model)
        atomic_torch_save(images_path, snapshots)
    distributed.barrier()
    return snapshots, curves


def write_preview(path: Path, snapshots: dict[int, torch.Tensor], model, n: int = 3) -> Path:
    """The first `n` images of every snapshot as 8-bit pixels (N, H, W, 3), small enough to commit,
    so the Fig. 4 grids can be redrawn from stored results on a clone without the full tensors."""
    arrays = {f"iteration_{k}": (to_pixels(v[:n].float(), model).clamp(0, 1) * 255).round()
              .to(torch.uint8).permute(0, 2, 3, 1).numpy() for k, v in snapshots.items()}
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def pixel_statistics(images: torch.Tensor, model) -> dict:
    """How far normalised images stray from what a [0, 1] camera frame can produce, and how colourful they are.

    out_of_range: share of values outside the per-channel normalised pixel range; absmax: the largest
    |value| (what the first layer's activation quantizer must cover); channel_spread: mean absolute
    difference between a pixel's channels in pixel units (0 for a gray image).
    """
    low, high = (b[None, :, None, None] for b in pixel_range(model))
    x = images.float()
    tolerance = 4e-3  # float16 storage moves a value at the bound (|x| < 4) by up to 2e-3
    outside = ((x < low - tolerance) | (x > high + tolerance)).float().mean()
    pixels = to_pixels(x, model)
    spread_ = (pixels - pixels.mean(1, keepdim=True)).abs().mean()
    return {"out_of_range": float(outside), "absmax": float(x.abs().max()), "channel_spread": float(spread_)}


NOTEBOOK = "03_distill_calibration_data"


def distill_batch_run(run: dict, device: torch.device) -> None:
    """Distil one resolved batch run (`helpers.batch.load_batch`) into its run folder, as notebook 03 does."""
    from helpers import runs, upstream
    p = run["params"]
    detector = upstream.detector_run(p["STAGE"], PROFILE=p["PROFILE"], SEED=p["SEED"], DATA_ROOT=p["DATA_ROOT"])
    model = upstream.load_detector(detector, upstream.validation_set(detector).num_classes)
    model = model.to(device) if distributed.active() else model  # alone: the profile's device, as in notebook 03
    folder = runs.results_dir() / NOTEBOOK / run["run_id"]
    target = runs.open_run(NOTEBOOK, p) if distributed.is_writer() else runs.Run(NOTEBOOK, p, folder)
    distributed.barrier()
    distill_or_load(target, model, p["SNAPSHOT_AT"], p["NUM_IMAGES"], p["BATCH_SIZE"], p["SEED"],
                    iterations=p["ITERATIONS"], loss=p["LOSS"], lr=p["LR"], clamp=p["CLAMP"])


def main(argv: list[str] | None = None) -> int:
    """`[torchrun --nproc-per-node N] python -m helpers.distill BATCH.yaml [--run K ...]`.

    For each unfinished notebook-03 run of the batch (or the runs numbered K as `helpers.batch BATCH
    --list` prints them): distil its batches over every process of the group (`distill_or_load`: each
    rank every N-th batch, rank 0 writing the images), then rank 0 executes notebook 03 for it in one
    process, which finds the images, distils nothing and finishes the run exactly as in the batch.
    """
    from helpers import batch
    return batch.distributed_main(argv, NOTEBOOK, distill_batch_run, main.__doc__, "--distill-only")


if __name__ == "__main__":
    raise SystemExit(main())
