import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A few synthetic images in both real layouts (FLIR ADAS v1.3 and COCO 2017)."""
    from helpers import synth
    root = tmp_path_factory.mktemp("data")
    synth.write_dataset(root / "FLIR_ADAS_1_3", "flir", n_train=12, n_val=6, seed=3)
    synth.write_dataset(root / "coco", "coco", n_train=12, n_val=6, seed=3)
    return root


@pytest.fixture(autouse=True)
def isolated_results(tmp_path, monkeypatch):
    """No test writes into the project's results/."""
    monkeypatch.setenv("IRZSQ_RESULTS_DIR", str(tmp_path / "results"))
