"""helpers.zsq: calibration sources, bit-setting checks, the resumable evaluation grid, spread tables."""
import pytest
import torch

from helpers import data, distill, models, quant, runs, zsq

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def val_set(tiny_root):
    return data.CocoDetectionSet(tiny_root, "flir", "val", data.FLIR_CLASSES)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160).eval()


@pytest.mark.parametrize("bad", ["W9A8", "W8A1", "8/8", "W8", "w8a8", 8])
def test_bad_bit_settings_fail_before_any_work(bad):
    with pytest.raises(ValueError, match="bit"):
        quant.QuantSetting.parse(bad)


def test_parse_setting():
    setting = quant.QuantSetting.parse("W4A8")
    assert (setting.w_bits, setting.a_bits) == (4, 8)


def test_real_batches_are_consecutive_training_images(tiny_root):
    train = data.CocoDetectionSet(tiny_root, "flir", "train", data.FLIR_CLASSES)
    batches = zsq.real_batches(train, n_batches=2, batch_size=4)
    assert [len(b) for b in batches] == [4, 4]
    assert torch.equal(batches[1][0], train[4][0]) and torch.equal(batches[0][3], train[3][0])
    with pytest.raises(ValueError, match="need 16 images"):
        zsq.real_batches(train, n_batches=4, batch_size=4)


def test_gaussian_batches_are_seeded_standard_normal():
    a = zsq.gaussian_batches(3, 8, (32, 40), seed=1)
    assert torch.equal(a[2], zsq.gaussian_batches(3, 8, (32, 40), seed=1)[2])
    assert not torch.equal(a[0], zsq.gaussian_batches(3, 8, (32, 40), seed=2)[0])
    x = torch.cat(a)
    assert x.shape == (24, 3, 32, 40) and abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02


def test_split_batches_names_the_fix_when_too_few_images():
    images = torch.zeros(20, 3, 4, 4, dtype=torch.float16)
    out = zsq.split_batches(images, 8, 2)
    assert len(out) == 2 and out[0].dtype == torch.float32
    with pytest.raises(ValueError, match="NUM_IMAGES"):
        zsq.split_batches(images, 8, 3)


def test_grid_rows_resume_and_keep_grid_order(detector, val_set, tmp_path):
    batches = {None: zsq.gaussian_batches(2, 2, (128, 160), seed=0)}
    path = tmp_path / "rows.jsonl"
    first = zsq.run_grid(detector, {None: batches[None][:1]}, True, val_set, ["W8A8"], path)
    assert len(first) == 1 and first[0]["batch"] == 0 and 0 <= first[0]["AP"] <= 1
    assert first[0]["first_layer_amax"] > 0
    rows = zsq.run_grid(detector, batches, True, val_set, ["W4A4", "W8A8"], path)
    assert [(r["setting"], r["batch"]) for r in rows] == [("W4A4", 0), ("W4A4", 1), ("W8A8", 0), ("W8A8", 1)]
    assert rows[2] == first[0]  # reused, not re-measured
    assert len(runs.read_jsonl(path)) == 4
    with pytest.raises(ValueError, match="bit"):
        zsq.run_grid(detector, batches, True, val_set, ["W8A9"], path)


def test_each_grid_row_is_its_cell_measured_alone(detector, val_set, tmp_path):
    """What sharding the grid over ranks relies on: a row equals its cell quantized, calibrated and
    evaluated from scratch, whatever cells the same process measured before it."""
    batches = {None: zsq.gaussian_batches(3, 2, (128, 160), seed=0)}
    rows = zsq.run_grid(detector, batches, True, val_set, ["W8A4"], tmp_path / "rows.jsonl")
    assert runs.read_jsonl(tmp_path / "rows.jsonl") == rows  # appended in grid order
    alone = zsq.quantized_map(detector, batches[None][2], True, val_set, "W8A4")
    assert {k: rows[2][k] for k in alone} == alone
    assert rows[2]["first_layer_amax"] != rows[1]["first_layer_amax"]


def test_calibration_source_changes_the_first_layer_range(detector, val_set):
    noise = zsq.gaussian_batches(1, 2, (128, 160), seed=0)[0]
    wide = zsq.quantized_map(detector, noise * 4, True, val_set, "W8A8")
    narrow = zsq.quantized_map(detector, noise, True, val_set, "W8A8")
    assert wide["first_layer_amax"] == pytest.approx(4 * narrow["first_layer_amax"], rel=1e-3)


def test_spread_table():
    rows = [{"setting": "W8A8", "AP": v} for v in (0.3, 0.5)] + [{"setting": "W4A4", "AP": 0.1}]
    table = zsq.spread(rows).set_index("setting")
    assert table.loc["W8A8", "mean"] == pytest.approx(0.4) and table.loc["W8A8", "std"] == pytest.approx(0.1414, abs=1e-4)
    assert table.loc["W4A4", "std"] == 0 and table.loc["W4A4", "n"] == 1 and list(table.index) == ["W8A8", "W4A4"]


def test_pixel_statistics(detector):
    low, high = (b[None, :, None, None] for b in distill.pixel_range(detector))
    inside = (low + high).expand(2, 3, 8, 8) / 2
    assert distill.pixel_statistics(inside, detector)["out_of_range"] == 0
    outside = high.expand(2, 3, 8, 8) + 1
    stats = distill.pixel_statistics(outside, detector)
    assert stats["out_of_range"] == 1 and stats["absmax"] == pytest.approx(float(high.max()) + 1)


def test_calibrated_ranges_cover_every_layer_and_follow_the_batch():
    from helpers import models
    torch.manual_seed(0)
    model = models.build_detector("retinanet_resnet18_fpn_tiny", 4, 64, 80).eval()
    small = zsq.calibrated_ranges(model, torch.randn(2, 3, 64, 80) * 0.5, normalized=True, a_bits=4)
    large = zsq.calibrated_ranges(model, torch.randn(2, 3, 64, 80) * 2.0, normalized=True, a_bits=4)
    assert len(small) == len(quant.quant_layers(quant.quantize_model(model, 8, 8)))
    assert large["backbone.body.conv1"] > 3 * small["backbone.body.conv1"]  # the input itself, 4x wider


def test_a_reused_quantized_copy_calibrates_like_a_fresh_one(detector):
    wide, batch = zsq.gaussian_batches(2, 2, (128, 160), seed=0)
    reused = zsq.quantized_copy(detector, "W8A4")
    quant.calibrate(reused, [wide * 4], normalized=True)
    got = quant.calibrate(reused, [batch], normalized=True)["ranges"]
    fresh = zsq.quantized_copy(detector, "W8A4")
    assert got == quant.calibrate(fresh, [batch], normalized=True)["ranges"]
    x = torch.rand(1, 3, 128, 160)
    with torch.inference_mode():
        assert all(torch.equal(u, v) for u, v in zip(reused.backbone(x).values(), fresh.backbone(x).values()))


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], {}


def test_pixel_moments_are_per_channel_over_every_pixel():
    images = [torch.stack([torch.full((4, 5), 0.2), torch.full((4, 5), 0.5), torch.rand(4, 5)]) for _ in range(3)]
    mean, std = zsq.pixel_moments(_Images(images))
    every = torch.stack(images).transpose(0, 1).flatten(1)
    assert torch.allclose(mean, every.mean(1)) and torch.allclose(std, every.std(1, unbiased=False), atol=1e-6)


def test_noise_sources_are_seeded_and_fed_as_the_docstring_says(detector):
    h, w = distill.input_size(detector)
    assert zsq.noise_batches("gaussian", 2, 3, detector, 0)[1] is True  # normalised space, unchanged
    for kind in ("gaussian-pixel", "uniform-pixel", "gaussian-512x640"):
        batches, normalized = zsq.noise_batches(kind, 2, 3, detector, 7)
        again, _ = zsq.noise_batches(kind, 2, 3, detector, 7)
        assert not normalized and len(batches) == 2 and torch.equal(batches[1], again[1])
        assert batches[0].shape == ((3, 3, 512, 640) if kind == "gaussian-512x640" else (3, 3, h, w))
    uniform, _ = zsq.noise_batches("uniform-pixel", 1, 4, detector, 0)
    assert 0 <= uniform[0].min() and uniform[0].max() <= 1
    gray = [torch.stack([torch.full((h, w), 0.3 + 0.1 * c) + 0.05 * torch.randn(h, w) for c in range(3)]) for _ in range(4)]
    matched, normalized = zsq.noise_batches("gaussian-matched", 1, 64, detector, 0, _Images(gray))
    mean, std = zsq.pixel_moments(_Images(gray))
    got = matched[0].transpose(0, 1).flatten(1)
    assert not normalized and torch.allclose(got.mean(1), mean, atol=0.01) and torch.allclose(got.std(1), std, atol=0.01)
    with pytest.raises(ValueError, match="pass train_set"):
        zsq.noise_batches("gaussian-matched", 1, 2, detector, 0)
    with pytest.raises(ValueError, match="noise source must be one of"):
        zsq.noise_batches("pink", 1, 2, detector, 0)


def test_grid_rows_name_their_calibrator_percentile_and_scheme(detector, val_set, tmp_path):
    batches = {None: zsq.gaussian_batches(1, 2, distill.input_size(detector), 0)}
    asymmetric = quant.QuantSetting.parse("W8A4", symmetric=False)
    rows = zsq.run_grid(detector, batches, True, val_set, [asymmetric], tmp_path / "rows.jsonl")
    assert (rows[0]["scheme"], rows[0]["calibrator"], rows[0]["percentile"]) == ("asymmetric", "percentile", 99.99)
    sym = zsq.run_grid(detector, batches, True, val_set, ["W8A4"], tmp_path / "sym.jsonl")
    assert sym[0]["scheme"] == "symmetric"
    mse = zsq.run_grid(detector, batches, True, val_set, [quant.QuantSetting.parse("W8A4", "mse")], tmp_path / "mse.jsonl")
    assert (mse[0]["calibrator"], mse[0]["percentile"]) == ("mse", None)
    assert runs.read_jsonl(tmp_path / "mse.jsonl") == mse  # what is stored names it too
