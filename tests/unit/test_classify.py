import pytest
import torch

from helpers import classify as C
from helpers.dfmpc import find_pairs

torch.set_num_threads(1)  # small tensors: threads only add overhead (and contention on a shared CPU)


@pytest.fixture(scope="module")
def patches(tiny_root):
    return C.build_patch_set(tiny_root, "train", size=32, seed=0, progress=False)


def test_patch_set_shapes_and_labels(patches):
    x, y = patches.images, patches.labels
    assert x.ndim == 4 and x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and len(y) == len(x) > 0
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray replicated
    assert set(y.tolist()) <= set(range(len(C.PATCH_CLASSES)))
    assert C.BACKGROUND in set(y.tolist()) and len(set(y.tolist())) >= 3
    assert sum(patches.counts().values()) == len(y)


def test_patch_set_deterministic_by_seed(tiny_root, patches):
    again = C.build_patch_set(tiny_root, "train", size=32, seed=0, progress=False)
    assert torch.equal(again.images, patches.images) and torch.equal(again.labels, patches.labels)
    other = C.build_patch_set(tiny_root, "train", size=32, seed=1, progress=False)
    assert not (other.images.shape == patches.images.shape and torch.equal(other.images, patches.images))


def test_max_per_class_caps(tiny_root):
    capped = C.build_patch_set(tiny_root, "train", size=16, seed=0, max_per_class=2, progress=False)
    assert max(capped.counts().values()) <= 2


def test_bad_size_and_missing_split(tiny_root, tmp_path):
    with pytest.raises(ValueError):
        C.build_patch_set(tiny_root, "train", size=4)
    with pytest.raises(Exception, match="not found"):
        C.build_patch_set(tmp_path, "train")


def test_classifier_shapes_and_pairs():
    m = C.build_classifier(5, width=8).eval()
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert len(find_pairs(m)) == 8  # ResNet-18 topology: 8 BasicBlocks
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    with pytest.raises(ValueError):
        C.build_classifier(1)


def test_training_lowers_loss_and_is_deterministic(patches):
    torch.manual_seed(0)
    sub = torch.utils.data.Subset(patches, range(min(32, len(patches))))
    runs = []
    for _ in range(2):
        m = C.build_classifier(5, width=8)
        r = C.train_classifier(m, sub, epochs=20, lr=3e-3, seed=0, batch_size=16, augment=False,
                               max_steps=20, progress=False)
        runs.append((m, r))
    (m, r), (m2, r2) = runs
    assert len(r["losses"]) == 20
    assert sum(r["losses"][-3:]) / 3 < sum(r["losses"][:3]) / 3
    assert r["losses"] == r2["losses"]
    acc = C.top1(m, sub)
    assert 0.0 <= acc <= 1.0 and acc == C.top1(m2, sub)
    assert not m.training


def test_classes_are_balanced_up_to_the_cap(tiny_root):
    full = C.build_patch_set(tiny_root, "train", size=16, seed=0, max_per_class=None, progress=False).counts()
    capped = C.build_patch_set(tiny_root, "train", size=16, seed=0, max_per_class=3, progress=False).counts()
    assert capped == {k: min(v, 3) for k, v in full.items()}


def test_thermal_patch_task_trains_once_then_reuses(tiny_root, tmp_path, monkeypatch):
    kwargs = dict(size=16, max_per_class=8, val_per_class=4, width=4, epochs=1, seed=0, n_calibration=5)
    task = C.thermal_patch_task(tiny_root, tmp_path / "clf.pth", **kwargs)
    assert (tmp_path / "clf.pth").exists() and len(task.info["epoch_loss"]) == 1
    assert task.calibration.shape == (5, 3, 16, 16) and max(task.info["patches_val"].values()) <= 4
    acc = task.evaluate(task.model)["top1"]
    assert 0.0 <= acc <= 1.0
    task.calibrate(task.model)  # runs without error
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: pytest.fail("retrained a stored classifier"))
    again = C.thermal_patch_task(tiny_root, tmp_path / "clf.pth", **kwargs)
    assert again.info == task.info and again.evaluate(again.model)["top1"] == acc


def test_imagenet_inputs_missing_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(C.WeightsMissing, match=r"resnet18-f37072fd\.pth"):
        C.imagenet_classifier("resnet18")
    with pytest.raises(ValueError):
        C.imagenet_classifier("vgg16")
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(C.DatasetError, match="ILSVRC2012_img_val.tar"):
        C.imagenet_val_set(tmp_path / "val")
    with pytest.raises(C.DatasetError, match=r"(?s)resnet18-f37072fd\.pth.*found 0"):  # both named at once
        C.imagenet_task("resnet18", tmp_path / "missing")


def test_imagenet_task_runs_the_paper_path_on_stand_in_inputs(tmp_path, monkeypatch):
    """The paper-profile path end to end, offline: a random ResNet-18 saved where torchvision's ImageNet
    checkpoint would be, and a stand-in val folder (1000 WordNet-style classes, one small image each)."""
    import torchvision
    from PIL import Image

    from helpers import dfmpc
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    for k in range(1000):
        (tmp_path / "val" / f"n{k:08d}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (k % 256, 0, 0)).save(tmp_path / "val" / f"n{k:08d}" / "x.png")
    task = C.imagenet_task("resnet18", tmp_path / "val", limit=3, n_calibration=2, num_workers=0)
    assert task.info == {"val_images": 3} and task.calibration.shape == (2, 3, 224, 224)
    assert len(dfmpc.find_pairs(task.model)) == 8
    settings = dfmpc.table_settings(["ternary"]) + [dfmpc.Setting.make("data-fit", "ternary")]
    rows = dfmpc.evaluate_settings(task.model, settings, task.evaluate, "top1", calibrate=task.calibrate)
    assert [r["setting"] for r in rows] == ["FP32", "naive 2/6 (TWN)", "DF-MPC 2/6 (TWN)", "data-fit c 2/6 (TWN)"]
    assert all(0.0 <= r["top1"] <= 1.0 for r in rows) and rows[1]["size_mb"] < rows[0]["size_mb"]
