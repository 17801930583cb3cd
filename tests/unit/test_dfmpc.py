"""helpers.dfmpc: DF-MPC closed form, pairing and folding (spec section 7); its quantizers are tested in test_quant."""
import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from helpers import dfmpc, models, quant

torch.set_num_threads(1)


def random_bn(c: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def scaled_weight(o: int, i: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Filters whose scales vary per channel by e^U(-1,1), as in spec 7.6."""
    return torch.randn(o, i, k, k, generator=g) * 0.1 * torch.exp(torch.rand(o, 1, 1, 1, generator=g) * 2 - 1)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            fresh = random_bn(m.num_features, g)
            m.load_state_dict(fresh.state_dict())
    return model.eval()


def test_compensate_validates_before_touching_the_model():
    model = torchvision.models.resnet18(weights=None)
    before = copy.deepcopy(model.state_dict())
    for kwargs in ({"high_bits": 9}, {"low_bits": 1}, {"low_bits": "binary"}, {"mode": "x"}, {"apply": "relu"},
                   {"lambda1": -0.1}, {"lambda2": -1e-3}, {"lambda1": float("nan")}):
        with pytest.raises(ValueError):
            dfmpc.compensate(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- closed form
def test_identity_gives_one():
    g = torch.Generator().manual_seed(1)
    w, bn = scaled_weight(16, 8, 3, g), random_bn(16, g)
    for lam1 in (0.0, 0.5, 2.0):
        c = dfmpc.compensation_coefficients(w, w, bn, lam1, 0.0)
        assert c.dtype == torch.float64 and torch.allclose(c, torch.ones(16, dtype=torch.float64), atol=1e-12)
    c = dfmpc.compensation_coefficients(w, w, bn, 0.5, 0.01)
    assert bool((c < 1).all())


def test_closed_form_is_the_least_squares_minimiser():
    g = torch.Generator().manual_seed(2)
    w, bn = scaled_weight(12, 6, 3, g), random_bn(12, g)
    w_hat = quant.twn_quantize(w)
    lam1, lam2 = 0.5, 0.01
    c = dfmpc.compensation_coefficients(w, w_hat, bn, lam1, lam2)
    # independent solution: per channel, lstsq of the stacked residual [x_hat; sqrt(l1) y; sqrt(l2)] c = [x; sqrt(l1) y; 0]
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    gj = bn.weight.detach().double() / sigma
    y = bn.bias.detach().double() - gj * bn.running_mean.double()
    for j in range(12):
        a = torch.cat([gj[j] * w_hat[j].double().flatten(), (math.sqrt(lam1) * y[j]).view(1), torch.tensor([math.sqrt(lam2)], dtype=torch.float64)])
        b = torch.cat([gj[j] * w[j].double().flatten(), (math.sqrt(lam1) * y[j]).view(1), torch.zeros(1, dtype=torch.float64)])
        sol = torch.linalg.lstsq(a[:, None], b[:, None]).solution.item()
        assert sol == pytest.approx(float(c[j]), rel=1e-10)
    # the analytic gradient of Eq. 23 vanishes at c*, and perturbations never lower the loss
    cc = c.clone().requires_grad_(True)
    x, xh = gj[:, None] * w.double().flatten(1), gj[:, None] * w_hat.double().flatten(1)
    loss = ((cc[:, None] * xh - x) ** 2).sum() + lam1 * ((cc * y - y) ** 2).sum() + lam2 * (cc ** 2).sum()
    loss.backward()
    assert cc.grad.abs().max() < 1e-10
    best = dfmpc.filter_space_loss(w, w_hat, bn, c, lam1, lam2)
    assert best == pytest.approx(float(loss.detach()), rel=1e-12)
    for _ in range(20):
        assert dfmpc.filter_space_loss(w, w_hat, bn, c + 0.05 * torch.randn(12, generator=g, dtype=torch.float64),
                                       lam1, lam2) > best
    assert best < dfmpc.filter_space_loss(w, w_hat, bn, 1.0, lam1, lam2)


def test_twn_limit_is_per_channel_alpha_over_alpha():
    g = torch.Generator().manual_seed(3)
    w, bn = scaled_weight(16, 8, 3, g), random_bn(16, g)
    c = dfmpc.compensation_coefficients(w, quant.twn_quantize(w), bn, 0.0, 0.0)
    delta = 0.7 * w.abs().mean()
    alpha = float(quant.twn_scale(w))
    checked = 0
    for j in range(16):
        keep = w[j].abs() > delta
        if keep.any():
            assert float(c[j]) == pytest.approx(float(w[j].abs()[keep].double().mean()) / alpha, rel=1e-6)
            checked += 1
    assert checked >= 12 and float(c.std()) > 0.05  # per-channel scales really differ


def test_scale_absorbed_into_bn_gives_same_c():
    g = torch.Generator().manual_seed(4)
    w, bn = scaled_weight(16, 8, 3, g), random_bn(16, g)
    w_hat = quant.twn_quantize(w)
    alpha = float(quant.twn_scale(w))
    bn_hat = copy.deepcopy(bn).double()  # (T, mu/alpha, sigma/alpha)
    with torch.no_grad():
        bn_hat.running_mean.copy_(bn.running_mean.double() / alpha)
        bn_hat.running_var.copy_((bn.running_var.double() + bn.eps) / alpha ** 2 - bn.eps)
    c1 = dfmpc.compensation_coefficients(w, w_hat, bn, 0.5, 0.0)
    c2 = dfmpc.compensation_coefficients(w, w_hat.double() / alpha, bn, 0.5, 0.0, bn_hat=bn_hat)
    assert torch.allclose(c1, c2, rtol=1e-5)


def test_degenerate_filter_gives_one_without_nan():
    g = torch.Generator().manual_seed(5)
    w, bn = torch.randn(4, 3, 3, 3, generator=g), random_bn(4, g)
    w[2] *= 1e-4  # far below the layer-wise threshold: ternarizes to all zeros
    w_hat = quant.twn_quantize(w)
    assert bool((w_hat[2] == 0).all())
    c = dfmpc.compensation_coefficients(w, w_hat, bn, 0.0, 0.0)
    assert torch.isfinite(c).all() and float(c[2]) == 1.0 and bool((c[[0, 1, 3]] != 1).all())
    assert torch.isfinite(dfmpc.compensation_coefficients(torch.zeros(4, 3, 3, 3), torch.zeros(4, 3, 3, 3), bn, 0, 0)).all()


# --------------------------------------------------------------------------- folding and error reduction
def small_net(seed: int) -> nn.Sequential:
    """conv(16->32) -> BN -> ReLU -> conv(32->32), BN statistics measured on random post-ReLU input (spec 7.6)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(scaled_weight(32, 16, 3, g))
        net[3].weight.copy_(torch.randn(32, 32, 3, 3, generator=g) * 0.05)
        net[1].weight.copy_(torch.rand(32, generator=g) + 0.5)
        net[1].bias.copy_(torch.randn(32, generator=g) * 0.3)
        net[1].momentum = None  # cumulative average
        net.train()
        for _ in range(4):
            net(torch.relu(torch.randn(16, 16, 12, 12, generator=g)))
    return net.eval()


def test_folding_into_bn_equals_weight_side_small_net():
    net = small_net(0)
    x = torch.relu(torch.randn(4, 16, 12, 12, generator=torch.Generator().manual_seed(9)))
    outs = {}
    for apply in ("bn", "weight"):
        q = copy.deepcopy(net)
        r = dfmpc.compensate_pair(q[0], q[1], q[3], apply=apply)
        outs[apply] = q(x)
    assert abs(r["mean_c"] - 1) > 1e-3  # c is not trivially 1
    assert torch.allclose(outs["bn"], outs["weight"], atol=1e-5, rtol=1e-4)


def test_folding_into_bn_equals_weight_side_resnet18():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra, rb = dfmpc.compensate(a, apply="bn"), dfmpc.compensate(b, apply="weight")
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ra["loss_compensated"] == rb["loss_compensated"]
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4 * float(ya.abs().max()))
    n = copy.deepcopy(model)
    dfmpc.compensate(n, mode="naive")
    assert not torch.allclose(n(x), ya, rtol=1e-3, atol=1e-3 * float(ya.abs().max()))  # compensation did something


@pytest.mark.parametrize("seed", range(5))
def test_compensation_lowers_output_error(seed):
    net = small_net(seed)
    x = torch.relu(torch.randn(8, 16, 12, 12, generator=torch.Generator().manual_seed(100 + seed)))
    with torch.no_grad():
        ref = net(x)
    err = {}
    for mode in ("naive", "dfmpc"):
        q = copy.deepcopy(net)
        dfmpc.compensate_pair(q[0], q[1], q[3], mode=mode, lambda1=0.5, lambda2=0.0)
        with torch.no_grad():
            err[mode] = float(((q(x) - ref) ** 2).mean() / (ref ** 2).mean())
    assert err["dfmpc"] < 0.95 * err["naive"], err


# --------------------------------------------------------------------------- pairing and whole models
@pytest.mark.parametrize("name,expected,pair", [
    ("resnet18", 8, ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2")),
    ("resnet50", 16, ("layer1.0.conv2", "layer1.0.bn2", "layer1.0.conv3")),
    ("tiny_body", 8, ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2")),
])
def test_pairing_counts(name, expected, pair):
    if name == "tiny_body":
        model = models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160).backbone.body
    else:
        model = getattr(torchvision.models, name)(weights=None)
    pairs = dfmpc.find_pairs(model)
    assert len(pairs) == expected and (pairs[0].low, pairs[0].bn, pairs[0].high) == pair
    assert not any("downsample" in p.low or "downsample" in p.high for p in pairs)


def test_compensate_tiny_body_report_and_grids():
    torch.manual_seed(0)
    body = randomize_bn(models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160).backbone.body)
    fp = copy.deepcopy(body)
    r = dfmpc.compensate(body)
    assert len(r["pairs"]) == 8 and r["loss_compensated"] < r["loss_naive"]
    assert all(p["loss_compensated"] <= p["loss_naive"] and p["mean_c"] > 0 for p in r["pairs"])
    mods = dict(body.named_modules())
    for name, bits in r["layers"].items():
        vals = mods[name].weight.unique().numel()
        assert vals <= (3 if bits == "ternary" else 2 ** bits), (name, bits, vals)
    assert r["layers"]["conv1"] == 6 and r["layers"]["layer2.0.downsample.0"] == 6
    n = sum(p.numel() for p in fp.parameters())
    assert r["size"]["fp32_mib"] == pytest.approx(n * 4 / 2 ** 20)
    bits = sum(mods[k].weight.numel() * (2 if b == "ternary" else b) for k, b in r["layers"].items())
    assert r["size"]["weights_mib"] == pytest.approx(bits / 8 / 2 ** 20)
    # quantize_other=False keeps stem and shortcuts FP32
    keep = copy.deepcopy(fp)
    r2 = dfmpc.compensate(keep, quantize_other=False)
    assert torch.equal(keep.conv1.weight, fp.conv1.weight) and r2["layers"]["conv1"] == "fp32"
    assert r2["size"]["weights_mib"] > r["size"]["weights_mib"]


def test_resnet18_size_matches_spec():
    r = dfmpc.compensate(torchvision.models.resnet18(weights=None))
    assert r["size"]["weights_mib"] == pytest.approx(6.10, abs=0.005)  # spec section 8 "we get 6.10 MiB"
    assert r["size"]["fp32_mib"] == pytest.approx(44.59, abs=0.005)


def prepared_resnet18(seed: int) -> nn.Module:
    """torchvision ResNet-18 whose low convs have per-channel scales e^U(-1,1) and whose BN statistics are
    measured on random input (spec 7.6, at network scale)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for p in dfmpc.find_pairs(model):
            w = mods[p.low].weight
            w.mul_(torch.exp(torch.rand(w.shape[0], 1, 1, 1, generator=g) * 2 - 1))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32, generator=g))
    return model.eval()


def low_conv_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    mods, inputs = dict(model.named_modules()), {}
    hooks = [mods[p.low].register_forward_hook(lambda m, i, o, n=p.low: inputs.__setitem__(n, i[0]))
             for p in dfmpc.find_pairs(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("seed", [0, 1])
def test_compensation_lowers_reconstruction_error_of_every_pair(seed):
    """Spec 7 item 6 at network scale: for EVERY pair of a ResNet-18, the output of the compensated
    6-bit conv is closer to FP32 than the naive one, on the FP32 network's own input to that pair."""
    model = prepared_resnet18(seed)
    mods = dict(model.named_modules())
    inputs = low_conv_inputs(model, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(99)))
    ratios = []
    for p in dfmpc.find_pairs(model):
        x = inputs[p.low]
        with torch.no_grad():
            ref = mods[p.high](torch.relu(mods[p.bn](mods[p.low](x))))
            err = {}
            for mode in ("naive", "dfmpc"):
                low, bn, high = (copy.deepcopy(mods[n]) for n in (p.low, p.bn, p.high))
                r = dfmpc.compensate_pair(low, bn, high, mode=mode)
                err[mode] = float(((high(torch.relu(bn(low(x)))) - ref) ** 2).sum() / (ref ** 2).sum())
        assert r["loss_compensated"] < r["loss_naive"]
        ratios.append(err["dfmpc"] / err["naive"])
    assert len(ratios) == 8 and max(ratios) < 0.9, ratios


# --------------------------------------------------------------------------- diagnostics
def test_scale_diagnostics_measure_what_a_per_channel_scale_removes():
    g = torch.Generator().manual_seed(6)
    net = small_net(0)
    body = nn.Module()  # find_pairs needs a BasicBlock: wrap the conv / BN pair in one
    block = torchvision.models.resnet.BasicBlock(16, 32, downsample=nn.Conv2d(16, 32, 1))
    with torch.no_grad():
        block.conv1.weight.copy_(net[0].weight)
        block.bn1.load_state_dict(net[1].state_dict())
    body.block = block.eval()
    d = dfmpc.scale_diagnostics(body, "ternary")
    w, bn = block.conv1.weight.detach(), block.bn1
    w_hat = quant.twn_quantize(w)
    c0 = dfmpc.compensation_coefficients(w, w_hat, bn, 0.0, 0.0)
    naive, best = dfmpc.filter_space_loss(w, w_hat, bn, 1.0, 0, 0), dfmpc.filter_space_loss(w, w_hat, bn, c0, 0, 0)
    energy = dfmpc.filter_space_loss(w, torch.zeros_like(w), bn, 1.0, 0, 0)
    assert d["relative_error"] == pytest.approx(naive / energy) and d["removable"] == pytest.approx(1 - best / naive)
    assert d["sd_c"] == pytest.approx(float(c0.std(unbiased=False)))
    # the same filters at one common scale: almost nothing is left for a per-channel c to remove
    with torch.no_grad():
        block.conv1.weight.copy_(torch.randn(32, 16, 3, 3, generator=g) * 0.1)
    flat = dfmpc.scale_diagnostics(body, "ternary")
    assert flat["removable"] < 0.1 < d["removable"] and 0.85 < flat["cosine"] < 0.95  # TWN on Gaussian filters


def test_data_fit_coefficients_are_the_activation_least_squares(monkeypatch):
    model = prepared_resnet18(0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    c = dfmpc.data_fit_coefficients(model, "ternary", lambda: model(x))
    mods = dict(model.named_modules())
    p = dfmpc.find_pairs(model)[3]
    inp = low_conv_inputs(model, x)[p.low]
    conv, bn = mods[p.low], mods[p.bn]
    with torch.no_grad():
        a = torch.relu(bn(conv(inp))).double()
        a_hat = torch.relu(bn(nn.functional.conv2d(inp, quant.twn_quantize(conv.weight), None, conv.stride, conv.padding))).double()
    for j in (0, 7, 31):
        sol = torch.linalg.lstsq(a_hat[:, j].reshape(-1, 1), a[:, j].reshape(-1, 1)).solution.item()
        assert float(c[p.low][j]) == pytest.approx(sol, rel=1e-6)
    assert set(c) == {q.low for q in dfmpc.find_pairs(model)} and all(bool((v >= 0).all()) for v in c.values())
    # a lossless "quantizer" gives c = 1 exactly (inactive channels get 1 by definition)
    monkeypatch.setattr(dfmpc, "layerwise_quantize", lambda w, bits: w.clone())
    same = dfmpc.data_fit_coefficients(model, "ternary", lambda: model(x))
    assert all(torch.allclose(v, torch.ones_like(v), atol=1e-6) for v in same.values())
    monkeypatch.undo()
    with pytest.raises(ValueError, match="eval mode"):
        dfmpc.data_fit_coefficients(model.train(), "ternary", lambda: None)
    with pytest.raises(ValueError, match="did not pass data"):
        dfmpc.data_fit_coefficients(model.eval(), "ternary", lambda: None)


def test_given_coefficients_replace_the_closed_form():
    model = prepared_resnet18(1)
    closed, given = copy.deepcopy(model), copy.deepcopy(model)
    mods = dict(model.named_modules())
    cs = {p.low: dfmpc.compensation_coefficients(mods[p.low].weight, quant.twn_quantize(mods[p.low].weight), mods[p.bn])
          for p in dfmpc.find_pairs(model)}
    r1, r2 = dfmpc.compensate(closed), dfmpc.compensate(given, coefficients=cs)
    assert r1["c"] == r2["c"] and all(torch.equal(a, b) for a, b in zip(closed.state_dict().values(), given.state_dict().values()))
    with pytest.raises(ValueError, match="coefficients"):
        dfmpc.compensate(copy.deepcopy(model), coefficients={})
    with pytest.raises(ValueError, match="coefficients"):
        dfmpc.compensate(copy.deepcopy(model), mode="naive", coefficients=cs)
    with pytest.raises(ValueError, match=">= 0"):
        dfmpc.compensate(copy.deepcopy(model), coefficients={k: -v for k, v in cs.items()})


# --------------------------------------------------------------------------- experiment rows
def test_settings_labels_keys_and_validation():
    table = dfmpc.table_settings(["ternary", 3])
    assert [s.label for s in table] == ["FP32", "naive 2/6 (TWN)", "DF-MPC 2/6 (TWN)", "naive 3/6", "DF-MPC 3/6"]
    assert table[1].key() == {"mode": "naive", "low_bits": "ternary", "high_bits": 6, "lambda1": None, "lambda2": None}
    assert table[4].key() == {"mode": "dfmpc", "low_bits": "3", "high_bits": 6, "lambda1": 0.5, "lambda2": 0.0}
    assert dfmpc.Setting.make("data-fit", 3).label == "data-fit c 3/6"
    for bad in ({"mode": "x"}, {"mode": "dfmpc", "low_bits": 9}, {"mode": "dfmpc", "lambda1": -1}):
        with pytest.raises(ValueError):
            dfmpc.Setting.make(**bad)


def test_evaluate_settings_rows_cache_and_recovered_fraction(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    calls = []

    def score(m):  # higher is better, 0 at FP32
        calls.append(1)
        with torch.no_grad():
            return {"score": -float(((m(x) - ref) ** 2).mean()), "other": 1.0}

    settings = dfmpc.table_settings(["ternary", 3]) + [dfmpc.Setting.make("data-fit", "ternary")]
    with pytest.raises(ValueError, match="calibrate"):
        dfmpc.evaluate_settings(model, settings, score, "score")
    rows = dfmpc.evaluate_settings(model, settings, score, "score", calibrate=lambda m: m(x),
                                   rows_path=tmp_path / "rows.jsonl", part="p", keep=("score",))
    assert [r["setting"] for r in rows] == [s.label for s in settings] and len(calls) == 6
    assert rows[0]["score"] == 0 and all(r["score"] < 0 and r["metric"] == r["score"] for r in rows[1:])
    assert "other" not in rows[0] and rows[1]["mean_c"] == 1.0 and rows[1]["sd_c"] == 0.0 and rows[2]["sd_c"] > 0
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the input model is untouched
    assert rows[1]["size_mb"] < rows[3]["size_mb"] < rows[0]["size_mb"]
    again = dfmpc.evaluate_settings(model, settings, score, "score", calibrate=lambda m: m(x),
                                    rows_path=tmp_path / "rows.jsonl", part="p")
    assert again == rows and len(calls) == 6  # every row reused from the file
    fractions = dfmpc.recovered_fraction(rows, "score")
    assert set(fractions) == {"ternary", "3"} and set(fractions["ternary"]) == {"dfmpc", "data-fit"}
    manual = (rows[2]["score"] - rows[1]["score"]) / (rows[0]["score"] - rows[1]["score"])
    assert fractions["ternary"]["dfmpc"] == pytest.approx(manual)
    with pytest.raises(ValueError, match="two rows"):
        dfmpc.recovered_fraction(rows + rows[1:2], "score")
    summary = dfmpc.summarize(rows[:5], rows[5:], {"ternary": dfmpc.scale_diagnostics(model)}, "score")
    assert summary["recovered"] == fractions and set(summary["diagnostics"]["ternary"]) == {"relative_error", "removable", "cosine", "sd_c"}
    assert dfmpc.ablation_rows(rows, "lambda1", "score") == [{"lambda1": 0.5, "low_bits": "ternary", "score": rows[2]["score"]},
                                                             {"lambda1": 0.5, "low_bits": "3", "score": rows[4]["score"]}]
    assert "89.12" in dfmpc.paper_line("thermal_patches") and "66.46" in dfmpc.paper_line("resnet18")
    assert dfmpc.format_rows(rows[:2], ["setting", "score"]).splitlines()[0].split() == ["setting", "score"]
