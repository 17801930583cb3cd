"""Several processes, one result: PyTorch's `torchrun` + DistributedDataParallel, and nothing home-made
beyond what CPU tests need.

`torchrun --nproc-per-node N -m helpers.train BATCH.yaml` starts N processes; each calls `init()`,
which reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and joins the
process group (NCCL on CUDA, gloo on the CPU). A process started without torchrun is world size 1
and every function here is then a no-op that returns what one process would compute, so the
single-process path (the tiny profile, the notebooks) is unchanged.

What the pieces guarantee, for a global batch of `B * N` images split into N per-rank batches of B:
- `ShardedSampler`: the epoch's image order is the one the single-process loader of
  `helpers.data.make_loader` draws for the same seed and epoch; rank r takes every N-th position
  (DistributedSampler's own split), so step k of the N ranks together covers exactly the images of
  the single process's step k (same global batch, same order, same seed).
- `synced_batchnorm`: BatchNorm uses the statistics of the global batch, as one process would
  (torch's SyncBatchNorm on CUDA; on the CPU, where torch's SyncBatchNorm refuses to run, the same
  statistics all-reduced through differentiable `torch.distributed.nn` collectives).
- `gather_in_order` / `map_sharded`: per-item results (COCO detections per image, distilled batches,
  calibration rows) are computed on one rank each and reassembled in item order, so COCOeval and
  every downstream file see the single process's list.
- `is_writer()`: only rank 0 writes checkpoints, logs and results; `barrier()` makes the others
  wait until the files are complete before they read them.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

T = TypeVar("T")
R = TypeVar("R")

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                      "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                      "TORCHELASTIC_ERROR_FILE", "OMP_NUM_THREADS")
TIMEOUT_VARIABLE = "IRZSQ_DIST_TIMEOUT_MIN"  # how long ranks wait for each other (rank 0 evaluating alone)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_alone = False  # inside `alone()`: this process works as a group of one


def _grouped() -> bool:
    return not _alone and dist.is_available() and dist.is_initialized()


def active() -> bool:
    """True inside an initialised process group of more than one process (and not `alone()`)."""
    return _grouped() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _grouped() else 0


_this_rank = rank  # for arguments named `rank`


def world_size() -> int:
    return dist.get_world_size() if _grouped() else 1


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """While inside, this process is a group of one (rank 0 of 1, `active()` False): for a work unit one
    rank computes by itself while the others compute theirs, so the helpers it calls (an evaluation,
    which would otherwise split its images over the ranks) run as in a single process and call no
    collective the other ranks would not join. It must write no files (every rank is a writer here)."""
    global _alone
    saved, _alone = _alone, True
    try:
        yield
    finally:
        _alone = saved


def is_writer() -> bool:
    """Rank 0 writes every file; the other ranks only compute."""
    return rank() == 0


def init(backend: str | None = None) -> torch.device:
    """Join torchrun's process group and return this rank's device (a plain process: its usual device).

    `backend`: "nccl" | "gloo"; default NCCL when CUDA is present, else gloo. On CUDA each rank
    takes GPU LOCAL_RANK (so `torch.device("cuda")` in the helpers means this rank's GPU).
    """
    if not launched_by_torchrun():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                               "start torchrun with --nproc-per-node at most the number of GPUs.")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        minutes = float(os.environ.get(TIMEOUT_VARIABLE, 120))
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                timeout=datetime.timedelta(minutes=minutes))
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def single_process_environment() -> Iterator[None]:
    """Hide torchrun's variables from a child (rank 0 running a notebook kernel must not join the group)."""
    saved = {k: os.environ.pop(k) for k in TORCHRUN_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------- data order
def single_process_order(n: int, generator_seed: int) -> list[int]:
    """The order in which `make_loader(..., train=True)` visits n items after its generator is seeded with
    `generator_seed` (what `train.fit` does each epoch): taken from a DataLoader itself, so it follows
    whatever draws torch's loader makes (its base seed, then the permutation)."""
    loader = DataLoader(range(n), batch_size=max(n, 1), shuffle=True,
                        generator=torch.Generator().manual_seed(generator_seed))
    return [int(i) for batch in loader for i in batch]


class ShardedSampler(DistributedSampler):
    """DistributedSampler whose permutation is the single-process loader's (see the module docstring).

    `set_epoch(epoch)` selects the epoch; the permutation seed is `epoch_seed(epoch)`, by default
    `seed * 100_003 + epoch` as in `train.fit`. Like DistributedSampler, the order is padded by
    repeating its head to a multiple of the world size (`drop_last=False`).
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None,
                 epoch_seed: Callable[[int, int], int] | None = None):
        super().__init__(dataset, num_replicas=num_replicas if num_replicas is not None else world_size(),
                         rank=rank if rank is not None else _this_rank(), shuffle=shuffle, seed=seed)
        self.epoch_seed = epoch_seed or (lambda seed_, epoch: seed_ * 100_003 + epoch)

    def __iter__(self):
        n = len(self.dataset)
        order = single_process_order(n, self.epoch_seed(self.seed, self.epoch)) if self.shuffle else list(range(n))
        padding = self.total_size - n
        if padding > 0:
            order += (order * (padding // max(n, 1) + 1))[:padding]
        return iter(order[self.rank:self.total_size:self.num_replicas])


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """`helpers.data.make_loader` for one rank: `batch_size` is the per-rank batch (global = batch_size x
    world size). In a single process it is exactly `data.make_loader`."""
    from helpers import data
    if not active():
        return data.make_loader(dataset, batch_size, train, seed, num_workers)
    sampler = ShardedSampler(dataset, shuffle=train, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=data.collate,
                      num_workers=num_workers, drop_last=False, persistent_workers=num_workers > 0)


def per_rank_batch(global_batch: int) -> int:
    """The per-rank batch of a global batch; it must split evenly, or the runs would not be comparable."""
    if global_batch % world_size():
        raise ValueError(f"global batch {global_batch} does not split over {world_size()} processes; "
                         f"choose --nproc-per-node dividing it (paper: 8 -> 1, 2, 4 or 8)")
    return global_batch // world_size()


# --------------------------------------------------------------------------- batch norm over the global batch
class _GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of every rank's batch together (CPU stand-in for
    nn.SyncBatchNorm, which runs only on GPUs). Eval mode is plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        # two passes, as BatchNorm itself: E[x^2] - mean^2 loses every digit when |mean| >> std
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        sums = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))  # differentiable: backward all-reduces gradients
        total = sums[-1]
        mean = sums[:-1] / total
        var = all_reduce(((x - mean[None, :, None, None]) ** 2).sum((0, 2, 3))) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * total / (total - 1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, every BatchNorm2d of `model` normalises with the global batch's statistics.

    The modules keep their parameters, buffers and state-dict keys (only their class changes for the
    duration), so checkpoints, distillation and quantization see plain BatchNorm2d. A no-op in a
    single process."""
    if not active():
        yield model
        return
    on_cuda = next(model.parameters()).device.type == "cuda"
    swapped = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    for m in swapped:
        if on_cuda:
            m.__class__, m.process_group = nn.SyncBatchNorm, None
        else:
            m.__class__ = _GlobalBatchNorm2d
    try:
        yield model
    finally:
        for m in swapped:
            m.__class__ = nn.BatchNorm2d
            m.__dict__.pop("process_group", None)


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` (parameters broadcast from rank 0); `model` itself alone."""
    if not active():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# --------------------------------------------------------------------------- reductions and gathering
def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar logs over ranks (each rank's mean over an equal number of steps)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on one (so a rank that must stop does not leave the others waiting)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's (index, item) pairs: every world-size-th item, starting at its rank."""
    return [(i, items[i]) for i in range(rank(), len(items), world_size())]


def gather_in_order(pairs: list[tuple[int, R]]) -> list[R]:
    """Every rank's (index, result) pairs, merged and sorted by index, on every rank."""
    if active():
        gathered: list = [None] * world_size()
        dist.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    return [result for _, result in sorted(pairs, key=lambda p: p[0])]


def map_sharded(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(item) for item in items], each item computed on one rank, the list returned on every rank.

    For independent work units: distillation batches (each seeded by its index), the cells of a
    quantization grid. Each `fn(item)` runs `alone()`, as in one process (its evaluation, say, on all
    the images). Results must be picklable (tensors are moved to the CPU first)."""
    def to_cpu(value):
        if isinstance(value, torch.Tensor):
            return value.cpu()
        if isinstance(value, dict):
            return {k: to_cpu(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(to_cpu(v) for v in value)
        return value
    if not active():
        return [fn(item) for item in items]

    def alone_on_cpu(item):  # the item's work is this rank's alone: no collective inside it
        with alone():
            return to_cpu(fn(item))
    return gather_in_order([(i, alone_on_cpu(item)) for i, item in shard(items)])


class RankSubset(Dataset):
    """Items rank, rank + N, ... of a dataset without padding (evaluation must not count an image twice)."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.indices = dataset, list(range(rank(), len(dataset), world_size()))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]
