import pytest
import torch

from helpers import data, models, train
from helpers.runs import read_jsonl


def _setup(tiny_root, epochs):
    torch.manual_seed(0)
    ds = data.CocoDetectionSet(tiny_root, "flir", "train", classes=data.FLIR_CLASSES, train=True, limit=8)
    model = models.build_detector("retinanet_resnet18_fpn_tiny", ds.num_classes, 128, 160)
    schedule = train.Schedule(epochs=epochs, optimizer="adamw", lr=1e-3, lr_schedule="cosine", warmup_iters=2, grad_clip=10)
    return model, data.make_loader(ds, 4, train=True, seed=0), schedule


def test_a_few_steps_lower_the_loss(tiny_root, tmp_path):
    model, loader, schedule = _setup(tiny_root, epochs=6)
    log = train.fit(model, loader, schedule, tmp_path, seed=0)
    assert len(log) == 6
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert (tmp_path / "checkpoint.pth").exists() and len(read_jsonl(tmp_path / "train_log.jsonl")) == 6


def test_resumed_training_equals_uninterrupted(tiny_root, tmp_path, monkeypatch):
    model, loader, schedule = _setup(tiny_root, epochs=2)
    train.fit(model, loader, schedule, tmp_path / "straight", seed=0)

    def interrupt_after_first_epoch(path, record):
        real_append(path, record)
        raise KeyboardInterrupt
    real_append = train.append_jsonl
    monkeypatch.setattr(train, "append_jsonl", interrupt_after_first_epoch)
    first, loader1, _ = _setup(tiny_root, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train.fit(first, loader1, schedule, tmp_path / "resumed", seed=0)
    monkeypatch.setattr(train, "append_jsonl", real_append)
    resumed, loader2, _ = _setup(tiny_root, epochs=2)  # a fresh process
    log = train.fit(resumed, loader2, schedule, tmp_path / "resumed", seed=0)
    assert [r["epoch"] for r in log] == [0, 1]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "resumed" / "train_log.jsonl")] == [0, 1]
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-6), k


def test_log_without_checkpoint_is_replaced_not_appended(tiny_root, tmp_path):
    """A clone has the committed train_log.jsonl but no checkpoint: training restarts and the log holds each epoch once."""
    model, loader, schedule = _setup(tiny_root, epochs=1)
    train.fit(model, loader, schedule, tmp_path, seed=0)
    (tmp_path / "checkpoint.pth").unlink()
    again, loader2, _ = _setup(tiny_root, epochs=1)
    train.fit(again, loader2, schedule, tmp_path, seed=0)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == [0]


def test_finished_run_does_no_training(tiny_root, tmp_path):
    model, loader, schedule = _setup(tiny_root, epochs=1)
    train.fit(model, loader, schedule, tmp_path, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again, loader2, _ = _setup(tiny_root, epochs=1)
    log = train.fit(again, loader2, schedule, tmp_path, seed=0)
    assert len(log) == 1
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())


def test_divergence_names_the_iteration(tiny_root, tmp_path):
    model, loader, _ = _setup(tiny_root, epochs=1)
    with torch.no_grad():
        model.head.regression_head.bbox_reg.weight.fill_(float("nan"))
    with pytest.raises(train.TrainingDiverged, match="epoch 0, iteration 0"):
        train.fit(model, loader, train.Schedule(epochs=1), tmp_path, seed=0)


def test_learning_rate_schedules():
    step = train.lr_factor(train.Schedule(epochs=40, lr_schedule="step", step_epochs=10, gamma=0.2), iters_per_epoch=5)
    assert step(0) == 1.0 and step(49) == 1.0 and step(50) == pytest.approx(0.2) and step(150) == pytest.approx(0.008)
    cos = train.lr_factor(train.Schedule(epochs=2, lr_schedule="cosine", warmup_iters=4), iters_per_epoch=10)
    assert cos(0) == pytest.approx(0.25 * 1.0, rel=0.01) and cos(10) == pytest.approx(0.5) and cos(20) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        train.lr_factor(train.Schedule(epochs=1, lr_schedule="poly"), 1)


def test_convergence_verdict():
    flat = [{"epoch": i, "loss": 1.0 - 0.001 * i, "val_AP": 0.4 + 0.001 * i} for i in range(5)]
    steep = [{"epoch": i, "loss": 1.0 - 0.15 * i, "val_AP": 0.1 * i} for i in range(5)]
    assert train.convergence(flat)["converged"] is True
    assert train.convergence(steep)["converged"] is False
    assert train.convergence(flat[:2])["converged"] is False
