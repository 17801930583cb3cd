"""tools.benchmarks_zsq: the three cost ratios come out of one interleaved run, with their targets."""
import torch

from tools import benchmarks_zsq


def test_cost_ratios_are_measured_side_by_side():
    torch.set_num_threads(1)
    result = benchmarks_zsq.measure(repeats=1, height=64, width=80, distill_iters=2)
    assert set(result["ratios"]) == set(result["cpu_time_ratios"]) >= set(benchmarks_zsq.TARGETS)
    assert all(0 < r < 100 for r in result["ratios"].values())
    assert result["setup"]["distill_iterations_per_timing"] == 2
    assert result["within_target"].keys() == benchmarks_zsq.TARGETS.keys()
    assert set(result["set_ranges_s"]) == {"max", "percentile", "entropy", "mse"}
    assert result["timings"]["body_fwd_bwd"]["repeats"] == 1
    assert set(result["median_paired_ratios"]) == set(result["ratios"])
    assert len(result["timings"]["distill_mean"]["rounds_s"]) == 1


def test_rounds_alternate_order_and_pair_ratios_are_medians():
    calls = []
    timings = benchmarks_zsq._interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating rounds
    timings = {"num": {"rounds_s": [2.0, 3.0, 9.0]}, "den": {"rounds_s": [1.0, 1.0, 1.0]}}
    assert benchmarks_zsq._paired_median(timings, "num", "den") == 3.0
