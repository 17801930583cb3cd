"""helpers.mixed_precision: the one-block-at-a-time sensitivity finds a deliberately fragile block; every policy
meets its budget, with the averages read back from the quantized model; bad input fails before any work."""
import pytest
import torch
from torch import nn

from helpers import mixed_precision as mp
from helpers import quant, sirst

torch.set_num_threads(1)


class Toy(nn.Module):
    """Four conv blocks; block b2's weights carry one outlier per output channel, so 4-bit per-channel rounding
    (range set by the outlier) zeroes all its other weights."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.b0, self.b1, self.b2, self.b3 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        with torch.no_grad():
            for conv in (self.b0, self.b1, self.b2, self.b3):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
            self.b2.weight[:, 0, 0, 0] = 8.0

    def forward(self, x):
        return self.b3(torch.relu(self.b2(torch.relu(self.b1(torch.relu(self.b0(x)))))))


def toy_blocks():
    return {f"b{i}": [f"b{i}"] for i in range(4)}


def test_sensitivity_finds_the_fragile_block():
    model = Toy().eval()
    x = torch.randn(8, 4, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    rows = mp.block_sensitivity(model, toy_blocks(), lambda q: {"sqnr_db": mp.sqnr_db(ref, q(x))}, [x],
                                bits=(4,), modes=("W",))
    profile = {r["block"]: -r["sqnr_db"] for r in rows}
    assert max(profile, key=profile.get) == "b2"
    # the same block also leads when its activations are quantized (A mode calibrates first)
    rows_a = mp.block_sensitivity(model, toy_blocks(), lambda q: {"sqnr_db": mp.sqnr_db(ref, q(x))}, [x],
                                  bits=(2,), modes=("WA",))
    assert len(rows_a) == 4 and {r["mode"] for r in rows_a} == {"WA"}
    assert mp.rank_correlation(profile, {r["block"]: -r["sqnr_db"] for r in rows_a})["blocks"] == 4


@pytest.fixture(scope="module")
def unet_setup():
    model = sirst.TinyUNet().eval()
    blocks = sirst.blocks(model)
    stats = mp.block_stats(model, blocks, torch.rand(2, 1, 32, 32))
    levels = {n: (lv, side) for n, (_, lv, side) in sirst.block_names(model).items() if side in ("encoder", "decoder")}
    return model, blocks, stats, levels


def fake_table(levels, kinds=("W", "A")):
    """A sensitivity table that falls with depth: shallow blocks are the sensitive ones."""
    return {(n, k, b): (4 - lv) * (8 - b) * (2 if side == "encoder" else 1)
            for n, (lv, side) in levels.items() for k in kinds for b in (2, 4)}


@pytest.mark.parametrize("budget_w,budget_a", [(4.0, 4.0), (3.0, 4.0), (2.42, 3.82), (5.5, None)])
def test_every_policy_meets_its_budget(unet_setup, budget_w, budget_a):
    model, blocks, stats, levels = unet_setup
    omega = {(n, b): float((4 - lv) * (8 - b)) for n, (lv, _) in levels.items() for b in (2, 3, 4, 6, 8)}
    fixed = {"stem": (8, 8), "head": (8, 8)}
    allocs = mp.policy_allocations(levels, stats, budget_w, budget_a, {"greedy_real": fake_table(levels)}, omega, fixed)
    assert set(allocs) == {"uniform", "spmixq", "spmixq_reversed", "greedy_real", "hawq_v3", "random_0", "random_1"}
    for policy, alloc in allocs.items():
        q = mp.quantize_allocation(model, blocks, alloc)
        measured = mp.average_bits(q, stats, scope=levels)
        declared = mp.allocation_bits({n: alloc[n] for n in levels}, stats)
        assert measured["w_bits"] == pytest.approx(declared["w_bits"], abs=1e-12), policy
        assert measured["a_bits"] == pytest.approx(declared["a_bits"], abs=1e-12), policy
        assert measured["w_bits"] <= budget_w + 1e-9, policy
        assert measured["a_bits"] <= (budget_a if budget_a is not None else 8) + 1e-9, policy
        assert alloc["stem"] == alloc["head"] == (8, 8)
    # uniform at an integer budget meets it exactly; the greedy is tight: no block can go one rung up and still fit
    if float(budget_w).is_integer():
        assert mp.average_bits(mp.quantize_allocation(model, blocks, allocs["uniform"]), stats, levels)["w_bits"] == budget_w
    greedy = {n: allocs["greedy_real"][n] for n in levels}
    for n, (wb, ab) in greedy.items():
        if wb < 8:
            up = mp.BIT_LADDER[mp.BIT_LADDER.index(wb) - 1]
            assert mp.allocation_bits({**greedy, n: (up, ab)}, stats)["w_bits"] > budget_w


def test_spmixq_schedule_is_symmetric_and_decreasing(unet_setup):
    _, _, _, levels = unet_setup
    bits = mp.spmixq_schedule(levels, b0=8, step=2, bmin=2)
    assert [bits[f"enc{i}"] for i in range(4)] == [8, 6, 4, 2]
    assert [bits[f"dec{i}"] for i in range(3)] == [8, 6, 4]  # mirror of the encoder (decoder_offset 0)
    reversed_ = mp.spmixq_schedule(levels, b0=8, step=2, bmin=2, increasing=True)
    assert [reversed_[f"enc{i}"] for i in range(4)] == [2, 4, 6, 8]
    assert mp.spmixq_schedule(levels, 8, 2, 2, decoder_offset=1)["dec0"] == 7


def test_greedy_spends_bits_where_the_table_is_sensitive(unet_setup):
    _, _, stats, levels = unet_setup
    alloc = mp.greedy(fake_table(levels), stats, list(levels), 3.0, 4.0)
    assert alloc["enc0"][0] >= alloc["enc3"][0] and alloc["enc0"][1] >= alloc["enc3"][1]


def test_hutchinson_trace_of_a_quadratic():
    # loss = sum(c * w^2) over a linear layer's weights: Hessian diagonal 2c, so the mean trace per weight is 2c
    layer = nn.Linear(3, 2, bias=False)
    model = nn.Sequential(layer)
    trace = mp.hutchinson_trace(model, lambda m: 1.5 * m[0].weight.pow(2).sum(), {"l": ["0"]}, samples=4)
    assert trace["l"] == pytest.approx(3.0)


def test_qat_student_round_trips_to_the_ptq_model(unet_setup):
    model, blocks, _, _ = unet_setup
    x = torch.rand(4, 1, 32, 32)
    q = mp.quantize_allocation(model, blocks, {b: (4, 4) for b in blocks}, symmetric=False)
    quant.calibrate(q, [x], progress=False)
    student = mp.qat_student(model, q)
    back = mp.to_quantized(student)
    with torch.no_grad():
        assert torch.allclose(student.eval()(x), q(x), atol=1e-5)
        assert torch.allclose(back(x), q(x), atol=1e-5)
    assert mp.average_bits(back, mp.block_stats(model, blocks, x)) == mp.average_bits(q, mp.block_stats(model, blocks, x))
    loss = student.train()(x).mean()
    loss.backward()
    assert student.enc.__getitem__(0).conv1.weight.grad.abs().sum() > 0  # gradients pass the rounding


def test_bad_input_fails_before_any_work(unet_setup):
    model, blocks, stats, levels = unet_setup
    calls = []

    def evaluate(q):
        calls.append(1)
        return {}
    with pytest.raises(mp.MixedPrecisionError, match="below the lowest bit width 2"):
        mp.greedy({}, stats, list(levels), 1.5, 4.0)
    with pytest.raises(mp.MixedPrecisionError, match="below the lowest bit width"):
        mp.spmixq_search(levels, stats, 3.0, 1.0)
    with pytest.raises(mp.MixedPrecisionError, match="below the lowest bit width"):
        mp.policy_allocations(levels, stats, 1.9, None, {}, {}, {})
    with pytest.raises(mp.MixedPrecisionError, match="unknown block name.*'enc9'"):
        mp.block_sensitivity(model, blocks, evaluate, [], bits=(2,), names=["enc9"])
    with pytest.raises(mp.MixedPrecisionError, match="unknown block name"):
        mp.quantize_allocation(model, blocks, {"decoder": (4, 4)})
    with pytest.raises(ValueError, match="must be an integer in 2..8"):
        mp.block_sensitivity(model, blocks, evaluate, [], bits=(2, 9))
    with pytest.raises(ValueError, match="must be an integer in 2..8"):
        mp.quantize_allocation(model, blocks, {"enc0": (1, 4)})
    with pytest.raises(ValueError, match="must be an integer in 2..8"):
        mp.uniform(levels, 4, 12)
    assert calls == []


def test_figure_data_comes_from_the_stored_rows():
    from helpers import runs, spmixq_figures
    run = runs.open_run(spmixq_figures.NOTEBOOK, {"T": 1})
    runs.atomic_write_json(run.path("float.json"), {"IoU": 0.5})
    for source, kl in (("real", 0.2), ("distilled", 0.3)):
        for block, iou in (("enc0", 0.3), ("dec0", 0.45)):
            runs.append_jsonl(run.path(f"sensitivity_{source}.jsonl"),
                              {"block": block, "mode": "W", "bits": 2, "sym_kl": kl, **({"IoU": iou} if source == "real" else {})})
    runs.append_jsonl(run.path("policies.jsonl"), {"budget": [3, 4], "policy": "uniform", "stage": "ptq", "w_bits": 3.0,
                                                   "a_bits": 4.0, "IoU": 0.4})
    sens = spmixq_figures.sensitivity_data(run)
    assert list(sens["block"]) == ["enc0", "dec0"]  # forward order
    assert sens["IoU_drop"].tolist() == pytest.approx([0.2, 0.05])
    assert sens["kl_distilled"].tolist() == [0.3, 0.3]
    pareto = spmixq_figures.pareto_data(run)
    assert "detector" not in pareto and pareto["segmenter"]["budget"].tolist() == ["W3/A4"]
