import pytest
import torch

from helpers import classify as C
from helpers.dfmpc import find_pairs


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
