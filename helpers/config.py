"""Seeding, warnings policy and stable printing shared by every notebook."""
from __future__ import annotations

import os
import random
import warnings

import numpy as np


def seed_everything(seed: int, deterministic: bool = True) -> "np.random.Generator":
    """Seed python, numpy and torch; make CPU/CUDA kernels deterministic where torch can."""
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return np.random.default_rng(seed)


def device(profile: str = "tiny") -> "torch.device":
    """Where models run. `IRZSQ_DEVICE` ("cpu", "cuda", "cuda:1") overrides; otherwise the paper
    profile uses CUDA when a GPU is present and the tiny profile stays on the CPU, whose results the
    committed notebooks show (GPU kernels round differently, so nbval would not match)."""
    import torch
    wanted = os.environ.get("IRZSQ_DEVICE") or ("cuda" if profile == "paper" and torch.cuda.is_available() else "cpu")
    chosen = torch.device(wanted)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"IRZSQ_DEVICE={wanted!r} but torch sees no CUDA device on this machine; "
                           "unset IRZSQ_DEVICE or set it to 'cpu'.")
    return chosen


def quiet_known_warnings() -> None:
    """Filter the specific third-party warnings that are not ours to fix (never all warnings)."""
    warnings.filterwarnings("ignore", message=r".*torch\.meshgrid: in an upcoming release.*")
    warnings.filterwarnings("ignore", message=r".*Kernel is running over TCP without encryption.*")


def fmt(value, digits: int = 3):
    """Round floats (recursively) for stable notebook output."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: fmt(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fmt(v, digits) for v in value)
    return value


def show(params: dict, digits: int = 6) -> None:
    """Print parameters sorted, one per line (a stable nbval check)."""
    for key in sorted(params):
        print(f"{key:>16} = {fmt(params[key], digits)!r}")
