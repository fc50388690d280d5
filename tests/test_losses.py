"""Losses move the right way, and ignore what they should ignore."""

import pytest
import torch
import torch.nn.functional as F

from multiconcept.losses import (
    balanced_l1_loc_loss,
    bind_loss,
    mask_attention_loss,
    masked_mse,
    separation_loss,
    soft_iou,
    suppress,
)


def blob(cy, cx, size=16, radius=3.0):
    """A soft round blob ``h w`` centred at (cy, cx)."""
    y, x = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))


def box(y0, y1, x0, x1, size=16):
    m = torch.zeros(size, size)
    m[y0:y1, x0:x1] = 1
    return m


def test_soft_iou_identical_and_disjoint():
    a, b = box(0, 8, 0, 8), box(8, 16, 8, 16)
    assert soft_iou(a, a).item() == pytest.approx(1.0)
    assert soft_iou(a, b).item() == pytest.approx(1 / 129)
    assert soft_iou(torch.stack([a, b]), torch.stack([a, a])).shape == (2,)


def test_suppress_power():
    a = torch.tensor([[0.5, 1.0]])
    assert suppress(a).tolist() == [[0.25, 1.0]]
    assert suppress(a, power=4).tolist() == [[0.0625, 1.0]]
    assert suppress(a, power=1) is a


def test_bind_loss_decreases_as_modifier_moves_onto_class():
    cls = torch.stack([blob(4, 4), blob(11, 11)])[None]  # batch concept h w
    far = torch.stack([blob(12, 3), blob(3, 12)])[None]
    near = torch.stack([blob(5, 5), blob(10, 11)])[None]
    on = cls.clone()
    losses = [bind_loss(cls, m).item() for m in (far, near, on)]
    assert losses[0] > losses[1] > losses[2]
    for smooth, power in [(False, 2), (True, 1), (True, 4)]:  # the ablations still rank the same
        assert bind_loss(cls, far, smooth, power) > bind_loss(cls, on, smooth, power)


def test_bind_loss_stops_gradient_into_class_maps():
    cls = torch.stack([blob(4, 4), blob(11, 11)]).requires_grad_()
    mod = torch.stack([blob(12, 3), blob(3, 12)]).requires_grad_()
    bind_loss(cls, mod).backward()
    assert cls.grad is None or cls.grad.abs().sum() == 0
    assert mod.grad.abs().sum() > 0


def test_bind_loss_gradient_descent_pulls_modifier_onto_class():
    cls = blob(4, 4)[None, None]
    # a spatial softmax over logits stands in for attention probabilities
    logits = (0.1 * blob(12, 12)).view(1, 1, 16, 16).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.1)
    start = bind_loss(cls, logits.flatten(-2).softmax(-1).view_as(logits)).item()
    for _ in range(100):
        mod = logits.flatten(-2).softmax(-1).view_as(logits)
        loss = bind_loss(cls, mod)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mod = logits.flatten(-2).softmax(-1).view_as(logits)[0, 0]
    assert bind_loss(cls, mod[None, None]).item() < 0.75 * start
    # the normalised map's centre of mass moved from (12, 12) to near (4, 4)
    w = (mod - mod.min()) / (mod.max() - mod.min())
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centre = torch.stack([(w * ys).sum(), (w * xs).sum()]) / w.sum()
    assert (centre - 4).abs().max() < 2.5, centre


def test_separation_loss_prefers_apart_and_flows_into_both():
    overlapping = torch.stack([blob(6, 6), blob(7, 7)])[None].requires_grad_()
    apart = torch.stack([blob(3, 3), blob(12, 12)])[None]
    loss = separation_loss(overlapping)
    assert loss > separation_loss(apart)
    loss.backward()
    assert overlapping.grad[0, 0].abs().sum() > 0 and overlapping.grad[0, 1].abs().sum() > 0
    three = torch.stack([blob(3, 3), blob(12, 12), blob(3, 12)])
    assert separation_loss(three) < separation_loss(torch.stack([blob(3, 3), blob(3, 3), blob(3, 12)]))
    single = blob(3, 3)[None, None].requires_grad_()
    zero = separation_loss(single)
    assert zero.item() == 0.0
    zero.backward()  # connected to the graph


def test_mask_attention_loss_zero_on_mask_and_resizes():
    mask = box(4, 12, 2, 10, size=64 // 4)
    big = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 64×64 version
    maps = (0.3 * mask)[None, None]
    assert mask_attention_loss(maps, big[None, None]).item() == pytest.approx(0.0, abs=1e-6)
    wrong = (0.3 * box(0, 4, 12, 16))[None, None]
    assert mask_attention_loss(wrong, big[None, None]) > 0.2
    two = torch.cat([maps, wrong], dim=1)
    masks = big[None, None].expand(1, 2, 64, 64)
    assert mask_attention_loss(two, masks, reduction="sum") == pytest.approx(
        2 * mask_attention_loss(two, masks).item()
    )
    assert mask_attention_loss(two, masks, valid=torch.tensor([[True, False]])).item() == pytest.approx(0, abs=1e-6)


def test_balanced_l1_sign_follows_where_attention_lies():
    mask = box(0, 8, 0, 16)[None, None]
    inside = box(2, 6, 4, 12)[None, None] / 32
    outside = box(10, 14, 4, 12)[None, None] / 32
    assert balanced_l1_loc_loss(inside, mask) < 0
    assert balanced_l1_loc_loss(outside, mask) > 0
    # exact value: mean outside (0) − mean inside (32 px of 1/32 over 128 px)
    assert balanced_l1_loc_loss(inside, mask).item() == pytest.approx(-1 / 128, rel=1e-3)
    # padded subjects are ignored
    both = torch.cat([inside, outside], dim=1)
    masks = mask.expand(1, 2, 16, 16)
    valid = torch.tensor([[True, False]])
    assert balanced_l1_loc_loss(both, masks, valid) == pytest.approx(balanced_l1_loc_loss(inside, mask).item())


def test_masked_mse_ignores_pixels_outside_mask():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 8, 8)
    mask[:, :4] = 1
    loss = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[:, :, 4:] += 100.0  # only outside the mask
    assert masked_mse(changed, target, mask).item() == pytest.approx(loss.item())
    changed[:, :, :4] += 1.0
    assert masked_mse(changed, target, mask) > loss
    # it is the mean over the masked elements, and a full mask is plain MSE
    assert loss.item() == pytest.approx(F.mse_loss(pred[:, :, :4], target[:, :, :4]).item(), rel=1e-5)
    assert masked_mse(pred, target, torch.ones(2, 1, 8, 8)).item() == pytest.approx(F.mse_loss(pred, target).item())
    assert masked_mse(pred, target, None).item() == pytest.approx(F.mse_loss(pred, target).item())
    with pytest.raises(ValueError, match="resize_mask"):
        masked_mse(pred, target, torch.ones(2, 16, 16))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_diffusion_target_follows_the_schedulers_prediction_type(kind):
    from diffusers import DDPMScheduler

    from multiconcept.losses import diffusion_target

    sched = DDPMScheduler(prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    expected = {"epsilon": noise, "v_prediction": sched.get_velocity(z0, noise, t), "sample": z0}[kind]
    torch.testing.assert_close(diffusion_target(sched, z0, noise, t), expected)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_put_every_target_on_the_same_clipped_x0_weight(kind):
    """Whatever the target, weight × (the target's x₀-space factor) = min(SNR, γ)."""
    from diffusers import DDPMScheduler

    from multiconcept.losses import min_snr_weights

    sched = DDPMScheduler(prediction_type=kind)
    t = torch.tensor([0, 300, 700, 999])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    factor = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
    w = min_snr_weights(sched, t, gamma=5.0)
    torch.testing.assert_close(w * factor, snr.clamp(max=5.0))


def test_min_snr_weights_are_zero_not_nan_at_zero_terminal_snr():
    from diffusers import DDPMScheduler

    from multiconcept.losses import min_snr_weights

    sched = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    w = min_snr_weights(sched, torch.tensor([999, 500]), gamma=5.0)
    assert w[0].item() == 0.0 and 0 < w[1].item() < 1
