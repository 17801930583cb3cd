"""The data behind every figure and table equals what the runs stored (figures are checked by their data, not pixels).

A small results tree is written the way the notebooks write it (manifest, 03 curves and previews,
04 rows, 06 tables made by `helpers.compare` from those rows), then each artifact is drawn from it.
"""
import json
import os

import numpy as np
import pandas as pd
import pytest

from helpers import compare, plots, runs, store, verdicts

ITERATIONS = 6                      # distillation iterations; snapshots at 0, 3, 6
SNAPSHOTS = (0, 3, 6)
SWEEP = (0, 3)
FINAL_BATCHES = {"finetune": 4, "pretrain": 2}
SIZE = {"fp32_mib": 50.0, "int_mib": 12.6, "ratio": 3.97}
FP32_AP = {"finetune": 0.25, "pretrain": 0.2}


def _write_run(notebook: str, params: dict, metrics: dict, files: dict | None = None) -> dict:
    folder = runs.results_dir() / notebook / runs.run_id(params)
    runs.atomic_write_json(folder / "params.json", {"notebook": notebook, "params": params})
    for name, write in (files or {}).items():
        write(folder / name)
    runs.atomic_write_json(folder / "metrics.json", metrics, digits=5)
    return {"notebook": notebook, "run_id": folder.name, "params": params, "finished": True,
            "path": f"{notebook}/{folder.name}"}


def _distillation(stage: str, loss: str, clamp: bool, rng) -> dict:
    params = {"PROFILE": "tiny", "SEED": 0, "STAGE": stage, "LOSS": loss, "CLAMP": clamp, "ITERATIONS": ITERATIONS}
    mean_term = list(np.round(100 * 0.5 ** np.arange(ITERATIONS), 6))
    std_term = list(np.round(50 * 0.6 ** np.arange(ITERATIONS), 6)) if loss == "mean+std" else [0.0] * ITERATIONS
    lr = [0.1, 0.1, 0.02, 0.02, 0.02, 0.004] if loss == "mean+std" else [0.1] * ITERATIONS
    curves = {"iteration": list(range(ITERATIONS)), "loss": [round(m + s, 6) for m, s in zip(mean_term, std_term)],
              "mean_term": mean_term, "std_term": std_term, "lr": lr, "bn_layers": 5, "config": {}}
    preview = {f"iteration_{k}": rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8) for k in SNAPSHOTS}
    spread = {str(k): {"channel_spread": round(0.1 + 0.01 * k + (0.2 if stage == "pretrain" else 0), 5),
                       "absmax": 2.0, "out_of_range": 0.0} for k in SNAPSHOTS}
    return _write_run("03_distill_calibration_data", params, {"stage": stage, "pixel_statistics": spread}, {
        "loss_curves.json": lambda p: runs.atomic_write_json(p, curves),
        "preview.npz": lambda p: np.savez_compressed(p, **preview)})


def _calibration(stage: str, source: str, rng, loss: str = "mean", clamp: bool = True,
                 settings=("W8A8", "W4A4"), calibrator: str = "percentile", **extra) -> dict:
    params = {"PROFILE": "tiny", "SEED": 0, "STAGE": stage, "SOURCE": source, "DISTILL_LOSS": loss,
              "DISTILL_CLAMP": clamp, "CALIB_BATCH": 8, "CALIBRATOR": calibrator, **extra}
    grid = [(s, ITERATIONS if source == "distilled" else None, b) for s in settings for b in range(FINAL_BATCHES[stage])]
    if source == "distilled" and clamp:
        grid += [(settings[0], it, b) for it in SWEEP for b in range(2)]
    rows = [{"setting": s, "iteration": it, "batch": b, "AP": float(rng.uniform(0.05, 0.3)), "AP50": 0.5, "APs": 0.1,
             "per_class_AP": {}, "first_layer_amax": 2.5} for s, it, b in grid]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    return _write_run("04_quantize_evaluate", params, {"fp32": {"AP": FP32_AP[stage]}, "size": SIZE, "rows": len(rows)},
                      {"rows.jsonl": lambda p: p.write_text(text)})


@pytest.fixture
def tree():
    """A tiny batch as the notebooks store it, plus a stale 04 run that the comparison did not use."""
    rng = np.random.default_rng(0)
    entries = [_write_run("02_train_detector", {"PROFILE": "tiny", "STAGE": s, "ARCH": "retinanet_test", "DATASET": d,
                                                 "DATA_ROOT": "data/tiny"}, {"AP": 0.2})
               for s, d in (("pretrain", "coco"), ("finetune", "flir"))]
    entries += [_distillation(s, loss, clamp, rng) for s, loss, clamp in
                [("finetune", "mean", True), ("finetune", "mean+std", True), ("pretrain", "mean", True),
                 ("pretrain", "mean+std", True), ("finetune", "mean", False)]]
    calibration = [_calibration("finetune", "distilled", rng), _calibration("finetune", "distilled", rng, loss="mean+std"),
                   _calibration("finetune", "distilled", rng, clamp=False), _calibration("finetune", "real", rng),
                   _calibration("finetune", "gaussian", rng),
                   _calibration("pretrain", "distilled", rng, settings=("W8A8",)),
                   _calibration("pretrain", "distilled", rng, loss="mean+std", settings=("W8A8",)),
                   _calibration("pretrain", "gaussian", rng, settings=("W8A8",))]
    stale = _calibration("finetune", "real", rng, calibrator="max")  # another calibrator: only in the calibrator probe
    compared = [runs.Run(e["notebook"], e["params"], runs.results_dir() / e["path"]) for e in calibration]
    rows = compare.collect_rows(compared)
    probe_rows = compare.collect_rows([store.run_of(stale), *compared])
    spread, measured = compare.spread_table(rows), compare.detectors(compared)
    comparison = {"table1": compare.records(compare.table1(rows, measured)), "spread": compare.records(spread),
                  "sweep": compare.records(compare.sweep_table(rows)), "claims": compare.records(compare.claims(rows, measured)),
                  "calibrators": compare.records(compare.calibrator_table(probe_rows, "W4A4")),
                  "detectors": measured, "runs": [r.id for r in compared]}
    entries += [stale] + calibration + [_write_run("06_compare_calibration", {"PROFILE": "tiny", "SEED": 0}, comparison,
                                                   {compare.ROWS_FILE: lambda p: compare.write_rows(p, probe_rows)})]
    runs.atomic_write_json(runs.results_dir() / "manifest.json", {"batches": {"tiny": entries}})
    return {"entries": entries, "calibration": calibration, "stale": stale}


def _add_to_batch(entry: dict) -> None:
    manifest = runs.results_dir() / "manifest.json"
    data = json.loads(manifest.read_text())
    data["batches"]["tiny"].append(entry)
    runs.atomic_write_json(manifest, data)


def _rows(entry: dict) -> list[dict]:
    return runs.read_jsonl(runs.results_dir() / entry["path"] / "rows.jsonl")


def _rows_file():
    return next(runs.results_dir().glob(f"06_compare_calibration/*/{compare.ROWS_FILE}"))


def _comparison() -> dict:
    return json.loads(next(runs.results_dir().glob("06_compare_calibration/*/metrics.json")).read_text())


def test_load_uses_exactly_the_compared_runs_and_checks_the_profile(tree):
    stored = store.load("tiny", "tiny")
    assert set(stored.rows["run_id"]) == {e["run_id"] for e in tree["calibration"]}  # not the other calibrator's run
    assert len(stored.rows) == sum(len(_rows(e)) for e in tree["calibration"])
    again = compare.collect_rows([store.run_of(e) for e in tree["calibration"]])
    pd.testing.assert_frame_equal(stored.rows, again)  # the rows 06 stored read back as collect_rows made them
    assert set(stored.rows["calibrator"]) == {"percentile"} and set(stored.rows["scheme"]) == {"symmetric"}
    assert set(stored.calibration) == set(stored.rows["run_id"])
    _rows_file().unlink()  # a comparison made before it stored its rows: the figures say how to make it again
    with pytest.raises(store.MissingResults, match="--only 06_compare_calibration --force"):
        store.load("tiny").need("rows")
    assert len(stored.distillations) == 5 and stored.dfmpc is None and "05_compensate_dfmpc" in stored.missing["dfmpc"]
    assert "profile tiny" in stored.ours and "retinanet_test" in stored.ours
    with pytest.raises(ValueError, match="profile"):
        store.load("tiny", "paper")
    with pytest.raises(store.MissingResults, match="no batch 'paper'"):
        store.load("paper")


def test_missing_manifest_says_how_to_get_results():
    with pytest.raises(store.MissingResults, match="make reproduce"):
        store.load("tiny")


def test_table1_rows_columns_and_values_are_the_stored_ones(tree):
    table = plots.table1(store.load("tiny"))
    stored, reference = _comparison()["table1"], compare.paper_reference()["table1"]
    assert list(table["precision"]) == ["W32-A32", "W8-A8"] * 2
    assert list(table["model"]) == ["pretrained RetinaNet"] * 2 + ["fine-tuned RetinaNet"] * 2
    assert list(table["evaluation data (tiny)"]) == ["coco val (data/tiny)"] * 2 + ["flir val (data/tiny)"] * 2
    assert list(table["evaluation data (paper)"]) == ["Microsoft COCO"] * 2 + ["FLIR ADAS"] * 2
    for column in ("mAP (tiny)", "size MiB (tiny)", "mAP (paper, reported)", "size MB (paper, reported)"):
        assert column in table.columns
    assert list(table["mAP (tiny)"]) == [r["mAP"] for r in stored]
    assert list(table["size MiB (tiny)"]) == [SIZE["fp32_mib"], SIZE["int_mib"]] * 2
    assert list(table["mAP (paper, reported)"]) == [reference[s][k] for s in ("pretrain", "finetune") for k in ("fp32_map", "w8a8_map")]
    assert list(table["calibration batches (tiny)"].dropna()) == [FINAL_BATCHES["pretrain"], FINAL_BATCHES["finetune"]]
    # the W8-A8 value is the mean of the stored per-batch rows (final distilled images, mean-only loss), in points
    finetune = next(e for e in tree["calibration"] if e["params"]["STAGE"] == "finetune")
    final = [100 * r["AP"] for r in _rows(finetune) if r["setting"] == "W8A8" and r["iteration"] == ITERATIONS]
    assert table["mAP (tiny)"].iloc[3] == pytest.approx(np.mean(final), abs=1e-4)
    assert table["mAP (tiny)"].iloc[2] == pytest.approx(100 * FP32_AP["finetune"])


def test_tables_are_written_as_csv_and_markdown_with_the_stored_values(tree):
    stored = store.load("tiny")
    _, files = plots.make("table1_map", stored, "results/figures")
    assert [p.name for p in files] == ["table1_map.csv", "table1_map.md"]
    assert files[0].parent == runs.results_dir() / "figures"
    back = pd.read_csv(files[0])
    assert list(back["mAP (tiny)"]) == [r["mAP"] for r in _comparison()["table1"]]
    md = files[1].read_text()
    assert "profile tiny" in md and "| model |" in md and md.count("\n| ") == 1 + 4
    sources, _ = plots.make("table_sources_bits", stored, "results/figures")
    assert len(sources) == len(_comparison()["spread"])
    assert list(sources["mAP mean (tiny)"]) == [r["mean"] for r in _comparison()["spread"]]


def test_fig2_sweep_series_are_the_stored_sweep_and_rows(tree):
    stored = store.load("tiny")
    for stage in ("finetune", "pretrain"):
        points, sweep = plots.fig2_sweep_data(stored, stage)
        assert set(sweep["source"]) == {"distilled mean", "distilled mean+std"}  # the unclamped run has no sweep
        for source in ("distilled mean", "distilled mean+std"):
            line = sweep[sweep["source"] == source]
            assert list(line["iteration"]) == [*SWEEP, ITERATIONS]
            assert list(line["count"]) == [2, 2, FINAL_BATCHES[stage]]
            assert list(points[points["source"] == source].groupby("iteration").size()) == [2, 2, FINAL_BATCHES[stage]]
        expected = [r for r in _comparison()["sweep"] if r["stage"] == stage and not r["source"].endswith("(unclamped)")]
        assert sorted(sweep["mean"]) == sorted(r["mean"] for r in expected)
        fig = plots.fig2_map_vs_iterations(stored, stage)
        ax = fig.axes[0]
        lines = {line.get_label(): line for line in ax.lines}
        mean_line = lines["mean loss: mean over batches"]
        assert list(mean_line.get_xdata()) == [*SWEEP, ITERATIONS]
        assert list(mean_line.get_ydata()) == list(sweep[sweep["source"] == "distilled mean"]["mean"])
        assert sum(len(c.get_offsets()) for c in ax.collections if "batch" in c.get_label()) == len(points)
        fp32 = next(label for label in lines if label.startswith("FP32"))
        assert fp32.endswith(f"{100 * FP32_AP[stage]:.2f}")
        assert ("W8A8, real images (PTQ)" in " ".join(lines)) == (stage == "finetune")
        assert f"[ours: profile tiny" in fig._suptitle.get_text() and "paper (RetinaNet-R50-FPN" in fig._supxlabel.get_text()


def test_fig2_loss_curves_are_the_stored_curves(tree):
    stored = store.load("tiny")
    data = plots.fig2_loss_data(stored, "pretrain")
    assert data.groupby("loss_kind").size().to_dict() == {"mean": ITERATIONS, "mean+std": ITERATIONS}  # clamped runs only
    fig = plots.fig2_loss(stored, "pretrain")
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    curve = next(d for d in stored.distillations if (d["stage"], d["loss"]) == ("pretrain", "mean+std"))["curves"]
    assert list(lines["mean+std loss (optimised)"].get_ydata()) == curve["loss"]
    assert list(lines["mean+std run: its mean term"].get_ydata()) == curve["mean_term"]
    drops = [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_linestyle() == ":" and len(line.get_xdata())]
    assert drops == [2, 5]  # the lr divisions of the stored schedule
    summary = plots.fig2_loss_summary(stored, "pretrain")
    assert list(summary["last_loss"]) == [d["curves"]["loss"][-1] for d in stored.distillations
                                          if d["stage"] == "pretrain" and d["clamp"]]


def test_fig3_has_one_point_per_stored_batch_and_the_stored_statistics(tree):
    stored = store.load("tiny")
    points, stats = plots.fig3_data(stored)
    order = ["real", "distilled mean", "distilled mean+std", "distilled mean (unclamped)", "gaussian"]
    assert list(stats["source"]) == order
    assert points.groupby("source", sort=False).size().to_dict() == {s: FINAL_BATCHES["finetune"] for s in order}
    real = next(e for e in tree["calibration"] if e["params"]["SOURCE"] == "real")
    assert list(points[points["source"] == "real"]["mAP"]) == [100 * r["AP"] for r in _rows(real) if r["setting"] == "W8A8"]
    spread = {r["source"]: r for r in _comparison()["spread"] if r["stage"] == "finetune" and r["setting"] == "W8A8"}
    for _, row in stats.iterrows():
        assert {k: row[k] for k in ("mean", "std", "min", "max", "count")} == {k: spread[row["source"]][k] for k in ("mean", "std", "min", "max", "count")}
        assert row["mean"] == pytest.approx(points[points["source"] == row["source"]]["mAP"].mean(), abs=1e-4)
    fig = plots.fig3_ptq_vs_zsq(stored)
    ax = fig.axes[0]
    per_source, means = ax.collections[:len(order)], ax.collections[len(order)]
    for source, collection in zip(order, per_source):
        assert sorted(collection.get_offsets()[:, 1]) == sorted(points[points["source"] == source]["mAP"])
    assert list(means.get_offsets()[:, 1]) == list(stats["mean"])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0].startswith("real images") and f"n = {FINAL_BATCHES['finetune']}" in labels[0]
    assert "31.13" in fig._supxlabel.get_text() and "29.78" in fig._supxlabel.get_text()


def test_fig4_grid_shows_the_stored_previews(tree):
    stored = store.load("tiny")
    data = plots.fig4_data(stored)
    assert list(data) == ["pretrain", "finetune"]  # mean-only clamped runs, (a) pretrained first
    fig = plots.fig4_distilled_images(stored)
    assert len(fig.subfigs) == 2
    for sub, (stage, d) in zip(fig.subfigs, data.items()):
        assert sub._suptitle.get_text().startswith("(a)" if stage == "pretrain" else "(b)")
        assert len(sub.axes) == len(SNAPSHOTS) * 3  # rows: snapshot iterations, columns: the 3 stored images
        for k, ax in enumerate(sub.axes):
            it, j = SNAPSHOTS[k // 3], k % 3
            np.testing.assert_array_equal(ax.images[0].get_array(), d["images"][it][j])
        assert sub.axes[0].get_ylabel() == f"iter 0\nspread {d['channel_spread'][0]:.3f}"
    summary = plots.fig4_summary(stored)
    assert summary.shape == (2, len(SNAPSHOTS)) and summary.loc["pretrain", 6] == pytest.approx(0.36)


def test_saved_files_are_png_and_pdf_with_identical_bytes_on_a_rerun(tree, tmp_path):
    stored = store.load("tiny")
    first = plots.save(plots.fig3_ptq_vs_zsq(stored), "fig3_ptq_vs_zsq", tmp_path / "a")
    again = plots.save(plots.fig3_ptq_vs_zsq(store.load("tiny")), "fig3_ptq_vs_zsq", tmp_path / "b")
    assert [p.name for p in first] == ["fig3_ptq_vs_zsq.png", "fig3_ptq_vs_zsq.pdf"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    png, pdf = (p.read_bytes() for p in first)
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"Matplotlib" not in png
    assert pdf.startswith(b"%PDF") and b"CreationDate" not in pdf
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in first)  # as a plain write, not mkstemp's 0600
    mtime = first[0].stat().st_mtime_ns
    plots.save(plots.fig3_ptq_vs_zsq(stored), "fig3_ptq_vs_zsq", tmp_path / "a")
    assert first[0].stat().st_mtime_ns == mtime  # unchanged bytes leave the file alone
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["fig3_ptq_vs_zsq.pdf", "fig3_ptq_vs_zsq.png"]


def test_main_regenerates_every_artifact_and_skips_dfmpc_with_a_reason(tree, capsys):
    assert plots.main(["--batch", "tiny"]) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in (runs.results_dir() / "figures").iterdir())
    for name, (kind, _, _) in plots.ARTIFACTS.items():
        suffixes = (".csv", ".md") if kind == "table" else (".png", ".pdf")
        if "dfmpc" in name:
            assert f"{name}: skipped: batch 'tiny' has no stored 05_compensate_dfmpc run" in out
            assert not any(w.startswith(name + ".") for w in written)
        elif name in ("table_noise_variants", "table_schemes", "table_export", "table_onnx_speed") or "spmixq" in name or "task_zsq" in name:  # this small tree lacks those runs
            assert f"{name}: skipped: " in out and not any(w.startswith(name + ".") for w in written)
        else:
            assert all(f"{name}{s}" in written for s in suffixes), name
    assert str(runs.results_dir()) not in out  # paths are printed relative
    page = (runs.results_dir() / "RESULTS.md").read_text()
    assert "## table1_map" in page and "`table_export`: skipped" in page and "figures/fig3_ptq_vs_zsq.png" in page


def test_dfmpc_table_and_ablation_come_from_the_stored_run(tree):
    metrics = {"classifier": {"rows": [{"model": "resnet18", "method": m, "top1": a} for m, a in (("fp32", 69.0), ("dfmpc", 60.0))]},
               "detector": {"rows": [{"model": "retinanet", "method": "dfmpc", "mAP": 20.0}]},
               "ablation": {"lambda1": [{"lambda1": v, "top1": 50 + v} for v in (0.0, 0.5, 1.0)],
                            "lambda2": [{"lambda2": v, "top1": 55 - v} for v in (0.0, 0.1)]}}
    _add_to_batch(_write_run("05_compensate_dfmpc", {"PROFILE": "tiny"}, metrics))
    stored = store.load("tiny")
    table, files = plots.make("dfmpc_table", stored, "results/figures")
    assert list(table["part"]) == ["classifier", "classifier", "detector"] and list(table["top1"].iloc[:2]) == [69.0, 60.0]
    fig = plots.fig_dfmpc_lambda(stored, "lambda1")
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [0.0, 0.5, 1.0] and list(line.get_ydata()) == [50.0, 50.5, 51.0]
    assert fig.axes[0].get_xlabel() == "$\\lambda_1$"


def test_dfmpc_artifacts_from_the_rows_notebook_05_stores(tree):
    """The structure `helpers.dfmpc.summarize` / `ablation_rows` write: Table rows plus data-fit rows, the
    ablation per low bit width drawn against its naive line, FP32 and the paper's lambda."""
    def row(mode, low, top1, setting):
        return {"part": "classifier", "mode": mode, "low_bits": low, "high_bits": 6, "setting": setting,
                "top1": top1, "metric": top1, "size_mb": 0.4, "mean_c": 1.0, "sd_c": 0.0}
    rows = [row("fp32", "fp32", 0.8, "FP32"), row("naive", "ternary", 0.4, "naive 2/6 (TWN)"),
            row("dfmpc", "ternary", 0.41, "DF-MPC 2/6 (TWN)")]
    metrics = {"classifier": {"model": "thermal_patches", "rows": rows,
                              "data_fit": [row("data-fit", "ternary", 0.6, "data-fit c 2/6 (TWN)")]},
               "ablation": {"lambda1": [{"lambda1": v, "low_bits": "ternary", "top1": 0.4 + v / 100} for v in (0.0, 0.5, 1.0)]},
               "paper_reference": {"lambda1": 0.5, "lambda2": 0.0}}
    _add_to_batch(_write_run("05_compensate_dfmpc", {"PROFILE": "tiny"}, metrics))
    stored = store.load("tiny")
    table, files = plots.make("dfmpc_table", stored, "results/figures")
    assert list(table["setting"]) == ["FP32", "naive 2/6 (TWN)", "DF-MPC 2/6 (TWN)", "data-fit c 2/6 (TWN)"]
    assert list(table.columns[:3]) == ["part", "setting", "top1"] and "metric" not in table.columns
    md = files[1].read_text()
    assert "fractions in [0, 1]" in md and "0.4100" in md and "mAP in points" not in md
    fig = plots.fig_dfmpc_lambda(stored, "lambda1")
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["DF-MPC 2/6 (TWN)", "naive 2/6 (TWN) (c = 1)", "FP32", "paper's choice ($\\lambda_1$ = 0.5)"]
    assert list(ax.lines[0].get_ydata()) == [0.4, 0.405, 0.41] and list(ax.lines[1].get_ydata()) == [0.4, 0.4]
    assert "thermal_patches" in ax.get_ylabel() and "classifier thermal_patches" in fig.get_suptitle()


def test_calibrator_table_is_the_stored_probe(tree):
    table, files = plots.make("table_calibrators_w8a4", store.load("tiny"), "results/figures")
    stored = _comparison()["calibrators"]
    assert list(table["calibrator"]) == [r["calibrator"] for r in stored] and {"max", "percentile"} <= set(table["calibrator"])
    assert list(table["mAP mean (tiny)"]) == [r["mean"] for r in stored]
    assert [p.name for p in files] == ["table_calibrators_w8a4.csv", "table_calibrators_w8a4.md"]


def test_seed_table_reads_each_batch_stored_verdicts_and_marks_what_it_lacks(tree, capsys):
    first = store.load("tiny")
    second = store.load("tiny")
    second.batch = "tiny_seed1"
    second.comparison = dict(second.comparison, separating_three_sources=[
        {"setting": "W4A8", "ranking": "real > distilled mean > gaussian", "all_separated": True}])
    table = verdicts.table_seeds([first, second]).set_index("verdict")
    assert list(table.columns) == ["tiny", "tiny_seed1"]
    spread = {(r["stage"], r["source"], r["setting"]): r for r in _comparison()["spread"]}
    zsq, ptq = spread["finetune", "distilled mean", "W8A8"]["mean"], spread["finetune", "real", "W8A8"]["mean"]
    assert table.loc["W8A8 zero-shot vs PTQ", "tiny"] == f"{zsq:.2f} vs {ptq:.2f}"
    fp32, w8a8 = (next(r["mAP"] for r in _comparison()["table1"] if r["model"] == "finetune" and r["precision"] == p)
                  for p in ("W32-A32", "W8-A8"))
    assert table.loc["W8A8 zero-shot minus FP32", "tiny"] == f"{w8a8 - fp32:+.2f}"
    assert table.loc["W4A8 order, percentile calibrator"].tolist() == [
        "n/a", "real > distilled mean > gaussian (all separated)"]
    assert table.loc["DF-MPC classifier, share of the drop won back: 2/6 / 3/6", "tiny"] == "n/a"  # no 05 run stored
    assert plots.main(["--seeds", "tiny"]) == 0
    written = (runs.results_dir() / "figures" / "table_seeds.md").read_text()
    assert "| verdict | tiny |" in written and f"{zsq:.2f} vs {ptq:.2f}" in written
    assert plots.main(["--seeds", "tiny", "absent"]) == 1 and "no batch 'absent'" in capsys.readouterr().err


def test_readme_findings_are_the_stored_tables_and_only_the_projects_figures_update_it(tree, tmp_path):
    committed = (runs.ROOT / "README.md").read_text()
    start, end = committed.index(plots.FINDINGS_START), committed.index(plots.FINDINGS_END) + len(plots.FINDINGS_END)
    # the committed README says what the committed tables say (make figures / make seeds-table paste them)
    assert committed[start:end] == plots.findings_block(runs.ROOT / "results" / "figures")
    assert plots.update_readme_findings(out_dir="results/figures") is None  # the tree fixture redirects results
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{plots.FINDINGS_START}\nstale\n{plots.FINDINGS_END}\n\n## after\n")
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "table_claims_seeds.md").write_text("| claim | verdict |\n|---|---|\n| a | holds |\n")
    plots.update_readme_findings(readme, figures)
    text = readme.read_text()
    assert "stale" not in text and "| a | holds |" in text and "`table_spmixq_claims` not stored yet" in text
    assert text.endswith(f"{plots.FINDINGS_END}\n\n## after\n")


def test_spmixq_artifacts_are_skipped_with_a_reason_without_an_08_run(tree):
    stored = store.load("tiny")
    for name in ("fig_spmixq_sensitivity", "table_spmixq_claims", "table_spmixq_pareto_detector"):
        with pytest.raises(store.MissingResults, match="no stored 08_mixed_precision_spmixq run"):
            plots.make(name, stored)


def test_findings_summarise_the_companion_tables_in_one_line_each():
    claims = pd.DataFrame({"claim": ["a", "b", "c"], "cell": ["W8", "W4", "W4"],
                           "verdict": ["does not hold", "holds", "direction only"]})
    line = plots.summary_line("table_x", claims)
    assert line.startswith("3 claims: holds 1, direction only 1, does not hold 1. Holds: b (W4)")
    assert line.endswith("(`table_x` in `results/RESULTS.md`).")
    speed = pd.DataFrame({"model": ["tiny", "tiny"], "part": ["network", "network"], "threads": [1, 2],
                          "size ratio": [3.8, 3.8], "speed >= 2x": [True, False], "cpu": ["EPYC", "EPYC"]})
    line = plots.summary_line("table_onnx_speed", speed)
    assert "in 1 of 2 rows, not for the tiny network at 2 threads; files 3.80-3.80x smaller; measured on EPYC" in line
