"""One builder for the detector of both profiles: torchvision `RetinaNet` in every case.

- `retinanet_resnet50_fpn_v2`: the paper's model (ResNet-50-FPN v2, GroupNorm head, GIoU loss),
  COCO_V1 weights from the local torch cache, native 640x512 input.
- `retinanet_resnet18_fpn_tiny`: same class and head design, ResNet-18 body with BatchNorm2d
  (distillation needs running statistics), FPN of 128 channels, P6/P7 from C5, anchors scaled to
  a 160x128 frame (FLIR / 4).
- `retinanet_resnet18_half_fpn_tiny` (the tiny profile's default): the same at half width
  (ResNet-18 with 32-64-128-256 channels, FPN and head of 64), a third of the full-width
  training step on the 2-core CPU, which buys the epochs the synthetic thermal set needs to land
  in the difficulty window within the time budget (see `tools.difficulty_sweep`).

Labels 1..K need `num_classes=K+1` because torchvision indexes class logits with the label.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet, resnet18
from torchvision.models.resnet import BasicBlock
from torchvision.models.detection import RetinaNet, RetinaNet_ResNet50_FPN_V2_Weights, retinanet_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from helpers.runs import resolve_path

ARCHS = ("retinanet_resnet50_fpn_v2", "retinanet_resnet18_fpn_tiny", "retinanet_resnet18_half_fpn_tiny")
TINY_ARCH = "retinanet_resnet18_half_fpn_tiny"  # the tiny profile's detector (notebook 02's default)
TINY_WIDTHS = {"retinanet_resnet18_fpn_tiny": (1.0, 128), "retinanet_resnet18_half_fpn_tiny": (0.5, 64)}  # body, FPN


class WeightsMissing(FileNotFoundError):
    """Pretrained weights are not on disk (this machine cannot download them)."""


def cached_weights(weights, what: str) -> Path:
    """Path of torchvision `weights` in the torch hub cache; never downloads (WeightsMissing says how)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        raise WeightsMissing(
            f"{what} weights not found at {path}.\n"
            f"Download {weights.url} on a machine with internet access and copy it there "
            f"(or set TORCH_HOME so that $TORCH_HOME/hub/checkpoints/{path.name} exists).")
    return path


def coco_v1_state_dict() -> dict:
    """torchvision's COCO_V1 RetinaNet v2 weights from the torch hub cache, never downloaded here."""
    path = cached_weights(RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1, "COCO-pretrained RetinaNet v2")
    return torch.load(path, map_location="cpu", weights_only=True)


def resnet18_body(width: float = 1.0) -> ResNet:
    """torchvision's ResNet-18 (BatchNorm2d) with every stage's channels scaled by `width`; torchvision
    fixes BasicBlock widths, so the stages are rebuilt with its own `_make_layer` and initialisation."""
    if width == 1.0:
        return resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    body = ResNet(BasicBlock, [2, 2, 2, 2], norm_layer=nn.BatchNorm2d)
    channels = [int(64 * width) * 2 ** i for i in range(4)]
    body.inplanes = channels[0]
    body.conv1 = nn.Conv2d(3, channels[0], kernel_size=7, stride=2, padding=3, bias=False)
    body.bn1 = nn.BatchNorm2d(channels[0])
    for i, c in enumerate(channels):
        setattr(body, f"layer{i + 1}", body._make_layer(BasicBlock, c, 2, stride=1 if i == 0 else 2))
    body.fc = nn.Linear(channels[-1], 1000)
    for m in body.modules():  # as torchvision's ResNet.__init__
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return body


def _tiny(num_classes: int, min_size: int, max_size: int, arch: str = "retinanet_resnet18_fpn_tiny") -> RetinaNet:
    width, fpn_channels = TINY_WIDTHS[arch]
    body = resnet18_body(width)
    stage_channels = [int(64 * width) * 2 ** i for i in (1, 2, 3)]
    # as torchvision's v2 extractor (layers 2-4, P6/P7 from C5), with a narrower FPN
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, stage_channels,
                               fpn_channels, extra_blocks=LastLevelP6P7(stage_channels[-1], fpn_channels))
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (8, 16, 32, 64, 128))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 32))
    head.regression_head._loss_type = "giou"
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head,
                     min_size=min_size, max_size=max_size)


def build_detector(arch: str, num_classes: int, min_size: int, max_size: int, weights: str = "none") -> RetinaNet:
    """Build a RetinaNet.

    weights: "none" (random init), "COCO_V1" (torchvision's COCO weights, paper profile only; the
    classification layer is replaced when `num_classes` differs from 91) or a path to a checkpoint
    saved by `helpers.train` (same replacement rule).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "retinanet_resnet50_fpn_v2":
        model = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes,
                                          min_size=min_size, max_size=max_size)
    else:
        model = _tiny(num_classes, min_size, max_size, arch)
    if weights == "none":
        return model
    if weights == "COCO_V1":
        if arch != "retinanet_resnet50_fpn_v2":
            raise ValueError("COCO_V1 weights exist only for retinanet_resnet50_fpn_v2")
        state = coco_v1_state_dict()
    else:
        path = resolve_path(weights)
        if not path.exists():
            raise WeightsMissing(f"checkpoint {path} not found; run the training notebook that writes it.")
        from helpers.train import load_checkpoint  # weights_only=True: loading runs no pickled code
        state = load_checkpoint(path, keys=())
        state = state.get("model", state)
    load_with_new_classes(model, state)
    return model


def load_with_new_classes(model: RetinaNet, state: dict) -> list[str]:
    """Load every tensor; if the class count differs, keep the fresh classification layer (paper 4.1.2)."""
    own = model.state_dict()
    replaced = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if any(not k.startswith("head.classification_head.cls_logits") for k in replaced):
        raise ValueError(f"checkpoint does not match the architecture: {replaced[:4]}")
    state = {k: v for k, v in state.items() if k not in replaced}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(replaced):
        raise ValueError(f"checkpoint does not match the architecture: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return replaced


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (inputs are moved there)."""
    return next(model.parameters()).device


def randomise_norm_layers(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """In place, and returned: every norm layer's affine parameters and statistics and every conv bias
    drawn at random (from `generator`, else torch's global one), as a trained model's are. For measuring
    a model without its trained weights (export sizes, int8 speed): a fresh model's ones and zeros are
    all alike, so the ONNX exporter shares one constant between layers, which no trained model does and
    onnxruntime's quantizer refuses ("shared mode is not supported for weight")."""
    from torchvision.ops import FrozenBatchNorm2d
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.05, generator=generator)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


