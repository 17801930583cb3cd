"""helpers.distill: BN-statistics distillation (ZeroQ / paper Formula 2) on small inputs."""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from helpers import distill, models

torch.set_num_threads(1)
SMALL = (64, 80)  # distillation tests run at half the tiny detector's size


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = models.build_detector("retinanet_resnet18_fpn_tiny", 4, 128, 160).eval()
    # give the BN layers non-trivial statistics, as a trained model has
    g = torch.Generator().manual_seed(0)
    for bn in distill.bn_layers(model).values():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return model


def frozen_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d).eval()


def zeroq_reference(module: nn.Module, x: torch.Tensor, loss: str) -> float:
    """ZeroQ's formula computed independently: a full forward with plain hooks, torch.var, own_loss."""
    seen = []
    handles = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0])))
               for m in distill.bn_layers(module).values()]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    own = lambda a, b: ((a - b).norm() ** 2 / b.size(0)).item()  # ZeroQ's own_loss
    pairs = [(x, torch.zeros(3), torch.ones(3))] + [(inp, m.running_mean, (m.running_var + 1e-6).sqrt())
                                                     for m, inp in seen]
    total = 0.0
    for inp, mean, std in pairs:
        flat = inp.reshape(inp.size(0), inp.size(1), -1)
        total += own(mean, flat.mean(2))
        if loss == "mean+std":
            total += own(std, torch.sqrt(flat.var(2) + 1e-6))
    return total / len(seen)


# --------------------------------------------------------------------------- hooks and loss
def test_hooks_see_every_bn_layer_and_stop_after_the_last(tiny):
    body = distill.distill_target(tiny)
    assert body is tiny.backbone.body
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert n_bn == 20
    calls = []
    body.layer4[-1].register_forward_hook(lambda *a: calls.append(1))  # the block holding the last BN
    with distill.BNStatisticsLoss(body, "mean") as crit:
        crit(torch.randn(2, 3, *SMALL))
    assert len(crit.seen) == n_bn == len(set(crit.seen))
    assert not calls  # the forward stopped inside the last block
    body.layer4[-1]._forward_hooks.clear()

    net = frozen_resnet18()
    frozen = [n for n, m in net.named_modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)]
    assert len(frozen) == 20
    fc_calls = []
    net.fc.register_forward_hook(lambda *a: fc_calls.append(1))
    with distill.BNStatisticsLoss(net, "mean+std") as crit:
        crit(torch.randn(2, 3, *SMALL))
    assert sorted(crit.seen) == sorted(frozen) and not fc_calls


@pytest.mark.parametrize("loss", ["mean", "mean+std"])
def test_loss_matches_zeroq_formula(tiny, loss):
    body = tiny.backbone.body
    x = torch.randn(3, 3, *SMALL, generator=torch.Generator().manual_seed(1))
    with distill.BNStatisticsLoss(body, loss) as crit, torch.no_grad():
        total, mean_term, std_term = crit(x)
    assert total.item() == pytest.approx(zeroq_reference(body, x, loss), rel=1e-4)
    assert (std_term.item() == 0.0) == (loss == "mean")


def zeroq_reference_gradient(module: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    """d(Formula 2)/dx through the module's own BN forwards and plain torch reductions (no fused node)."""
    x = x.clone().requires_grad_(True)
    terms = []
    handles = [m.register_forward_hook(lambda m, args, out: terms.append((args[0], m))) for m in
               distill.bn_layers(module).values()]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()
    total = x.flatten(2).mean(2).pow(2).sum(1).mean()
    if loss == "mean+std":
        total = total + ((x.flatten(2).var(2) + 1e-6).sqrt() - 1).pow(2).sum(1).mean()
    for inp, m in terms:
        flat = inp.flatten(2)
        total = total + (flat.mean(2) - m.running_mean).pow(2).sum(1).mean()
        if loss == "mean+std":
            total = total + ((flat.var(2) + 1e-6).sqrt() - (m.running_var + 1e-6).sqrt()).pow(2).sum(1).mean()
    (total / len(terms)).backward()
    return x.grad


@pytest.mark.parametrize("loss", ["mean", "mean+std"])
@pytest.mark.parametrize("which", ["batchnorm", "frozen"])
def test_fused_bn_gradient_matches_plain_autograd_and_layers_are_restored(tiny, loss, which):
    net = tiny.backbone.body if which == "batchnorm" else frozen_resnet18()
    x = torch.randn(2, 3, *SMALL, generator=torch.Generator().manual_seed(4))
    expected = zeroq_reference_gradient(net, x, loss)
    net.zero_grad(set_to_none=True)
    inp = x.clone().requires_grad_(True)
    with distill.BNStatisticsLoss(net, loss) as crit:
        total, _, _ = crit(inp)
        assert all("forward" in vars(bn) for bn in crit.layers.values())
    total.backward()
    assert torch.allclose(inp.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not any("forward" in vars(bn) for bn in distill.bn_layers(net).values())
    bn_weights = [bn.weight for bn in distill.bn_layers(net).values() if isinstance(bn.weight, nn.Parameter)]
    assert all(w.grad is None for w in bn_weights)  # BN affine parameters act as constants


def test_mean_only_ignores_the_variance_term():
    net = frozen_resnet18()
    last = list(distill.bn_layers(net).values())[-1]
    x = torch.randn(2, 3, *SMALL, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def loss_and_grad(kind):
        x.grad = None
        with distill.BNStatisticsLoss(net, kind) as crit:
            total, _, _ = crit(x)
        total.backward()
        return total.item(), x.grad.clone()

    before = {k: loss_and_grad(k) for k in ("mean", "mean+std")}
    last.running_var.mul_(9.0)  # nothing after the last BN runs, so only its std target moves
    after = {k: loss_and_grad(k) for k in ("mean", "mean+std")}
    assert after["mean"][0] == before["mean"][0] and torch.equal(after["mean"][1], before["mean"][1])
    assert after["mean+std"][0] != pytest.approx(before["mean+std"][0], rel=1e-3)


# --------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("loss", ["mean", "mean+std"])
def test_distillation_lowers_the_loss(tiny, loss):
    result = distill.distill(tiny, num_images=3, batch_size=2, iterations=25, loss=loss, image_size=SMALL,
                             snapshot_at=(0, 10, 25), progress=False)
    assert result.images.shape == (3, 3, *SMALL)
    assert result.loss.shape == (2, 25) and result.bn_layers == 20
    assert np.all(result.loss[:, -1] < 0.5 * result.loss[:, 0])
    assert set(result.snapshots) == {0, 10, 25} and result.snapshots[0].shape == (2, 3, *SMALL)
    torch.testing.assert_close(result.snapshots[25], result.images[:2])
    assert not torch.equal(result.snapshots[0], result.snapshots[10])
    if loss == "mean":
        assert np.all(result.std_loss == 0) and np.all(result.lr == 0.1)
    else:  # paper 4.2.2: lr / 5 at iterations 20 and 75
        assert result.lr[0, 19] == pytest.approx(0.1) and result.lr[0, 20] == pytest.approx(0.02)
        np.testing.assert_allclose(result.loss, result.mean_loss + result.std_loss, rtol=1e-5)


def test_deterministic_by_seed_and_default_size(tiny):
    a = distill.distill(tiny, num_images=1, batch_size=1, iterations=2, progress=False, seed=3)
    b = distill.distill(tiny, num_images=1, batch_size=1, iterations=2, progress=False, seed=3)
    c = distill.distill(tiny, num_images=1, batch_size=1, iterations=2, progress=False, seed=4)
    assert a.images.shape == (1, 3, 128, 160)  # the detector's input size
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert all(p.requires_grad for p in tiny.parameters()) and not tiny.backbone.body.training


def test_initial_noise_is_standard_normal(tiny):
    result = distill.distill(tiny, num_images=4, batch_size=4, iterations=1, image_size=SMALL,
                             snapshot_at=(0,), snapshot_images=4, progress=False)
    start = result.snapshots[0]
    assert abs(start.mean().item()) < 0.02 and abs(start.std().item() - 1) < 0.02


def test_clamp_keeps_pixels_in_the_normalised_range(tiny):
    low, high = distill.pixel_range(tiny)
    free = distill.distill(tiny, num_images=2, batch_size=2, iterations=5, image_size=SMALL, progress=False)
    kept = distill.distill(tiny, num_images=2, batch_size=2, iterations=5, image_size=SMALL, clamp=True,
                           progress=False)
    per_channel = lambda x: (x.transpose(0, 1).flatten(1).amin(1), x.transpose(0, 1).flatten(1).amax(1))
    lo, hi = per_channel(free.images)
    assert torch.any(lo < low) or torch.any(hi > high)  # without the clamp pixels leave [0, 1]
    lo, hi = per_channel(kept.images)
    assert torch.all(lo >= low - 1e-6) and torch.all(hi <= high + 1e-6)
    torch.testing.assert_close(lo, low)  # the clamp is active, not vacuous
    pixels = distill.to_pixels(kept.images, tiny)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_non_finite_loss_names_the_iteration(tiny):
    net = frozen_resnet18()
    list(distill.bn_layers(net).values())[3].running_mean[0] = float("nan")
    with pytest.raises(distill.DistillationDiverged, match="iteration 0"):
        distill.distill(net, num_images=1, batch_size=1, iterations=3, image_size=SMALL, progress=False)
    # a learning rate that throws the pixels to 1e30 overflows the statistics one step later
    with pytest.raises(distill.DistillationDiverged, match="iteration 1 "):
        distill.distill(tiny, num_images=1, batch_size=1, iterations=3, lr=1e30, image_size=SMALL, progress=False)


def test_bad_arguments_fail_early(tiny):
    with pytest.raises(ValueError, match="loss"):
        distill.distill(tiny, loss="std")
    with pytest.raises(ValueError, match="snapshot_at"):
        distill.distill(tiny, iterations=10, snapshot_at=(11,))
    with pytest.raises(ValueError, match="image_size"):
        distill.distill(frozen_resnet18(), iterations=1)
    with pytest.raises(ValueError, match="no BatchNorm"):
        distill.BNStatisticsLoss(nn.Conv2d(3, 3, 1))


def test_mean_with_a_broadcast_backward_equals_torch_mean():
    x = torch.randn(3, 4, 50, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64)
    (distill._Mean.apply(x) * weight).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (x.mean(-1) * weight).sum().backward()
    assert torch.equal(ours, x.grad)
    assert torch.autograd.gradcheck(distill._Mean.apply, (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),))
