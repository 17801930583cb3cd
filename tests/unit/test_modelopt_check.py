"""helpers.modelopt_check and tools.modelopt_crosscheck: the cross-check against nvidia-modelopt.

The pure logic (config layout, range comparison, stored-row lookup) is tested always; the tests that
quantize with modelopt are skipped when the optional dependency is absent (pip install -e '.[crosscheck]').
"""
import json
import sys

import pytest
import torch

from helpers import models, modelopt_check, quant, runs, zsq
from tools import modelopt_crosscheck

torch.set_num_threads(1)


# --------------------------------------------------------------------------- pure logic
def test_config_is_int8_per_channel_weights_and_histogram_inputs():
    cfg = modelopt_check.modelopt_config(narrow_range=False, quantize_pooling=True)
    assert cfg["algorithm"] is None  # calibration runs in calibrate_percentile, with the percentile method
    entries = {(e["quantizer_name"], e.get("parent_class")): e for e in cfg["quant_cfg"]}
    assert cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    assert entries[("*weight_quantizer", None)]["cfg"] == {"num_bits": 8, "axis": 0, "narrow_range": False}
    inputs = entries[("*input_quantizer", None)]["cfg"]
    assert inputs["axis"] is None and inputs["calibrator"] == "histogram" and inputs["num_bits"] == 8
    assert entries[("*", "nn.BatchNorm2d")]["enable"] is False
    assert ("*", "nn.MaxPool2d") not in entries  # the toolkit layout quantizes pooling inputs
    matched = modelopt_check.modelopt_config(**modelopt_check.VARIANTS["matched"])
    m_entries = {(e["quantizer_name"], e.get("parent_class")): e for e in matched["quant_cfg"]}
    assert m_entries[("*", "nn.MaxPool2d")]["enable"] is False
    assert m_entries[("*input_quantizer", None)]["cfg"]["narrow_range"] is True
    with pytest.raises(ValueError, match="a_bits"):
        modelopt_check.modelopt_config(a_bits=9)


def test_compare_ranges_ratio_summary_and_unshared_layers():
    ours = {"a": 1.0, "b": 2.0, "c": 4.0, "only_ours": 1.0}
    theirs = {"a": 1.1, "b": 2.0, "c": 3.0, "pool": 5.0}
    out = modelopt_check.compare_ranges(ours, theirs)
    assert out["layers"] == 3 and out["ratio"] == pytest.approx({"a": 1.1, "b": 1.0, "c": 0.75})
    assert out["median"] == pytest.approx(1.0) and out["min"] == pytest.approx(0.75) and out["max"] == pytest.approx(1.1)
    assert out["worst_layer"] == "c" and out["worst_ratio"] == pytest.approx(0.75)
    assert out["only_ours"] == ["only_ours"] and out["only_theirs"] == ["pool"]
    assert "ratio" not in modelopt_check.summary(out) and modelopt_check.summary(out)["layers"] == 3


def test_compare_ranges_refuses_maps_without_shared_positive_layers():
    with pytest.raises(ValueError, match="share no layer"):
        modelopt_check.compare_ranges({"a": 1.0}, {"a.input_quantizer": 1.0})
    with pytest.raises(ValueError, match="positive"):
        modelopt_check.compare_ranges({"a": 0.0}, {"a": 1.0})


def test_source_ratios_are_relative_to_real():
    ranges = {"real": {"a": 1.0, "b": 2.0}, "gaussian": {"a": 3.0, "b": 2.0}}
    out = modelopt_crosscheck.source_ratios(ranges)
    assert list(out) == ["gaussian"] and out["gaussian"]["max"] == pytest.approx(3.0)
    assert out["gaussian"]["worst_layer"] == "a"


def test_missing_modelopt_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "modelopt.torch", None)
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    with pytest.raises(ImportError, match=r"\[crosscheck\]"):
        modelopt_check.require_modelopt()


def _fake_04_run(run_id: str, params: dict, rows: list[dict]):
    folder = runs.results_dir() / "04_quantize_evaluate" / run_id
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"notebook": "04_quantize_evaluate", "params": params}))
    (folder / "metrics.json").write_text(json.dumps({"artifacts": []}))
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stored_row_is_the_default_symmetric_runs_final_iteration():
    base = {"STAGE": "finetune", "SEED": 0, "DATA_ROOT": "data/tiny", "CALIBRATOR": "percentile",
            "PERCENTILE": 99.99, "SETTINGS": ["W8A8", "W8A4"], "DISTILL_LOSS": "mean", "DISTILL_CLAMP": True}
    row = {"setting": "W8A8", "batch": 0, "AP50": 0.5, "first_layer_amax": 2.0}
    _fake_04_run("dist", {**base, "SOURCE": "distilled"},
                 [{**row, "iteration": 100, "AP": 0.30}, {**row, "iteration": 0, "AP": 0.10},
                  {**row, "iteration": 100, "batch": 1, "AP": 0.20}])
    _fake_04_run("asym", {**base, "SOURCE": "distilled", "SYMMETRIC": False},
                 [{**row, "iteration": 100, "AP": 0.99, "scheme": "asymmetric"}])
    _fake_04_run("other-loss", {**base, "SOURCE": "distilled", "DISTILL_LOSS": "mean+std"},
                 [{**row, "iteration": 100, "AP": 0.77}])
    got = modelopt_check.stored_row("distilled")
    assert {k: got[k] for k in ("run", "AP", "AP50", "first_layer_amax", "batches")} == {
        "run": "dist", "AP": 0.30, "AP50": 0.5, "first_layer_amax": 2.0, "batches": 2}  # the sweep's iteration 0 is not a batch
    assert got["batch_std"] == pytest.approx(0.0707107)
    assert modelopt_check.stored_row("real") is None  # no run: nothing to compare with
    _fake_04_run("real1", {**base, "SOURCE": "real"}, [{**row, "iteration": None, "AP": 0.31}])
    assert modelopt_check.stored_row("real")["AP"] == 0.31
    _fake_04_run("real2", {**base, "SOURCE": "real"}, [{**row, "iteration": None, "AP": 0.32}])
    assert modelopt_check.stored_row("real") is None  # two candidates: no guess


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160).eval()


@pytest.fixture(scope="module")
def noise_batch():
    return zsq.gaussian_batches(1, 2, (128, 160), seed=0)[0]


def test_histogram_facts_flag_relu_inputs_and_bin_resolution(detector, noise_batch):
    q = quant.quantize_model(detector, 8, 8)
    with pytest.raises(RuntimeError, match="calibrate"):
        modelopt_check.histogram_facts(q)
    quant.calibrate(q, [noise_batch], normalized=True, progress=False)
    facts = modelopt_check.histogram_facts(q)
    assert facts["backbone.body.conv1"]["nonnegative"] is False  # N(0, 1) image
    assert facts["backbone.body.layer1.0.conv1"]["nonnegative"] is True  # after ReLU and max-pool
    # the 99.99th percentile lies below max|x|, so a bin is at least 1/2048 of the amax
    assert all(1 / 2048 <= f["bin_width"] < 0.05 for f in facts.values())


# --------------------------------------------------------------------------- with modelopt
@pytest.fixture(scope="module")
def mtq():
    return pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def toolkit(mtq, detector, noise_batch):
    return modelopt_check.modelopt_quantized(detector, noise_batch, True, variant="toolkit")


@pytest.fixture(scope="module")
def matched(mtq, detector, noise_batch):
    return modelopt_check.modelopt_quantized(detector, noise_batch, True, variant="matched")


def test_toolkit_quantizes_our_layers_plus_the_stem_max_pool(toolkit, detector):
    ours = quant.input_quantizers(quant.quantize_model(detector, 8, 8))
    types = modelopt_check.quantized_layer_types(toolkit)
    assert set(types) - set(ours) == {"backbone.body.maxpool"} and set(ours) <= set(types)
    assert types["backbone.body.maxpool"] == "QuantMaxPool2d"
    assert not toolkit.backbone.body.conv1.input_quantizer.narrow_range


def test_matched_variant_has_our_layers_and_narrow_range(matched, detector):
    ours = quant.input_quantizers(quant.quantize_model(detector, 8, 8))
    assert set(modelopt_check.modelopt_ranges(matched)) == set(ours)
    assert matched.backbone.body.conv1.input_quantizer.narrow_range


def test_weight_amax_is_the_channel_max(toolkit, detector):
    agreement = modelopt_check.weight_agreement(toolkit, detector)
    assert agreement["layers"] == len(quant.input_quantizers(quant.quantize_model(detector, 8, 8)))
    assert agreement["max_rel_diff"] < 1e-6


def test_matched_percentile_is_ours_within_the_histogram_bin(matched, detector, noise_batch):
    """With float weights in both calibration passes, the only difference left is the percentile rule
    (modelopt: the crossing bin's lower edge; ours: interpolated inside it): at most a bin or two."""
    float_weights = modelopt_check.float_weight_ranges(detector, noise_batch, True)
    q = quant.quantize_model(detector, 8, 8)
    quant.calibrate(q, [noise_batch], normalized=True, progress=False)
    facts = modelopt_check.histogram_facts(q)
    ratio = modelopt_check.compare_ranges(float_weights, modelopt_check.modelopt_ranges(matched))["ratio"]
    off = {name: (r, facts[name]["bin_width"]) for name, r in ratio.items() if abs(r - 1) > 2 * facts[name]["bin_width"] + 1e-6}
    assert not off
    assert sum(r < 1 for r in ratio.values()) > len(ratio) / 2  # the lower edge is usually below


def test_folding_weights_keeps_the_outputs(mtq, detector, noise_batch):
    q = modelopt_check.modelopt_quantized(detector, noise_batch, True, variant="toolkit")
    with torch.no_grad(), quant.skip_normalization(q):
        before = q.backbone(noise_batch)["0"].clone()
        modelopt_check.fold_for_eval(q)
        after = q.backbone(noise_batch)["0"]
    assert not q.backbone.body.conv1.weight_quantizer.is_enabled
    assert torch.allclose(before, after, atol=1e-5)


def test_calibrating_a_model_without_quantizers_fails(mtq, detector, noise_batch):
    with pytest.raises(ValueError, match="no enabled modelopt quantizers"):
        modelopt_check.calibrate_percentile(detector, noise_batch, True)
    with pytest.raises(ValueError, match="variant"):
        modelopt_check.modelopt_quantized(detector, noise_batch, True, variant="fast")


def _summary(median, low, high, worst="a", layers=2):
    return {"layers": layers, "median": median, "min": low, "max": high, "worst_layer": worst,
            "worst_ratio": low, "only_ours": [], "only_theirs": []}


def test_tables_read_the_stored_result_in_points(tmp_path):
    ratios = {"toolkit_vs_ours": _summary(1.0, 0.99, 1.01), "float_weights_vs_ours": _summary(1.0, 0.995, 1.005),
              "matched_vs_float_weights": _summary(0.9996, 0.9994, 1.0002)}
    source = {"ours": {"AP": 0.30}, "ours_float_weights": {"AP": 0.301},
              "modelopt": {"toolkit": {"AP": 0.302}, "matched": {"AP": 0.299}}, "AP_gap_toolkit_minus_ours": 0.002,
              "ratios": ratios, "stored_notebook04": {"AP": 0.30, "batch_std": 0.004}}
    result = {"sources": {"real": source, "gaussian": {**source, "stored_notebook04": None}},
              "source_vs_real": {"ours": {"gaussian": _summary(0.67, 0.26, 1.46)},
                                 "toolkit": {"gaussian": _summary(0.65, 0.26, 1.46)}}}
    path = tmp_path / "modelopt.json"
    path.write_text(json.dumps(result))
    ap = modelopt_check.ap_table(modelopt_check.load_result(str(path)))
    assert ap["source"].tolist() == ["real", "gaussian"]  # notebook 04's order, not the JSON's sorted keys
    real = ap.set_index("source").loc["real"]
    assert real["ours"] == pytest.approx(30.0) and real["modelopt toolkit"] == pytest.approx(30.2)
    assert real["toolkit - ours"] == pytest.approx(0.2) and real["notebook 04 batch std"] == pytest.approx(0.4)
    assert real["same as notebook 04"] and not ap.set_index("source").loc["gaussian"]["same as notebook 04"]
    ranges = modelopt_check.range_table(result)
    assert len(ranges) == 6 and set(ranges["source"]) == {"real", "gaussian"}
    first = ranges.iloc[0]
    assert first["min %"] == pytest.approx(-1.0) and first["max %"] == pytest.approx(1.0)
    assert modelopt_check.source_table(result)["median"].tolist() == [0.67, 0.65]
    with pytest.raises(FileNotFoundError, match="tools.modelopt_crosscheck"):
        modelopt_check.load_result(str(tmp_path / "missing.json"))
