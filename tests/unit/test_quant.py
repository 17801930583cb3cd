"""helpers.quant: rounding, per-channel weights, calibrators against independent numpy references,
whole-RetinaNet wrapping, normalised (distilled) inputs, sizes and early errors."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from helpers import models, quant

torch.set_num_threads(1)


# --------------------------------------------------------------------------- fixtures and references
def heavy_tailed_batches(seed: int = 0, n: int = 20000) -> list[torch.Tensor]:
    """ReLU-like mass plus exponential tails, 30% negated; later batches have larger maxima so the
    running histogram has to grow (re-bin) several times."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1.0, 0.5, 3.0, 1.0, 7.0):
        u = torch.rand(n, generator=g).clamp_min(1e-12)
        sign = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)
        body = torch.where(torch.rand(n, generator=g) < 0.8, torch.randn(n, generator=g).relu(), -u.log())
        out.append(body * sign * scale)
    return out


def filled(batches, num_bins=512, signed=False) -> quant.RunningHistogram:
    hist = quant.RunningHistogram(num_bins, signed=signed)
    for b in batches:
        hist.update(b)
    return hist


def true_mse(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    scale, zp = quant.qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    qmin, qmax = quant.int_range(bits, symmetric)
    return (torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax) - x).pow(2).mean().item()


def trt_entropy_reference(hist: np.ndarray, edges: np.ndarray, num_bits: int, start_bin: int = 128):
    """A literal port of pytorch-quantization's `_compute_amax_entropy` loops (scipy's entropy
    written out): returns (amax, {candidate bin: KL})."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1)
    divergences = {}
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        counts = np.zeros(nbins)
        for idx, d in enumerate(digitized):
            if d != -1:
                counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                counts[key] /= val
        q = np.array([counts[d] if d != -1 else 0.0 for d in digitized])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        divergences[i] = math.inf if np.any(q[m] == 0) else float(np.sum(p[m] * np.log(p[m] / q[m])))
    keys = list(divergences)
    values = np.array([divergences[k] for k in keys])
    last_argmin = len(values) - 1 - int(np.argmin(values[::-1]))
    return float(edges[keys[last_argmin]]), divergences


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160).eval()


@pytest.fixture(scope="module")
def pixel_batches():
    g = torch.Generator().manual_seed(1)
    return [[torch.rand(3, 128, 160, generator=g) for _ in range(4)] for _ in range(2)]


@pytest.fixture(scope="module")
def w8a8(tiny, pixel_batches):
    q = quant.quantize_model(tiny, 8, 8, calibrator="percentile")
    info = quant.calibrate(q, pixel_batches, progress=False)
    return q, info


def features(model, images):
    with torch.inference_mode():
        batch, _ = model.transform(images)
        feats = model.backbone(batch.tensors)
        cls, reg = model.head.classification_head(list(feats.values())), model.head.regression_head(list(feats.values()))
    return torch.cat([f.flatten() for f in feats.values()]), cls, reg


# --------------------------------------------------------------------------- rounding
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_error_bound_levels_and_torch_equality(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(50000, generator=g) * 2 + 0.3
    lo, hi = -1.5, 2.5
    scale, zp = quant.qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    with torch.no_grad():
        y = quant.fake_quant_per_tensor(x, scale, zp, bits, symmetric)
    qmin, qmax = quant.int_range(bits, symmetric)
    # our in-place path is bit for bit torch's kernel
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax))
    inside = (x >= lo) & (x <= hi) if not symmetric else x.abs() <= max(abs(lo), abs(hi))
    assert inside.sum() > 1000
    assert (y - x)[inside].abs().max() <= scale / 2 * (1 + 1e-5)
    levels = torch.unique(y).numel()
    assert levels <= 2 ** bits and levels >= 2 ** bits - 2
    if symmetric:
        assert levels <= 2 ** bits - 1 and int(zp) == 0
        assert scale.item() == pytest.approx(2.5 / (2 ** (bits - 1) - 1))
    else:  # paper Formula 1: s = (c - a) / (2^k - 1), z = -round(a / s) - 2^(k-1); zero stays exact
        assert scale.item() == pytest.approx(4.0 / (2 ** bits - 1))
        assert int(zp) == -round(lo / scale.item()) - 2 ** (bits - 1)
        assert quant.fake_quant_per_tensor(torch.zeros(1), scale, zp, bits, False).item() == 0.0
        assert y.min() >= lo - scale / 2 and y.max() <= hi + scale / 2


def test_weight_scales_are_per_channel_max_over_qmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-2, 1, 16)[:, None, None, None]
    w_q, scale, zp = quant.quantize_weight(w, 8, symmetric=True, method="max")
    amax = w.abs().flatten(1).amax(1)
    torch.testing.assert_close(scale, amax / 127)
    assert torch.all(zp == 0)
    # per channel: error within half a step, and the channel max is representable exactly
    err = (w_q - w).abs().flatten(1).amax(1)
    assert torch.all(err <= scale / 2 * (1 + 1e-5))
    torch.testing.assert_close(w_q.abs().flatten(1).amax(1), amax)
    for bits in (2, 4):
        w_q, scale, zp = quant.quantize_weight(w, bits, symmetric=True)
        assert max(torch.unique(c).numel() for c in w_q) <= 2 ** bits - 1
    w_q, scale, zp = quant.quantize_weight(w, 4, symmetric=False)
    lo, hi = w.flatten(1).amin(1).clamp(max=0), w.flatten(1).amax(1).clamp(min=0)
    torch.testing.assert_close(scale, (hi - lo) / 15)
    assert max(torch.unique(c).numel() for c in w_q) <= 16


def test_mse_weight_calibrator_beats_max_at_low_bits():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    err_max = (quant.quantize_weight(w, 3, method="max")[0] - w).pow(2).sum()
    err_mse = (quant.quantize_weight(w, 3, method="mse")[0] - w).pow(2).sum()
    assert err_mse < 0.95 * err_max  # the max range is one of its candidates, so never worse


# --------------------------------------------------------------------------- histogram and calibrators
@pytest.mark.parametrize("signed", [False, True])
def test_running_histogram_regrows_exactly(signed):
    batches = heavy_tailed_batches()
    hist = filled(batches, 512, signed)
    x = torch.cat(batches).double().numpy()
    top = np.abs(x).max()
    assert top <= hist.range < 2 * top  # grown by doubling from the first batch's max
    assert hist.counts.numel() == (1024 if signed else 512)  # memory fixed by num_bins
    ref, _ = np.histogram(x if signed else np.abs(x), bins=hist.edges())
    assert hist.total == len(x)
    assert np.abs(ref - hist.counts.numpy()).sum() <= 10  # only float ties at bin edges differ
    assert hist.max == x.max() and hist.min == x.min()


def test_max_and_percentile_calibrators_match_numpy():
    batches = heavy_tailed_batches()
    x = torch.cat(batches).double().numpy()
    hist = filled(batches, 2048)
    width = hist.range / hist.num_bins
    assert quant.histogram_range(hist, "max", 8, True)[1] == np.abs(x).max()
    for p in (99.99, 99.9, 99.0):
        amax = quant.histogram_range(hist, "percentile", 8, True, percentile=p)[1]
        assert abs(amax - np.percentile(np.abs(x), p)) <= width
    signed = filled(batches, 2048, signed=True)
    width = signed.range / signed.num_bins * 2
    assert quant.histogram_range(signed, "max", 8, False) == (x.min(), x.max())
    lo, hi = quant.histogram_range(signed, "percentile", 8, False, percentile=99.99)
    ref_lo, ref_hi = np.percentile(x, [0.01, 99.99])
    assert abs(lo - ref_lo) <= width and abs(hi - ref_hi) <= width


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_calibrator_minimises_true_error(bits, symmetric):
    batches = heavy_tailed_batches()
    x = torch.cat(batches)
    hist = filled(batches, 2048, signed=not symmetric)
    errors = {c: true_mse(x, *quant.histogram_range(hist, c, bits, symmetric), bits, symmetric)
              for c in ("max", "percentile", "mse")}
    assert errors["mse"] <= errors["max"] and errors["mse"] <= errors["percentile"]


def test_entropy_calibrator_is_tensorrts_kl_search():
    batches = heavy_tailed_batches()
    hist = filled(batches, 512)
    counts, edges = hist.counts.numpy(), hist.edges()
    amax = quant.histogram_range(hist, "entropy", 8, True)[1]
    assert 0 < amax <= hist.absmax + (edges[1] - edges[0])
    stop = int(np.flatnonzero(counts)[-1]) + 1  # TensorRT's histogram ends at the max
    ref_amax, kl = trt_entropy_reference(counts[:stop], edges[:stop + 1], 8)
    assert amax == pytest.approx(ref_amax)
    chosen = int(round(amax / (edges[1] - edges[0])))
    for other in (stop, stop // 2, int(np.searchsorted(np.cumsum(counts) / counts.sum(), 0.9999)) + 1):
        if other in kl:
            assert kl[chosen] <= kl[other] + 1e-12
    assert amax < hist.absmax  # heavy tails: KL clips them


@pytest.mark.parametrize("shape", ["heavy tail", "ReLU zeros", "sparse bins", "histogram past the max"])
@pytest.mark.parametrize("bits", [8, 4])
def test_vectorised_entropy_search_picks_the_reference_loops_threshold(shape, bits):
    rng = np.random.default_rng(len(shape) * bits)
    x = np.abs(rng.standard_t(3, size=20000))
    if shape == "ReLU zeros":
        x = np.maximum(x - 1, 0)
    top = x.max() * (2 if shape == "histogram past the max" else 1)
    counts = np.histogram(x, bins=384, range=(0, top))[0].astype(float)
    if shape == "sparse bins":
        counts[::7] = 0
    edges = np.linspace(0, top, 385)
    stop = int(np.flatnonzero(counts)[-1]) + 1
    assert quant.entropy_amax(counts, edges, bits) == trt_entropy_reference(counts[:stop], edges[:stop + 1], bits)[0]


# --------------------------------------------------------------------------- whole model
def test_every_conv_of_the_tiny_retinanet_is_quantized(tiny, w8a8):
    q, info = w8a8
    convs = [n for n, m in tiny.named_modules() if isinstance(m, nn.Conv2d)]
    layers = quant.quant_layers(q)
    assert len(convs) == 38 and list(layers) == convs  # backbone 20, FPN 8, heads 10
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())
    assert not quant.quant_layers(tiny)  # the float model is untouched
    assert info["layers"] == 38 and info["images"] == 8 and info["batches"] == 2
    for name, layer in layers.items():
        float_weight = tiny.get_submodule(name).weight
        shape = (-1,) + (1,) * (float_weight.dim() - 1)
        torch.testing.assert_close(layer.weight_scale, float_weight.abs().flatten(1).amax(1) / 127)
        # the weight is stored already quantized: it is exactly integers times the channel scale
        torch.testing.assert_close(layer.weight, layer.int_weight().float() * layer.weight_scale.reshape(shape))
        assert layer.int_weight().dtype == torch.int8


def test_w8a8_is_close_to_fp32_and_w2a2_is_not(tiny, w8a8, pixel_batches):
    q8, _ = w8a8
    q2 = quant.quantize_model(tiny, 2, 2, calibrator="max")
    quant.calibrate(q2, pixel_batches, progress=False)
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    ref = features(tiny, images)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    # random weights amplify rounding noise; the small random regression outputs are the noisiest
    for got, want, bound in zip(features(q8, images), ref, (0.05, 0.05, 0.1)):
        assert rel(got, want) < bound
    assert rel(features(q2, images)[0], ref[0]) > 0.3
    with torch.inference_mode():
        out = q8(images)  # the full detector API still works
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


def test_uncalibrated_activations_refuse_to_run(tiny):
    q = quant.quantize_model(tiny, 8, 8)
    with pytest.raises(RuntimeError, match="calibrate"):
        with torch.inference_mode():
            q([torch.rand(3, 128, 160)])
    weight_only = quant.quantize_model(tiny, 4, None)
    with torch.inference_mode():
        weight_only([torch.rand(3, 128, 160)])
    assert not quant.input_quantizers(weight_only)


def test_set_ranges_switches_calibrator_without_new_data(w8a8):
    q, info = w8a8
    before = info["ranges"]
    maxed = quant.set_ranges(q, "max")["ranges"]
    assert all(maxed[k][1] >= before[k][1] for k in before)
    assert any(maxed[k][1] > before[k][1] for k in before)
    again = quant.set_ranges(q, "percentile", 99.99)["ranges"]
    assert again == before


def test_normalised_images_reach_the_first_conv_unchanged(tiny):
    q = quant.quantize_model(tiny, 8, 8, calibrator="max")
    distilled = torch.randn(4, 3, 128, 160, generator=torch.Generator().manual_seed(2)) * 3
    quant.calibrate(q, distilled.split(2), progress=False, normalized=True)
    first = quant.input_quantizers(q)["backbone.body.conv1"]
    assert first.hist.max == distilled.max().item() and first.hist.min == distilled.min().item()
    assert q.transform.image_mean == tiny.transform.image_mean  # restored after calibration
    pixels = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(3))
    quant.calibrate(q, [pixels], progress=False)
    mean, std = torch.tensor(tiny.transform.image_mean), torch.tensor(tiny.transform.image_std)
    expected = ((pixels - mean[:, None, None]) / std[:, None, None]).abs().max().item()
    assert first.hist.absmax == pytest.approx(expected, rel=1e-6)


def test_loader_batches_and_layer_overrides(tiny):
    q = quant.quantize_model(tiny, 8, 8, layer_bits={"head.classification_head.cls_logits": (4, 6)},
                             exclude=["backbone.body.conv1"])
    assert isinstance(q.backbone.body.conv1, nn.Conv2d) and not isinstance(q.backbone.body.conv1, quant.QuantConv2d)
    logits = q.head.classification_head.cls_logits
    assert logits.w_bits == 4 and logits.input_quantizer.bits == 6
    targets = ({"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)})
    info = quant.calibrate(q, [((torch.rand(3, 128, 160), torch.rand(3, 128, 160)), targets)], progress=False)
    assert info["images"] == 2 and info["layers"] == 37


def test_model_size_is_about_a_quarter(tiny, w8a8):
    q, _ = w8a8
    report = quant.size_report(tiny, q)
    assert report["fp32_mib"] == pytest.approx(quant.model_size(tiny), rel=0.02)
    assert 3.8 < report["ratio"] <= 4.0
    q4 = quant.quantize_model(tiny, 4, None)
    packed = quant.size_report(tiny, q4)
    assert 7.0 < packed["packed_ratio"] <= 8.0
    state = quant.integer_state_dict(q)
    assert state["backbone.body.layer1.0.conv1.weight"].dtype == torch.int8


def test_one_model_size_counts_every_parameter_at_its_width():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=False))
    n = {"0": 8 * 3 * 9, "2": 4 * 8}  # conv weights; the rest: conv 0 bias (8), BN weight and bias (16)
    assert quant.model_size(net) == (n["0"] + n["2"] + 24) * 32 / 8 / 2 ** 20
    assert quant.model_size(net, bits=8) == quant.model_size(net) / 4  # every parameter at 8 bits
    mixed = quant.model_size(net, {"0": "ternary", "2": 6}, unit="KiB")
    assert mixed == (n["0"] * 2 + n["2"] * 6 + 24 * 32) / 8 / 1024
    assert quant.model_size(net, {"0": "fp32", "2": None}) == quant.model_size(net)
    assert quant.model_size(net, {"2": 4}, weights_only=True) == n["2"] * 4 / 8 / 2 ** 20
    assert quant.size_in(8 * 1024, "KiB") == 1.0 and quant.storage_bits("ternary") == 2
    with pytest.raises(ValueError, match="no layers with a weight named"):
        quant.model_size(net, {"1.nope": 4})
    with pytest.raises(ValueError, match="unit must be one of"):
        quant.size_in(8, "MB")


def test_bit_packing_round_trips():
    ints = torch.randint(-7, 8, (1000,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = quant._pack_bits(ints, 4, -7)
    assert packed.numel() == 500
    bits = np.unpackbits(packed.numpy(), bitorder="little").reshape(-1, 4)
    values = (bits * (1 << np.arange(4))).sum(1) - 7
    assert np.array_equal(values, ints.numpy())


# --------------------------------------------------------------------------- DF-MPC's layer-wise weight quantizers
def test_twn_and_uniform_quantizers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g)
    q = quant.twn_quantize(w)
    delta = 0.7 * w.abs().mean()
    alpha = w.abs()[w.abs() > delta].mean()
    assert set(q.unique().tolist()) == {-float(alpha), 0.0, float(alpha)}
    assert torch.equal(q == 0, w.abs() <= delta)
    u = quant.uniform_quantize(w, 6)
    assert u.unique().numel() <= 64 and (u - w).abs().max() <= w.abs().max() / 63 + 1e-6
    grid = (u / w.abs().max() + 1) * 63 / 2  # levels on 0..63, no exact zero (spec 2.2)
    assert torch.allclose(grid, grid.round(), atol=1e-4) and not bool((u == 0).any())


@pytest.mark.parametrize("bad", [1, 9, 0, 2.5, "4", True, None])
def test_bad_bit_width_raises(bad):
    with pytest.raises(ValueError):
        quant.check_bits(bad)
    with pytest.raises(ValueError):
        quant.uniform_quantize(torch.ones(3), bad)
    with pytest.raises(ValueError):
        quant.check_bits("binary", ternary=True)
    assert quant.check_bits("ternary", ternary=True) == "ternary"
    with pytest.raises(ValueError):
        quant.check_bits("ternary")  # high bit width must be an int


def test_layerwise_quantize_picks_ternary_or_uniform():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(quant.layerwise_quantize(w, "ternary"), quant.twn_quantize(w))
    assert torch.equal(quant.layerwise_quantize(w, 3), quant.uniform_quantize(w, 3))
    with pytest.raises(ValueError, match='"ternary" or an integer in 2..8'):
        quant.layerwise_quantize(w, "binary")


# --------------------------------------------------------------------------- errors before work
class _Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the model was touched ({name}) before the arguments were checked")


@pytest.mark.parametrize("kwargs, message", [
    ({"w_bits": 1}, "w_bits"), ({"w_bits": 9}, "w_bits"), ({"a_bits": 16}, "a_bits"), ({"w_bits": 8.0}, "w_bits"),
    ({"calibrator": "kl"}, "calibrator"), ({"calibrator": "entropy", "symmetric": False}, "symmetric"),
    ({"percentile": 101}, "percentile"), ({"weight_calibrator": "percentile"}, "weight_calibrator"),
])
def test_bad_arguments_fail_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize_model(_Untouchable(), **kwargs)


def test_a_setting_is_parsed_and_checked_once():
    s = quant.QuantSetting.parse("W4A8", calibrator="mse", percentile=99.9, symmetric=False)
    assert (s.w_bits, s.a_bits, s.calibrator, s.percentile, s.symmetric) == (4, 8, "mse", 99.9, False)
    assert (s.name, s.scheme) == ("W4A8", "asymmetric") and quant.QuantSetting.parse("W8A8").scheme == "symmetric"
    assert quant.QuantSetting.of(s) is s and quant.QuantSetting.of("W4A8") == quant.QuantSetting(4, 8)
    with pytest.raises(AttributeError):
        s.w_bits = 8  # frozen: a checked setting stays checked


@pytest.mark.parametrize("bad, message", [
    ("W9A8", "weight bits of W9A8 must be an integer in 2..8, got 9"),
    ("W8A1", "activation bits of W8A1 must be an integer in 2..8, got 1"),
    ("8/8", "bit setting must look like 'W8A8'"), ("W8", "bit setting"), ("w8a8", "bit setting"), (8, "bit setting"),
    ("W16A16", "bit setting"),
])
def test_bad_bit_settings_name_the_setting(bad, message):
    with pytest.raises(ValueError, match=message):
        quant.QuantSetting.parse(bad)


@pytest.mark.parametrize("kwargs, message", [({"calibrator": "kl"}, "calibrator must be one of"),
                                             ({"calibrator": "entropy", "symmetric": False}, "symmetric"),
                                             ({"percentile": 40}, "percentile must be in")])
def test_bad_calibration_of_a_setting_fails_when_it_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.QuantSetting.parse("W8A8", **kwargs)


def test_a_setting_quantizes_like_quantize_model(tiny):
    s = quant.QuantSetting.parse("W4A6", calibrator="max", symmetric=False)
    got, want = s.quantize(tiny), quant.quantize_model(tiny, 4, 6, "max", 99.99, False)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    layer = next(iter(quant.quant_layers(got).values()))
    assert (layer.w_bits, layer.input_quantizer.bits, layer.symmetric, layer.input_quantizer.calibrator) == (4, 6, False, "max")


def test_bad_calibrate_arguments_fail_before_the_data_pass(w8a8, tiny):
    q, _ = w8a8

    def never():
        raise AssertionError("data consumed")
        yield

    with pytest.raises(ValueError, match="calibrator"):
        quant.calibrate(q, never(), calibrator="median")
    with pytest.raises(ValueError, match="no conv/linear layers named"):
        quant.quantize_model(tiny, layer_bits={"nope": (8, 8)})
    with pytest.raises(ValueError, match="w_bits of"):
        quant.quantize_model(tiny, layer_bits={"backbone.body.conv1": (12, 8)})


def test_calibrate_from_a_loader_then_evaluate_like_fp32(tiny_root, tiny):
    from helpers import data, evaluate
    val = data.CocoDetectionSet(tiny_root, "flir", "val", classes=data.FLIR_CLASSES)
    q = quant.quantize_model(tiny, 8, 8)
    info = quant.calibrate(q, data.make_loader(val, 3, train=False), progress=False)
    assert info["images"] == len(val) == 6
    metrics = evaluate.evaluate_detector(q, val, batch_size=3, progress=False)
    assert set(evaluate.STAT_NAMES) <= set(metrics) and metrics["detections"] >= 0


def test_linear_layers_and_plain_networks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    q = quant.quantize_model(net, 8, 8, calibrator="mse")
    assert isinstance(q[4], quant.QuantLinear) and isinstance(q[0], quant.QuantConv2d)
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    info = quant.calibrate(q, x.split(4), progress=False)  # Nx3xHxW batches, no detector transform
    assert info["images"] == 16 and info["layers"] == 2
    torch.testing.assert_close(q[4].weight_scale, net[4].weight.abs().amax(1) / 127)
    with torch.inference_mode():
        assert ((q(x) - net(x)).norm() / net(x).norm()).item() < 0.02
