"""A fresh clone re-makes no run of the default batch: every file a finished run lists as an artifact
(trained weights, distilled images, rows) is committed, so `make reproduce` skips every run and nbval
compares committed outputs with outputs computed from the committed weights and images, never from a
training re-made on another CPU (whose kernel family rounds differently; see README, *Reproducibility*)."""
import json
import subprocess

import pytest

from helpers import batch
from helpers.runs import ROOT


def _tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files", "results", "data"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return set(out.stdout.splitlines())


def test_every_artifact_of_the_default_batch_is_committed():
    tracked = _tracked()
    missing = {}
    for run in batch.load_batch(ROOT / "params" / "tiny.yaml"):
        if run["notebook"] == "01_prepare_data":
            continue  # the synthetic data: re-made in seconds, bit-identical on every CPU (numpy and PIL, no float kernels)
        folder = f"results/{run['notebook']}/{run['run_id']}"
        if f"{folder}/metrics.json" not in tracked:
            missing[folder] = ["metrics.json (the run itself is not committed)"]
            continue
        artifacts = json.loads((ROOT / folder / "metrics.json").read_text()).get("artifacts", [])
        absent = [a for a in artifacts if a not in tracked]
        if absent:
            missing[folder] = absent
    assert not missing, ("a fresh clone would re-make these runs (add the files to git, un-ignoring them in "
                         f".gitignore's block of committed artifacts): {missing}")
