"""helpers.export: QDQ export of a tiny calibrated detector, scales read back, onnxruntime vs PyTorch,
int8 kernels in onnxruntime's optimized graph, and the errors raised before any export."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import export, models, quant

torch.set_num_threads(1)


def _randomised(seed: int = 0) -> nn.Module:
    """Tiny random detector with non-trivial norm statistics and biases (`models.randomise_norm_layers`)."""
    torch.manual_seed(seed)
    return models.randomise_norm_layers(models.build_detector(models.TINY_ARCH, 4, 128, 160).eval())


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


def test_compact_names_keeps_every_value_and_output(exported, tmp_path):
    import onnx
    import onnxruntime as ort
    m = onnx.load(exported["path"])
    assert all(len(n) <= 8 for node in m.graph.node for n in list(node.input) + list(node.output)
               if n not in (export.INPUT_NAME, *export.OUTPUT_NAMES))
    assert not any(node.op_type == "Identity" for node in m.graph.node)
    assert any(node.name.startswith("/backbone/body/") for node in m.graph.node)  # scopes kept for layer_of
    # compacting a file twice changes nothing, and the graph still computes the same outputs
    again = tmp_path / "again.onnx"
    onnx.save(export.compact_names(onnx.load(exported["path"])), str(again))
    x = np.random.default_rng(0).standard_normal((1, 3, 128, 160)).astype(np.float32)
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {export.INPUT_NAME: x})  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(run(exported["path"]), run(again)))


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


def test_backbone_alone_exports_and_runs_like_the_fake_quant_backbone(calibrated, tmp_path):
    model, q, images = calibrated
    path = export.export_qdq(q, tmp_path / "backbone.onnx", part="backbone")["path"]
    with export.layer_mode(q, "qdq"):
        reference = export.torch_graph_outputs(q, images, "backbone")
    got = export.session(path).run(None, {export.INPUT_NAME: images.numpy()})
    assert len(got) == len(reference) == 5  # the pyramid levels
    floats = export.torch_graph_outputs(model, images, "backbone")
    for ref, out, flt in zip(reference, got, floats):
        error = (torch.from_numpy(out) - ref).norm() / ref.norm()
        assert error < 0.9 * (flt - ref).norm() / ref.norm()  # closer to the fake-quant model than float is
    with pytest.raises(export.ExportError, match="part must be one of"):
        export.export_float(model, tmp_path / "x.onnx", part="head")


def test_onnx_benchmark_measures_both_parts_side_by_side(tmp_path):
    from tools import benchmarks_onnx
    result = benchmarks_onnx.measure(repeats=1, threads=(1,), paper=False)
    for part in ("network", "backbone"):
        assert set(result[part]["threads"]["1"]["best_ms"]) == {"torch_fp32", "torch_fakequant", "ort_fp32",
                                                               "ort_int8_qdq", "ort_int8_ort_placement",
                                                               "ort_int8_quantize_static"}
        assert result[part]["bytes"]["ort_fp32"] > 3.5 * result[part]["bytes"]["ort_int8_qdq"]
        assert result[part]["int8_convs"]["ort_int8_ort_placement"]["all_int8"]
    assert result["backbone"]["bytes"]["ort_fp32"] < result["network"]["bytes"]["ort_fp32"]
    assert set(result["verdict"]["int8_speedup_measured"]) == {"tiny network", "tiny backbone"}
    table = export.benchmark_table(result)  # what make figures shows of it
    assert list(zip(table["model"], table["part"], table["threads"])) == [("tiny detector", "network", 1),
                                                                           ("tiny detector", "backbone", 1)]
    assert table["ORT FP32 ms"][0] == round(result["network"]["threads"]["1"]["best_ms"]["ort_fp32"], 1)
    goal = result["verdict"]["speed_goal"]
    assert list(table[f"speed >= {goal:g}x"]) == [min(result[p]["threads"]["1"]["speed_over_ort_fp32_best"]["ort_int8_ort_placement"],
                                                      result[p]["threads"]["1"]["speed_over_ort_fp32_paired_median"]["ort_int8_ort_placement"]) >= goal
                                                  for p in ("network", "backbone")]


def test_the_paper_detector_benchmark_exports_times_and_runs_every_conv_in_int8():
    from tools import benchmarks_onnx
    result = benchmarks_onnx.paper_detector(repeats=1, threads=(1,), shape=(1, 3, 64, 96))
    assert result["arch"] == "retinanet_resnet50_fpn_v2" and result["input"] == [1, 3, 64, 96]
    assert result["int8_convs"]["ort_int8_ort_placement"]["all_int8"]  # onnxruntime took every constant (none shared)
    assert result["int8_convs"]["ort_int8_ort_placement"]["convs"] > 100
    assert result["size_ratio_vs_fp32"]["ort_int8_qdq"] > 3.9
    assert set(result["threads"]["1"]["best_ms"]) == {"torch_fp32", "ort_fp32", "ort_int8_ort_placement"}


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


def test_a_results_tree_without_the_benchmark_says_what_to_run(tmp_path, monkeypatch):
    from helpers import store
    monkeypatch.setenv("IRZSQ_RESULTS_DIR", str(tmp_path))
    assert store.benchmark("onnx", missing_ok=True) is None
    with pytest.raises(store.MissingResults, match="tools.benchmarks_onnx"):
        store.benchmark("onnx")
    assert "python -m tools.benchmarks_onnx" in export.benchmark_summary(None)
