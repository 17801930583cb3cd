"""helpers.export: QDQ export of a tiny calibrated detector, scales read back, onnxruntime vs PyTorch,
int8 kernels in onnxruntime's optimized graph, and the errors raised before any export."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import export, models, quant

torch.set_num_threads(1)


def _randomised(seed: int = 0) -> nn.Module:
    """Tiny random detector with non-trivial norm statistics and biases (zero ones are all alike, the
    exporter then shares one constant between layers, which no trained model does)."""
    torch.manual_seed(seed)
    model = models.build_detector(models.TINY_ARCH, 4, 128, 160).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def calibrated():
    model = _randomised()
    q = quant.quantize_model(model, 8, 8)
    images = torch.randn(4, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    quant.calibrate(q, [images], normalized=True, progress=False)
    return model, q, images


@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory):
    _, q, _ = calibrated
    path = tmp_path_factory.mktemp("onnx") / "qdq.onnx"
    return export.export_qdq(q, path)


def test_export_stores_int8_weights_and_int32_biases(calibrated, exported):
    _, q, _ = calibrated
    types = export.initializer_types(exported["path"])
    n_layers = len(quant.quant_layers(q))
    assert exported["int8_weights"] == n_layers and types["INT8"] >= n_layers  # one copy per layer
    assert types.get("INT32", 0) > 0 and exported["int32_biases"] > 0
    float_bytes = sum(p.numel() for p in q.parameters()) * 4
    assert exported["bytes"] < float_bytes / 3.5  # weights one byte each, not four


def test_scales_read_back_equal_the_quantizers(calibrated, exported):
    _, q, _ = calibrated
    scales = export.exported_scales(exported["path"])
    quantizers, layers = quant.input_quantizers(q), quant.quant_layers(q)
    assert set(scales["activation"]) == set(quantizers)
    for name, used in scales["activation"].items():
        assert all(s == float(quantizers[name].scale) for s in used), name
    for name, w in scales["weight"].items():
        np.testing.assert_array_equal(w, layers[name].weight_scale.numpy())


def test_onnxruntime_matches_the_fake_quant_model(calibrated, exported):
    _, q, images = calibrated
    reference = export.torch_outputs(q, images, "qdq")
    got = export.run_session(export.session(exported["path"]), images)
    report = export.compare_outputs(reference, got, export.output_steps(reference))
    float_error = export.compare_outputs(export.torch_outputs(calibrated[0], images), reference,
                                         export.output_steps(reference))
    for name in export.OUTPUT_NAMES:
        # 1-LSB flips (float sums in another order) spread through a random net; a wrong scale or
        # graph gives errors beyond the quantization error itself
        assert report[name]["rel_l2"] < 0.9 * float_error[name]["rel_l2"], (report, float_error)
    broken = export.run_session(export.session(exported["path"]), images * 2)
    assert export.compare_outputs(reference, broken, export.output_steps(reference))["cls_logits"]["rel_l2"] > 0.05


def test_narrow_range_effect_is_measured(calibrated):
    _, q, images = calibrated
    effect = export.narrow_range_effect(q, images)
    assert 0 < effect["cls_logits"]["max_abs"] < 1.0


def test_ort_placement_runs_every_conv_in_int8(calibrated, tmp_path):
    _, q, images = calibrated
    fp32 = export.export_float(q, tmp_path / "fp32.onnx")
    pinned = export.quantize_ort(fp32["path"], tmp_path / "ort.onnx", [images[:2]], q, pin_scales=True)
    assert pinned["pinned_tensors"] > 0
    count = export.int8_conv_count(pinned["path"])
    assert count["all_int8"], count
    faithful = export.int8_conv_count(export.export_qdq(q, tmp_path / "qdq.onnx")["path"])
    assert faithful["int8_convs"] == 0  # the TensorRT-style graph: ORT cannot fuse (convs feed float BN)


def test_onnx_detector_postprocesses_like_torchvision(calibrated, tmp_path):
    model, _, _ = calibrated
    path = export.export_float(model, tmp_path / "fp32.onnx")["path"]
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    model.score_thresh = 0.0
    with torch.inference_mode():
        expected = model(images)
    got = export.OnnxDetector(model, path)(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 0
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=1e-4)


def test_bad_inputs_fail_before_export(calibrated, tmp_path):
    model, _, images = calibrated
    with pytest.raises(export.ExportError, match="not quantized"):
        export.export_qdq(model, tmp_path / "a.onnx")
    with pytest.raises(export.ExportError, match="not calibrated"):
        export.export_qdq(quant.quantize_model(model, 8, 8), tmp_path / "b.onnx")
    low = quant.quantize_model(model, 4, 8)
    quant.calibrate(low, [images[:1]], normalized=True, progress=False)
    with pytest.raises(export.ExportError, match="not representable as ONNX int8.*fake quantization only"):
        export.export_qdq(low, tmp_path / "c.onnx")
    low_a = quant.quantize_model(model, 8, 6)
    quant.calibrate(low_a, [images[:1]], normalized=True, progress=False)
    with pytest.raises(export.ExportError, match="W8A6"):
        export.export_qdq(low_a, tmp_path / "d.onnx")
    with pytest.raises(export.ExportError, match="unknown architecture"):
        export.export_qdq(quant.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), 8, 8), tmp_path / "e.onnx")
    assert not list(tmp_path.glob("*.onnx"))
