"""Attention capture on a tiny UNet: same output as SDPA, right maps, right layers."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from PIL import Image

from multiconcept.attention import (
    AttentionStore,
    CaptureAttnProcessor,
    capture_attention,
    gaussian_kernel_1d,
    gaussian_smooth,
    minmax_normalize,
    resize_mask,
)
from multiconcept.errors import UserError
from multiconcept.heatmaps import save_heatmaps

TOKENS = 7
CROSS_DIM = 32


def tiny_unet() -> UNet2DConditionModel:
    # Three levels: attn2 at 16² (down0, up2 ×2), 8² (down1, up1 ×2), 4² (mid).
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def inputs(batch=2, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, h, w, generator=g),
        torch.tensor(10),
        torch.randn(batch, TOKENS, CROSS_DIM, generator=g),
    )


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_capture_output_equals_sdpa(unet, hw):
    x, t, ctx = inputs(h=hw[0], w=hw[1])
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        store = AttentionStore(resolutions=None)
        with capture_attention(unet, store):
            out = unet(x, t, ctx).sample
    assert store.num_captured == 7  # every attn2 layer ran the explicit path
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_capture_output_with_encoder_attention_mask(unet):
    x, t, ctx = inputs()
    mask = torch.ones(2, TOKENS)
    mask[:, -3:] = 0  # padded tokens
    with torch.no_grad():
        ref = unet(x, t, ctx, encoder_attention_mask=mask).sample
        store = AttentionStore()
        with capture_attention(unet, store):
            out = unet(x, t, ctx, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # masked tokens get no probability
    assert store.maps(16)[:, -3:].abs().max() < 1e-6


def test_processor_mirrors_sdpa_on_unusual_attention():
    # 4-D input, group norm, cross norm, residual, rescale, multiple heads, mask
    torch.manual_seed(0)
    attn = Attention(
        query_dim=16, cross_attention_dim=12, heads=4, dim_head=8, norm_num_groups=4,
        cross_attention_norm="layer_norm", residual_connection=True, rescale_output_factor=2.0,
    )
    x = torch.randn(2, 16, 6, 10)
    ctx = torch.randn(2, 5, 12)
    mask = torch.zeros(2, 1, 5)
    mask[0, 0, 3:] = -10000.0
    store = AttentionStore()
    ref = AttnProcessor2_0()(attn, x, ctx, attention_mask=mask)
    out = CaptureAttnProcessor(store, "layer")(attn, x, ctx, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    maps = store.layer_maps()["layer"]
    assert maps.shape == (2, 4, 5, 6, 10)  # batch heads token h w (from the 4-D input)
    assert maps[0, :, 3:].max() < 1e-3


def test_maps_sum_to_one_over_tokens(unet):
    x, t, ctx = inputs()
    store = AttentionStore()
    with torch.no_grad(), capture_attention(unet, store):
        unet(x, t, ctx)
    for res, side in [(16, 16), (8, 8), (4, 4)]:
        m = store.maps(res)
        assert m.shape == (2, TOKENS, side, side)
        torch.testing.assert_close(m.sum(1), torch.ones(2, side, side))
    for m in store.layer_maps().values():
        torch.testing.assert_close(m.sum(2), torch.ones_like(m.sum(2)))


@pytest.mark.parametrize(
    "resolutions, layers",
    [
        ([8], {"down_blocks.1", "up_blocks.1"}),
        ([4], {"mid_block"}),
        ([16, 4], {"down_blocks.0", "up_blocks.2", "mid_block"}),
    ],
)
def test_only_requested_resolutions_are_captured(unet, resolutions, layers):
    x, t, ctx = inputs()
    store = AttentionStore(resolutions=resolutions)
    with torch.no_grad(), capture_attention(unet, store):
        unet(x, t, ctx)
    expected = {"down_blocks.0": 1, "down_blocks.1": 1, "mid_block": 1, "up_blocks.1": 2, "up_blocks.2": 2}
    assert store.num_captured == sum(expected[k] for k in layers)
    assert {n.split(".attentions")[0] for n in store.captured_layers} == layers
    assert store.captured_resolutions == sorted(resolutions)
    with pytest.raises(ValueError, match="no maps at resolution"):
        store.maps(2)


def test_non_square_latent_maps_keep_aspect(unet):
    x, t, ctx = inputs(h=16, w=24)
    store = AttentionStore(resolutions=[8])  # short side 8: the 8×12 level
    with torch.no_grad(), capture_attention(unet, store):
        unet(x, t, ctx)
    assert store.maps().shape == (2, TOKENS, 8, 12)
    assert store.num_captured == 3


def test_processors_restored_after_context(unet):
    before = unet.attn_processors
    store = AttentionStore()
    with capture_attention(unet, store):
        during = unet.attn_processors
        assert sum(isinstance(p, CaptureAttnProcessor) for p in during.values()) == 7
        assert not any(isinstance(p, CaptureAttnProcessor) for k, p in during.items() if "attn1" in k)
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    # also after an exception, and with no hooks left behind
    with pytest.raises(RuntimeError):
        with capture_attention(unet, store):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is before[k] for k in before)
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_previous_processor_kept_on_uncaptured_layers():
    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())  # the classic, non-SDPA one
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        store = AttentionStore(resolutions=[4])
        with capture_attention(unet, store):
            out = unet(x, t, ctx).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert isinstance(unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"], AttnProcessor)


def test_custom_processor_is_refused():
    unet = tiny_unet()

    class Custom(AttnProcessor2_0):
        pass

    class Other:
        def __call__(self, attn, hidden_states, **kwargs):
            return hidden_states

    unet.set_attn_processor({k: (Other() if "attn2" in k else AttnProcessor2_0()) for k in unet.attn_processors})
    with pytest.raises(UserError, match="not plain softmax attention"):
        with capture_attention(unet, AttentionStore()):
            pass
    assert not any(isinstance(p, CaptureAttnProcessor) for p in unet.attn_processors.values())
    unet.set_attn_processor(Custom())  # a subclass may change the math: refused too
    with pytest.raises(UserError, match="Custom"):
        with capture_attention(unet, AttentionStore()):
            pass
    unet.set_attn_processor(AttnProcessor2_0())
    with capture_attention(unet, AttentionStore()):
        with pytest.raises(ValueError, match="already capturing"):
            with capture_attention(unet, AttentionStore()):
                pass
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_with_grad_backprops_into_to_k(unet):
    x, t, ctx = inputs()
    store = AttentionStore(resolutions=[8], token_indices=[2, 3], with_grad=True)
    unet.zero_grad(set_to_none=True)
    with capture_attention(unet, store):
        unet(x, t, ctx)
    maps = store.maps(8)
    assert maps.shape == (2, 2, 8, 8) and maps.requires_grad
    (maps[:, 0] * torch.linspace(0, 1, 64).view(8, 8)).sum().backward()
    for name in store.captured_layers:
        grad = unet.get_submodule(name).to_k.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    unet.zero_grad(set_to_none=True)


def test_detached_store_keeps_no_graph(unet):
    x, t, ctx = inputs()
    store = AttentionStore(resolutions=[8], with_grad=False)
    with capture_attention(unet, store):  # grad enabled: the UNet output has a graph
        out = unet(x, t, ctx).sample
    assert out.requires_grad
    assert all(m.grad_fn is None and not m.requires_grad for m in store.layer_maps().values())
    assert not store.maps().requires_grad


def test_gradient_checkpointing_records_once_and_backprops():
    unet = tiny_unet().train()
    unet.enable_gradient_checkpointing()
    x, t, ctx = inputs()
    store = AttentionStore(resolutions=[16], with_grad=True)
    with capture_attention(unet, store):
        out = unet(x, t, ctx).sample
        loss = out.pow(2).mean() + store.maps().pow(2).mean()
        loss.backward()  # recomputes the processors inside the context
    assert store.num_captured == 3
    grad = unet.get_submodule(store.captured_layers[0]).to_k.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_token_indices_select_columns(unet):
    x, t, ctx = inputs()
    full, some, per_sample = AttentionStore([16]), AttentionStore([16], token_indices=torch.tensor([4, 1])), AttentionStore(
        [16], token_indices=torch.tensor([[0, 5], [6, 2]])
    )
    with torch.no_grad():
        for store in (full, some, per_sample):
            with capture_attention(unet, store):
                unet(x, t, ctx)
    f = full.maps()
    torch.testing.assert_close(some.maps(), f[:, [4, 1]])
    torch.testing.assert_close(per_sample.maps()[0], f[0, [0, 5]])
    torch.testing.assert_close(per_sample.maps()[1], f[1, [6, 2]])


def test_accumulate_and_batch_slice(unet):
    (x1, t, ctx), (x2, _, _) = inputs(seed=1), inputs(seed=2)
    a = AttentionStore([8], accumulate=True, batch_slice="cond")
    one, two = AttentionStore([8]), AttentionStore([8])
    with torch.no_grad():
        with capture_attention(unet, a):
            unet(x1, t, ctx)
            unet(x2, t, ctx)
        with capture_attention(unet, one):
            unet(x1, t, ctx)
        with capture_attention(unet, two):
            unet(x2, t, ctx)
    assert a.num_captured == 6 and len(a.captured_layers) == 3
    expected = (one.maps() + two.maps())[1:] / 2  # the second ("cond") half of the batch
    torch.testing.assert_close(a.maps(), expected)
    a.reset()
    assert a.num_captured == 0 and a.captured_layers == []


def test_store_rejects_bad_options():
    with pytest.raises(ValueError, match="with_grad"):
        AttentionStore(with_grad=True, accumulate=True)
    with pytest.raises(ValueError, match="batch_slice"):
        AttentionStore(batch_slice="second")


# ---------------------------------------------------------------- map ops


def test_gaussian_kernel_matches_disendiff():
    torch.testing.assert_close(gaussian_kernel_1d(), torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4, rtol=0)
    delta = torch.zeros(1, 7, 7)
    delta[0, 3, 3] = 1.0
    out = gaussian_smooth(delta)
    assert out[0, 3, 3] == pytest.approx(0.5761**2, abs=1e-4)
    assert out[0, 2, 3] == pytest.approx(0.5761 * 0.2119, abs=1e-4)
    assert out[0, 2, 2] == pytest.approx(0.2119**2, abs=1e-4)
    # reflect padding keeps a constant map constant (zero padding would not)
    torch.testing.assert_close(gaussian_smooth(torch.ones(2, 3, 5, 5)), torch.ones(2, 3, 5, 5))


def test_minmax_normalize_per_map():
    maps = torch.stack([torch.arange(16.0).view(4, 4), 5 + 2 * torch.arange(16.0).view(4, 4)])
    out = minmax_normalize(maps)
    assert out.amin(dim=(-2, -1)).tolist() == [0, 0]
    torch.testing.assert_close(out.amax(dim=(-2, -1)), torch.ones(2))
    torch.testing.assert_close(out[0], out[1])


def test_resize_mask_area_keeps_coverage():
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, :32] = True
    small = resize_mask(mask, (16, 16))
    assert small.shape == (2, 16, 16) and small.dtype == torch.float32
    assert small[0].mean() == pytest.approx(0.5) and small[1].sum() == 0
    assert resize_mask(torch.ones(1, 1, 4, 4), (8, 8)).shape == (1, 1, 8, 8)


def test_save_heatmaps_writes_pngs(tmp_path):
    maps = torch.rand(3, 8, 8)
    paths = save_heatmaps(maps, ["<new1>", "cat", "dog"], tmp_path / "h", prefix="s0_")
    assert [p.name for p in paths] == ["s0_00_new1.png", "s0_01_cat.png", "s0_02_dog.png"]
    assert all(p.exists() for p in paths)
    assert Image.open(paths[0]).size == (256, 256)
    image = Image.fromarray(np.full((40, 60, 3), 200, np.uint8))
    blended = save_heatmaps(maps[:1], ["cat"], tmp_path / "h", image=image, prefix="b_")
    assert Image.open(blended[0]).size == (60, 40)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == sorted(p.name for p in paths + blended)  # no temp files
    with pytest.raises(ValueError, match="labels"):
        save_heatmaps(maps, ["a"], tmp_path)
