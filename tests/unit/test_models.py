import pytest
import torch

from helpers import models, quant, train


@pytest.mark.parametrize("arch", ["retinanet_resnet18_fpn_tiny", "retinanet_resnet18_half_fpn_tiny"])
def test_tiny_builder_runs_both_modes(arch):
    model = models.build_detector(arch, 4, 128, 160)
    assert isinstance(model, torch.nn.Module)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_half_width_tiny_keeps_the_layout_at_half_the_channels():
    full, half = (models.build_detector(a, 4, 128, 160) for a in ("retinanet_resnet18_fpn_tiny",
                                                                  "retinanet_resnet18_half_fpn_tiny"))
    named = lambda m: {n: b for n, b in m.backbone.body.named_modules() if isinstance(b, torch.nn.BatchNorm2d)}
    assert list(named(full)) == list(named(half)) and len(named(half)) == 20  # same 20 BN layers, same names
    assert all(named(half)[n].num_features * 2 == b.num_features for n, b in named(full).items())
    assert half.head.classification_head.conv[0][0].in_channels == 64  # FPN and head of 64 channels
    features = half.backbone(torch.rand(1, 3, 128, 160))
    assert [f.shape[1] for f in features.values()] == [64] * 5 and list(features["0"].shape[2:]) == [16, 20]
    assert models.num_parameters(half) < models.num_parameters(full) / 3.5


def test_paper_builder_constructs_offline_with_the_papers_sizes():
    coco = models.build_detector("retinanet_resnet50_fpn_v2", 91, 512, 640)
    flir = models.build_detector("retinanet_resnet50_fpn_v2", 4, 512, 640)
    # paper Table 1: 145.7 MB (COCO, 91 classes) and 138.8 MB (FLIR, 3 classes + background)
    assert round(quant.model_size(coco), 1) == 145.7
    assert round(quant.model_size(flir), 1) == 138.8
    assert quant.model_size(flir, bits=8) == pytest.approx(quant.model_size(flir) / 4)
    assert coco.transform.min_size == (512,) and coco.transform.max_size == 640


def test_missing_coco_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(models.WeightsMissing, match="retinanet_resnet50_fpn_v2_coco-5905b1c5.pth") as err:
        models.build_detector("retinanet_resnet50_fpn_v2", 91, 512, 640, weights="COCO_V1")
    assert "download.pytorch.org" in str(err.value) and str(tmp_path) in str(err.value)


def test_finetune_keeps_every_weight_but_the_classifier(tmp_path):
    pre = models.build_detector("retinanet_resnet18_fpn_tiny", 8, 128, 160)
    train.save_weights(pre, tmp_path / "model.pth")
    ft = models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160, weights=str(tmp_path / "model.pth"))
    a, b = pre.state_dict(), ft.state_dict()
    changed = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert changed == ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
    assert ft.head.classification_head.num_classes == 4


def test_wrong_architecture_checkpoint_is_rejected(tmp_path):
    train.save_weights(models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160), tmp_path / "m.pth")
    with pytest.raises(ValueError, match="does not match"):
        models.build_detector("retinanet_resnet50_fpn_v2", 4, 512, 640, weights=str(tmp_path / "m.pth"))
    with pytest.raises(ValueError, match="arch must be one of"):
        models.build_detector("yolo", 4, 128, 160)


def test_device_policy_keeps_tiny_on_the_cpu_and_names_the_fix_for_a_missing_gpu(monkeypatch):
    import torch

    from helpers import config
    monkeypatch.delenv("IRZSQ_DEVICE", raising=False)
    assert config.device("tiny").type == "cpu"
    assert config.device("paper").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("IRZSQ_DEVICE", "cpu")
    assert config.device("paper").type == "cpu"
    if not torch.cuda.is_available():
        monkeypatch.setenv("IRZSQ_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="unset IRZSQ_DEVICE"):
            config.device("tiny")
