from tools import benchmarks_cuda


def test_paper_size_script_runs_its_whole_path_at_smoke_size(tmp_path):
    """The GPU script's code path (data, training, evaluation, ZSQ, CPU agreement) on the CPU, small.
    Its cost ratios come from tools.benchmarks_zsq, tested on its own."""
    result = benchmarks_cuda.measure("cpu", smoke=True, n_train=8, n_val=4, epochs=2, batch=2, distill_images=2,
                                     distill_iterations=2, workers=0, work_dir=tmp_path, ratios=False)
    assert result["data"]["train"] and result["train"]["seconds_per_iteration"] > 0
    assert set(result["zsq"]["W8A8_AP"]) == {"distilled", "real", "gaussian"}
    # both sides on the same device must agree exactly, or the comparison itself is broken
    assert result["cpu_agreement"]["fp32_head"] == {"cls_logits": 0.0, "bbox_regression": 0.0}
    assert result["cpu_agreement"]["w8a8_range_max_rel_diff"] == 0.0
    assert result["cpu_agreement"]["distill_loss_max_rel_diff"] == 0.0
