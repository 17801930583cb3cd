"""Deployable int8: ONNX QDQ export of the calibrated fake-quant RetinaNet, run in onnxruntime.

What is exported: `detector.backbone` + `detector.head`, from the *normalised* input (N x 3 x H x W,
after `GeneralizedRCNNTransform`) to the head's raw outputs, concatenated over the pyramid levels:
`cls_logits` (N x anchors x classes) and `bbox_regression` (N x anchors x 4). The resize and
normalisation, anchors, box decoding and NMS stay torchvision's own code, run on the ONNX outputs
(`OnnxDetector`), so detections go through the same post-processing as the fake-quant model's.

Two placements of QuantizeLinear/DequantizeLinear, both with the calibrated scales of
`helpers.quant`:

- "faithful" (`export_qdq`, TensorRT style, the fake-quant model op for op): a Q/DQ pair on the input
  of every quantized conv carrying its input quantizer's scale (per tensor, zero point 0), the weight
  stored as an int8 initializer (the integers `QuantConv2d.int_weight()`) behind a per-output-channel
  DequantizeLinear with the weight scales, the bias as an int32 initializer round(b / (s_x s_w))
  behind a DequantizeLinear of scale s_x s_w. BatchNorm, GroupNorm, ReLU, the residual and FPN adds
  stay float, as in the fake-quant model. onnxruntime's CPU provider runs such a graph correctly but
  cannot fuse its convs into int8 kernels (it needs a Q right after each conv).
- "ort" (`quantize_ort`, onnxruntime's placement): `onnxruntime.quantization.quantize_static` (QDQ,
  per-channel int8 weights, uint8 activations) on the float graph of the calibrated model. With
  `pin_scales=True` every conv input gets our calibrated scale through `TensorQuantOverrides`
  (signed tensors: uint8 zero point 128, i.e. our int8 grid shifted; ReLU outputs: zero point 0);
  the tensors our model does not quantize (conv outputs before BN-folded adds, GroupNorm inputs,
  FPN sums) get ranges from onnxruntime's calibration on the same images. With `pin_scales=False`
  it is onnxruntime's own quantization of the float detector (the reference path).

Narrow range. The bundle's symmetric quantizers use [-127, 127]; ONNX int8 Q is [-128, 127]
(no narrow-range attribute, and torch's exporter refuses (-127, 127)). Weights are on the
narrow grid already, so storing them as int8 is exact. Activations are exported with the full
range and the same scale: a value in [-128.5 s, -127.5 s) becomes -128 s instead of -127 s. Only
values beyond the clipping range on the negative side change; `narrow_range_effect` measures it
(the PyTorch reference for onnxruntime is the full-range export-mode model).
"""
from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import MethodType
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import RetinaNet

from helpers import quant, runs

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_logits", "bbox_regression")
INT8_CONV_OPS = ("QLinearConv", "ConvInteger")


class ExportError(ValueError):
    """The model cannot be exported as ONNX int8 (the message says why and what to do)."""


# --------------------------------------------------------------------------- checks
def check_exportable(model: nn.Module) -> dict:
    """Fail before any export unless `model` is a calibrated, symmetric W8A8 fake-quant RetinaNet.

    Returns {"quantized_layers", "float_convs"} (convs left in float, e.g. through `exclude`)."""
    if not isinstance(model, RetinaNet) or not all(hasattr(model, a) for a in ("transform", "backbone", "head")):
        raise ExportError(f"unknown architecture {type(model).__name__}: export supports torchvision RetinaNet "
                          f"detectors (helpers.models.build_detector, archs {_archs()})")
    layers = quant.quant_layers(model)
    if not layers:
        raise ExportError("the model is not quantized: wrap it with helpers.quant.quantize_model(model, 8, 8) "
                          "and calibrate it (helpers.quant.calibrate) before exporting")
    for name, layer in layers.items():
        iq = layer.input_quantizer
        if layer.w_bits < 8 or (iq is not None and iq.bits < 8):
            a = "float" if iq is None else iq.bits
            raise ExportError(f"layer {name} is W{layer.w_bits}A{a}: bit widths below 8 are not representable as "
                              "ONNX int8 (QuantizeLinear has no narrower type before opset 21); evaluate this "
                              "setting as fake quantization only (helpers.quant), or export a W8A8 model")
        if iq is None:
            raise ExportError(f"layer {name} has float activations (weight-only quantization): int8 kernels need "
                              "quantized inputs; build the model with quantize_model(..., a_bits=8)")
        if not layer.symmetric or not iq.symmetric:
            raise ExportError(f"layer {name} is asymmetric: export supports the symmetric scheme (zero point 0, "
                              "TensorRT's and onnxruntime's int8 convention); quantize with symmetric=True")
        if not bool(iq.calibrated):
            raise ExportError(f"layer {name} is not calibrated: run helpers.quant.calibrate(model, batches) "
                              "before exporting")
    float_convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    return {"quantized_layers": len(layers), "float_convs": len(float_convs)}


def _archs() -> str:
    from helpers.models import ARCHS
    return ", ".join(ARCHS)


# --------------------------------------------------------------------------- graph to export
class HeadOutputs(nn.Module):
    """backbone + head of a RetinaNet: normalised images -> (cls_logits, bbox_regression), all levels."""

    def __init__(self, detector: RetinaNet):
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(list(self.backbone(images).values()))
        return out["cls_logits"], out["bbox_regression"]


class BackboneOutputs(nn.Module):
    """The backbone alone (ResNet body + FPN): normalised images -> the pyramid's feature maps, for timings."""

    def __init__(self, detector: RetinaNet):
        super().__init__()
        self.backbone = detector.backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(images).values())


PARTS = {"network": HeadOutputs, "backbone": BackboneOutputs}  # what a file holds: backbone + head, or the backbone


def _graph(model: RetinaNet, part: str) -> nn.Module:
    if part not in PARTS:
        raise ExportError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    return PARTS[part](model).eval()


def _qdq_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A quant layer's forward with torch's fake-quant ops on the full int8 range (they export as Q/DQ)."""
    iq = self.input_quantizer
    x = torch.fake_quantize_per_tensor_affine(x, float(iq.scale), 0, -128, 127)
    w = torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale.float(),
                                               self.weight_zero_point.to(torch.int32), 0, -128, 127)
    if isinstance(self, nn.Conv2d):
        return self._conv_forward(x, w, self.bias)
    return F.linear(x, w, self.bias)


def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A quant layer's forward with float activations (weights stay on the integer grid)."""
    if isinstance(self, nn.Conv2d):
        return self._conv_forward(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


@contextmanager
def layer_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Inside: every quant layer runs "qdq" (full-range fake quant, the exported graph) or "float"."""
    forward = {"qdq": _qdq_forward, "float": _float_forward}[mode]
    layers = list(quant.quant_layers(model).values())
    for layer in layers:
        layer.forward = MethodType(forward, layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


def _torch_export(module: nn.Module, path: Path, example: torch.Tensor) -> None:
    import warnings
    names = list(OUTPUT_NAMES) if isinstance(module, HeadOutputs) else None  # the backbone's: the exporter's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is legacy
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=names,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **({n: {0: "batch"} for n in names} if names else {})},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def example_input(model: RetinaNet, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A normalised example at the detector's input size (the size the transform produces)."""
    from helpers import distill
    height, width = distill.input_size(model)
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- faithful QDQ export
def export_qdq(model: RetinaNet, path: str | Path, example: torch.Tensor | None = None, part: str = "network") -> dict:
    """Export the calibrated fake-quant detector as a QDQ ONNX file (the "faithful" placement, see the
    module docstring): int8 weight initializers, int32 biases, the calibrated scales. Checked with
    onnx.checker. Returns {"path", "bytes", "qdq_pairs", "int8_weights", "int32_biases", "convs"}."""
    import onnx
    check_exportable(model)
    graph_model = _exported(model, "qdq", part, example)
    counts = fold_weights(graph_model)
    compact_names(graph_model)
    onnx.checker.check_model(graph_model, full_check=True)
    path = _atomic_onnx(graph_model, Path(path))
    return {"path": str(path), "bytes": path.stat().st_size, **counts}


def _exported(model: RetinaNet, mode: str, part: str, example: torch.Tensor | None):
    """The ONNX proto torch's exporter writes for `part` of the model in layer `mode` ("qdq" | "float")."""
    import onnx
    example = example_input(model) if example is None else example
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), layer_mode(model, mode):
            _torch_export(_graph(model, part), raw, example)
        return onnx.load(str(raw))


def _atomic_onnx(model_proto, path: Path) -> Path:
    """What `onnx.save` writes (the serialised proto; our graphs stay far below protobuf's 2 GB), atomically."""
    return runs.atomic_write_bytes(path, model_proto.SerializeToString())


def constant_value(name: str, inits: dict, producer: dict) -> np.ndarray | None:
    """The value of a constant tensor: an initializer, a Constant node, or an Identity / Cast of one
    (the exporter dedupes equal constants through Identity and casts zero points); None otherwise."""
    from onnx import helper, numpy_helper
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producer.get(name)
    if node is None:
        return None
    if node.op_type == "Identity":
        return constant_value(node.input[0], inits, producer)
    if node.op_type == "Cast":
        source = constant_value(node.input[0], inits, producer)
        to = next(a.i for a in node.attribute if a.name == "to")
        return None if source is None else source.astype(helper.tensor_dtype_to_np_dtype(to))
    if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def fold_weights(model_proto) -> dict:
    """In place: every QuantizeLinear of a constant weight becomes an int8 initializer (its DQ stays),
    and every conv/gemm bias behind a quantized input and weight becomes an int32 initializer
    round(b / (s_x s_w)) behind a DequantizeLinear of scale s_x s_w (onnxruntime fuses a conv into
    an int8 kernel only with an int32 bias, and the file is float-sized without this)."""
    from onnx import helper, numpy_helper
    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def value(name):
        return constant_value(name, inits, producer)

    def set_init(name, array):
        if name in inits:
            graph.initializer.remove(inits[name])
        tensor = numpy_helper.from_array(array, name)
        graph.initializer.append(tensor)
        inits[name] = tensor

    removed, int8_weights, folded, renamed = [], 0, {}, {}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or value(node.input[0]) is None:
            continue
        w, scale = value(node.input[0]), value(node.input[1])
        zp = value(node.input[2])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        removed.append(node)
        key = (node.input[0], scale.tobytes())
        if key in folded:  # a head conv runs once per pyramid level: one int8 copy of its weight
            renamed[node.output[0]] = folded[key]
            continue
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.float64), -128, 127).astype(np.int8)
        set_init(node.output[0], q)
        folded[key] = node.output[0]
        int8_weights += 1
    for node in removed:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    producer = {o: n for n in graph.node for o in n.output}

    int32_biases, convs, made = 0, 0, {}
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm"):
            continue
        convs += node.op_type == "Conv"
        if len(node.input) < 3 or value(node.input[2]) is None:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        s_x, s_w = value(dq_x.input[1]), value(dq_w.input[1])
        bias = value(node.input[2]).astype(np.float64)
        bias_scale = (np.float32(s_x) * s_w.astype(np.float32)).astype(np.float32).reshape(-1)
        if bias_scale.size == 1:
            bias_scale = np.full(bias.shape, bias_scale[0], np.float32)
        key = (node.input[2], bias_scale.tobytes())
        if key not in made:  # a head conv runs once per pyramid level: one int32 bias for all of them
            base = f"{node.input[2]}_q{len(made)}"
            q = np.clip(np.rint(bias / bias_scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
            set_init(base + "_int32", q)
            set_init(base + "_scale", bias_scale)
            set_init(base + "_zero", np.zeros(bias.shape, np.int32))
            graph.node.insert(list(graph.node).index(node), helper.make_node(
                "DequantizeLinear", [base + "_int32", base + "_scale", base + "_zero"], [base + "_dq"],
                name=base + "_DequantizeLinear", axis=0))
            made[key] = base + "_dq"
        node.input[2] = made[key]
        int32_biases += 1
    used = {i for n in graph.node for i in n.input}
    for name in [n for n in inits if n not in used]:
        graph.initializer.remove(inits.pop(name))
    pairs = sum(n.op_type == "QuantizeLinear" for n in graph.node)
    return {"qdq_pairs": pairs, "int8_weights": int8_weights, "int32_biases": int32_biases, "convs": convs}


# --------------------------------------------------------------------------- reading the file back
def exported_scales(path: str | Path) -> dict:
    """Scales stored in a faithful QDQ file, by layer (module path from the node scope):
    {"activation": {layer: [scale per use]}, "weight": {layer: per-channel array}}."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    act, weight = {}, {}
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        layer = layer_of(node.name)
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if dq_x is None or dq_x.op_type != "DequantizeLinear":
            continue
        act.setdefault(layer, []).append(float(constant_value(dq_x.input[1], inits, producer)))
        weight[layer] = constant_value(dq_w.input[1], inits, producer)
    return {"activation": act, "weight": weight}


def layer_of(node_name: str) -> str:
    """"/backbone/body/layer1/layer1.0/conv1/Conv_3" -> "backbone.body.layer1.0.conv1" (TorchScript scopes)."""
    parts = node_name.strip("/").split("/")[:-1]
    out: list[str] = []
    for p in (re.sub(r"_\d+$", "", p) for p in parts):  # "conv.0.0_1": the same module called again  # a child scope repeats its parent's name: "layer1" then "layer1.0"
        if out and p.startswith(out[-1] + "."):
            out[-1] = p
        else:
            out.append(p)
    return ".".join(out)


def initializer_types(path: str | Path) -> dict:
    """Count of initializers by element type name (weights int8, biases int32: the deployed form)."""
    import onnx
    from collections import Counter
    m = onnx.load(str(path))
    return dict(Counter(onnx.TensorProto.DataType.Name(i.data_type) for i in m.graph.initializer))


# --------------------------------------------------------------------------- onnxruntime
def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None,
            level: str = "all"):
    """A CPU onnxruntime session (`threads` intra-op, sequential); `optimized_path` saves the optimized graph."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def int8_conv_count(path: str | Path) -> dict:
    """Convs of the file and how many of them onnxruntime's optimized graph (ENABLE_EXTENDED, the
    QDQ fusions; saved through SessionOptions.optimized_model_filepath) runs as int8 kernels."""
    import onnx
    from collections import Counter
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, optimized_path=optimized, level="extended")
        ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    int8 = sum(ops[o] for o in INT8_CONV_OPS)
    return {"convs": convs, "int8_convs": int8, "float_convs_left": ops["Conv"] + ops["FusedConv"],
            "leftover_quantize": ops["QuantizeLinear"], "leftover_dequantize": ops["DequantizeLinear"],
            "all_int8": convs > 0 and int8 == convs}


def run_session(sess, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cls, box = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: images.detach().cpu().numpy().astype(np.float32)})
    return torch.from_numpy(cls), torch.from_numpy(box)


@torch.inference_mode()
def torch_outputs(model: RetinaNet, images: torch.Tensor, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head outputs of the PyTorch model: as it is (None), or in "qdq" / "float" layer mode."""
    if mode is None:
        return HeadOutputs(model)(images)
    with layer_mode(model, mode):
        return HeadOutputs(model)(images)


@torch.inference_mode()
def torch_graph_outputs(model: RetinaNet, images: torch.Tensor, part: str = "network") -> tuple[torch.Tensor, ...]:
    """What the ONNX file of `part` computes, run in PyTorch (the model as it is: float or fake quant)."""
    return _graph(model, part)(images)


def output_steps(reference: Iterable[torch.Tensor]) -> tuple[float, ...]:
    """One quantization step of each raw output: max|output| / 127, the step it would have as a
    per-tensor symmetric int8 tensor (the head outputs themselves stay float)."""
    return tuple(float(t.float().abs().max()) / 127 for t in reference)


def compare_outputs(reference: Iterable[torch.Tensor], candidate: Iterable[torch.Tensor],
                    steps: tuple[float, float]) -> dict:
    """Per output: max |diff|, mean |diff|, the share of elements off by more than one step, and
    the relative L2 error ||a - b|| / ||a||."""
    out = {}
    for name, a, b, step in zip(OUTPUT_NAMES, reference, candidate, steps):
        diff = (a.float() - b.float()).abs()
        out[name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "step": step,
                     "share_over_one_step": float((diff > step).float().mean()),
                     "rel_l2": float(diff.norm() / a.float().norm().clamp_min(1e-12))}
    return out


class OnnxDetector(nn.Module):
    """torchvision's RetinaNet with backbone + head replaced by an onnxruntime session: the transform,
    anchors, decoding and NMS are the detector's own (`postprocess_detections`, `transform.postprocess`).
    Callable like the detector (list of [0, 1] images -> detections), so helpers.evaluate works."""

    def __init__(self, detector: RetinaNet, path: str | Path, threads: int = 1):
        super().__init__()
        self.detector = detector.eval()
        self.session = session(path, threads)
        self._level_shapes: dict[tuple, list[tuple[int, int]]] = {}

    def level_shapes(self, images: torch.Tensor) -> list[tuple[int, int]]:
        key = tuple(images.shape[-2:])
        if key not in self._level_shapes:  # shapes only: one float backbone pass per input size
            with torch.inference_mode():
                feats = self.detector.backbone(torch.zeros(1, *images.shape[1:]))
            self._level_shapes[key] = [tuple(f.shape[-2:]) for f in feats.values()]
        return self._level_shapes[key]

    @torch.inference_mode()
    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        det = self.detector
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, _ = det.transform(list(images))
        cls, box = run_session(self.session, image_list.tensors)
        shapes = self.level_shapes(image_list.tensors)
        features = [torch.empty(1, 1, h, w) for h, w in shapes]  # anchors need only the sizes
        anchors = det.anchor_generator(image_list, features)
        per_level = [h * w * (cls.shape[1] // sum(a * b for a, b in shapes)) for h, w in shapes]
        head = {"cls_logits": list(cls.split(per_level, dim=1)), "bbox_regression": list(box.split(per_level, dim=1))}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = det.postprocess_detections(head, split_anchors, image_list.image_sizes)
        return det.transform.postprocess(detections, image_list.image_sizes, original_sizes)


# --------------------------------------------------------------------------- onnxruntime's placement
def export_float(model: RetinaNet, path: str | Path, example: torch.Tensor | None = None, part: str = "network") -> dict:
    """FP32 ONNX of backbone + head; a fake-quant model exports with float activations and its
    on-grid weights (the input of `quantize_ort(pin_scales=True)`)."""
    import onnx
    graph_model = compact_names(_exported(model, "float", part, example))
    onnx.checker.check_model(graph_model)
    path = _atomic_onnx(graph_model, Path(path))
    return {"path": str(path), "bytes": path.stat().st_size}


def compact_names(model_proto):
    """In place, and returned: the exporter's Identity copies of constants bypassed and every internal
    tensor renamed to a short id ("t1f"). Node names (the module scopes `layer_of` reads), the graph's
    input and output names and every value stay. On the tiny detector the long tensor names are 5 % of
    an int8 file (the same bytes that are 1 % of the FP32 one): applied to every file written here, so
    sizes compare the weights, not the exporter's naming."""
    graph = model_proto.graph
    outputs = {o.name for o in graph.output}
    alias = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            graph.node.remove(node)

    def source(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name
    keep = {i.name for i in graph.input} | outputs
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return short.setdefault(name, f"t{len(short):x}")
    for node in graph.node:
        node.input[:] = [rename(source(n)) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for init in graph.initializer:
        init.name = rename(init.name)
    del graph.value_info[:]  # shape annotations of the old names (onnxruntime infers them again)
    return model_proto


class ImagesReader:
    """onnxruntime CalibrationDataReader over normalised image batches (e.g. distilled images)."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self._batches = [b.float().numpy() for b in batches]
        self._it = iter(self._batches)

    def get_next(self):
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def _unsigned_inputs(model_proto) -> set[str]:
    """Tensors known non-negative: outputs of Relu, and of MaxPool over a Relu output."""
    producer = {o: n for n in model_proto.graph.node for o in n.output}
    out = set()
    for node in model_proto.graph.node:
        if node.op_type == "Relu" or (node.op_type == "MaxPool" and producer.get(node.input[0]) is not None
                                      and producer[node.input[0]].op_type == "Relu"):
            out.add(node.output[0])
    return out


def scale_overrides(float_path: str | Path, model: RetinaNet) -> tuple[dict, dict]:
    """TensorQuantOverrides pinning each conv input of the float graph to its calibrated scale.

    Signed tensors: uint8 with zero point 128 (our int8 grid shifted by 128); ReLU outputs: zero point
    0, so onnxruntime can drop the ReLU and fuse the conv (their grid reaches 255 s, not 127 s: values
    beyond the calibrated clip are no longer clipped). A tensor feeding several convs with different
    quantizers (a block input and its downsample) gets the largest scale. Returns (overrides, report)."""
    import onnx
    proto = onnx.load(str(float_path))
    unsigned = _unsigned_inputs(proto)
    quantizers = quant.input_quantizers(model)
    scales: dict[str, list[float]] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        layer = layer_of(node.name)
        if layer in quantizers:
            scales.setdefault(node.input[0], []).append(float(quantizers[layer].scale))
    overrides = {name: [{"scale": np.array(max(s), np.float32),
                         "zero_point": np.array(0 if name in unsigned else 128, np.uint8)}]
                 for name, s in scales.items()}
    shared = sum(len(set(s)) > 1 for s in scales.values())
    return overrides, {"pinned_tensors": len(overrides), "unsigned": sum(n in unsigned for n in overrides),
                       "shared_with_two_scales": shared}


def quantize_ort(float_path: str | Path, out_path: str | Path, batches: Iterable[torch.Tensor],
                 model: RetinaNet | None = None, pin_scales: bool = False, percentile: float = 99.99) -> dict:
    """onnxruntime's `quantize_static` (QDQ, per-channel symmetric int8 weights, uint8 activations,
    percentile calibration on `batches`). pin_scales: our calibrated conv-input scales override its
    ranges (needs the calibrated `model`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    extra = {"CalibPercentile": percentile, "WeightSymmetric": True, "ActivationSymmetric": False}
    report = {}
    if pin_scales:
        if model is None:
            raise ExportError("pin_scales=True needs the calibrated fake-quant model")
        check_exportable(model)
        extra["TensorQuantOverrides"], report = scale_overrides(float_path, model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(float_path), str(out_path), ImagesReader(batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.Percentile, extra_options=extra)
    import onnx
    graph_model = compact_names(onnx.load(str(out_path)))
    onnx.checker.check_model(graph_model)
    _atomic_onnx(graph_model, out_path)
    return {"path": str(out_path), "bytes": out_path.stat().st_size, **report}


# --------------------------------------------------------------------------- narrow range
def narrow_range_effect(model: RetinaNet, images: torch.Tensor) -> dict:
    """What exporting the activations on [-128, 127] instead of the bundle's [-127, 127] changes in the
    PyTorch model's raw outputs (same scales): compare_outputs(narrow, full)."""
    narrow = torch_outputs(model, images)
    return compare_outputs(narrow, torch_outputs(model, images, "qdq"), output_steps(narrow))


# --------------------------------------------------------------------------- the whole check
def _ap(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("AP", "AP50", "APs")}


def export_all(float_model: RetinaNet, quantized: RetinaNet, calib_batches: list[torch.Tensor], workdir: str | Path,
               part: str = "network", example: torch.Tensor | None = None, percentile: float = 99.99,
               reference: bool = True) -> dict:
    """The ONNX files of one part, in `workdir`: "fp32" (the float model), "qdq" (the faithful QDQ export of
    `quantized`), "qdq_ort" (onnxruntime's Q/DQ placement carrying our calibrated scales) and, when
    `reference`, "ort_static" (onnxruntime's own quantize_static of the float model on `calib_batches`)."""
    check_exportable(quantized)
    workdir = Path(workdir)
    files = {"fp32": export_float(float_model, workdir / "fp32.onnx", example, part),
             "qdq": export_qdq(quantized, workdir / "qdq.onnx", example, part)}
    export_float(quantized, workdir / "fakequant_float.onnx", example, part)
    files["qdq_ort"] = quantize_ort(workdir / "fakequant_float.onnx", workdir / "qdq_ort.onnx", calib_batches,
                                    quantized, pin_scales=True, percentile=percentile)
    if reference:
        files["ort_static"] = quantize_ort(workdir / "fp32.onnx", workdir / "ort_static.onnx", calib_batches,
                                           percentile=percentile)
    return files


def deployment_check(float_model: RetinaNet, quantized: RetinaNet, val_set, calib_batches: list[torch.Tensor],
                     workdir: str | Path, threads: int = 2, compare_images: int = 8, percentile: float = 99.99,
                     tolerance_ap: float = 0.003) -> dict:
    """Export the calibrated `quantized` detector both ways, run the files in onnxruntime and compare
    with PyTorch: raw head outputs on the first `compare_images` val images, COCO mAP on `val_set`
    after torchvision's post-processing, int8 convs in the optimized graph, file sizes. Also
    onnxruntime's own quantize_static of `float_model` calibrated on `calib_batches` (normalised
    images, e.g. distilled) as the reference path. The .onnx files go to `workdir`."""
    from helpers import evaluate
    files = export_all(float_model, quantized, calib_batches, workdir, percentile=percentile)
    images = [val_set[i][0] for i in range(min(compare_images, len(val_set)))]
    with torch.inference_mode():
        batch = quantized.transform(images)[0].tensors
    full_range = torch_outputs(quantized, batch, "qdq")
    steps = output_steps(full_range)
    raw = {name: compare_outputs(full_range, run_session(session(files[name]["path"], threads), batch), steps)
           for name in ("qdq", "qdq_ort", "ort_static")}
    raw["narrow_vs_full_range"] = narrow_range_effect(quantized, batch)
    raw["fp32_vs_full_range"] = compare_outputs(full_range, torch_outputs(float_model, batch), steps)
    ap = {"fp32": _ap(evaluate.evaluate_detector(float_model, val_set, progress=False)),
          "fakequant": _ap(evaluate.evaluate_detector(quantized, val_set, progress=False))}
    with layer_mode(quantized, "qdq"):
        ap["fakequant_full_range"] = _ap(evaluate.evaluate_detector(quantized, val_set, progress=False))
    for name in files:
        ap[f"ort_{name}"] = _ap(evaluate.evaluate_detector(OnnxDetector(float_model, files[name]["path"], threads),
                                                           val_set, progress=False))
    gaps = {name: ap[f"ort_{name}"]["AP"] - ap["fakequant"]["AP"] for name in ("qdq", "qdq_ort", "ort_static")}
    return {"AP": ap, "AP_gap_vs_fakequant": gaps,
            "AP_within_tolerance": {k: abs(v) <= tolerance_ap for k, v in gaps.items() if k != "ort_static"},
            "tolerance_AP": tolerance_ap, "raw_outputs": raw,
            "int8_convs": {name: int8_conv_count(files[name]["path"]) for name in ("qdq", "qdq_ort", "ort_static")},
            "bytes": {name: f["bytes"] for name, f in files.items()},
            "size_ratio_vs_fp32": {name: files["fp32"]["bytes"] / f["bytes"] for name, f in files.items()},
            "pinned": {k: files["qdq_ort"][k] for k in ("pinned_tensors", "unsigned", "shared_with_two_scales")},
            "qdq_pairs": files["qdq"]["qdq_pairs"], "val_images": len(val_set), "compare_images": len(images)}


def summary_table(metrics: dict):
    """One row per model: AP, AP gap to fake quant, int8 convs / convs, file MB, size ratio (rounded)."""
    import pandas as pd
    rows = []
    for name, label in (("fp32", "PyTorch FP32"), ("fakequant", "PyTorch fake-quant W8A8"),
                        ("fakequant_full_range", "PyTorch fake-quant, [-128, 127]"), ("ort_fp32", "ORT FP32"),
                        ("ort_qdq", "ORT int8, faithful QDQ"), ("ort_qdq_ort", "ORT int8, ORT placement, our scales"),
                        ("ort_ort_static", "ORT int8, quantize_static")):
        key = name[4:] if name.startswith("ort_") else None
        convs = metrics["int8_convs"].get(key) if key else None
        rows.append({"model": label, "AP": round(metrics["AP"][name]["AP"], 3),
                     "AP_vs_fakequant": round(metrics["AP"][name]["AP"] - metrics["AP"]["fakequant"]["AP"], 3) + 0.0,  # no -0.0
                     "int8_convs": f"{convs['int8_convs']}/{convs['convs']}" if convs else "",
                     "MB": round(metrics["bytes"][key] / 1e6, 2) if key else None,
                     "size_ratio": round(metrics["size_ratio_vs_fp32"][key], 2) if key else None})
    return pd.DataFrame(rows)


def benchmark_table(result: dict):
    """`tools.benchmarks_onnx`'s stored result as one row per model, part and thread count: ORT FP32 and ORT
    int8 (its placement, our scales) milliseconds (best of the rounds), int8 over FP32 as best-of and as the
    median of paired rounds, convs run as int8, file size ratio, and whether the speed goal is met (both
    ratios at least the goal of this CPU: 2x with VNNI, 1x without)."""
    import pandas as pd
    goal = result["verdict"]["speed_goal"]
    cpu = result["cpu"]
    machine = f"{cpu['model']}, {cpu['capability']}" + (", VNNI" if result["verdict"]["vnni"] else "")
    parts = [("tiny detector", "network", result["network"]), ("tiny detector", "backbone", result["backbone"])]
    if "paper" in result:
        parts.append(("paper detector (R50-FPN v2)", "network", result["paper"]))
    rows = []
    for model, part, r in parts:
        convs = r["int8_convs"]["ort_int8_ort_placement"]
        shape = result["paper"]["input"] if model.startswith("paper") else result["setup"]["input"]
        for threads, t in r["threads"].items():
            best = t["speed_over_ort_fp32_best"]["ort_int8_ort_placement"]
            paired = t["speed_over_ort_fp32_paired_median"]["ort_int8_ort_placement"]
            rows.append({"model": model, "part": part, "input": "x".join(map(str, shape[2:])), "threads": int(threads),
                         "ORT FP32 ms": round(t["best_ms"]["ort_fp32"], 1),
                         "ORT int8 ms": round(t["best_ms"]["ort_int8_ort_placement"], 1),
                         "int8 speed, best-of": round(best, 2), "int8 speed, paired median": round(paired, 2),
                         "int8 convs": f"{convs['int8_convs']}/{convs['convs']}",
                         "size ratio": round(r["size_ratio_vs_fp32"]["ort_int8_ort_placement"], 2),
                         f"speed >= {goal:g}x": bool(min(best, paired) >= goal), "cpu": machine})
    return pd.DataFrame(rows)


def benchmark_summary(result: dict | None) -> str:
    """`benchmark_table` as text with the CPU it was measured on, or what to run when nothing is stored."""
    if result is None:
        return "no results/benchmarks/onnx.json in this results tree: measure it with `python -m tools.benchmarks_onnx`"
    table = benchmark_table(result)
    return table.drop(columns="cpu").to_string(index=False) + f"\nmeasured on: {table['cpu'].iloc[0]}"

