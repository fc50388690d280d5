"""The ToyWorld build's resume guard: a work dir only continues under the settings it was started with."""

from __future__ import annotations

import pytest

from multiconcept.errors import UserError
from multiconcept.workflows.generate import SCHEDULERS
from multiconcept.workflows.toyworld_build.settings import BuildConfig, check_state
from multiconcept.workflows.toyworld_build.unet import make_schedulers


def test_a_work_dir_resumes_only_with_its_own_settings(tmp_path):
    check_state(tmp_path, BuildConfig(), resume=True)
    check_state(tmp_path, BuildConfig(unet_steps=99, threads=1), resume=True)  # runtime fields may change
    with pytest.raises(UserError, match="vae_lr"):
        check_state(tmp_path, BuildConfig(vae_lr=1.0), resume=True)


def test_a_build_started_as_the_creatures_world_resumes_and_a_shapes_one_is_refused(tmp_path):
    """Work dirs started when the build had two worlds hold "world" and "base_layout" in state.json and in
    every checkpoint's digest; the first creatures build's checkpoints carry this UNet digest."""
    import json
    from dataclasses import asdict

    from multiconcept.workflows.toyworld_build.settings import stage_digest

    old = asdict(BuildConfig()) | {"world": "creatures", "base_layout": "fixed", "vae_max_minutes": 60.0}
    (tmp_path / "state.json").write_text(json.dumps({"config": old}))
    check_state(tmp_path, BuildConfig(), resume=True)
    assert stage_digest(BuildConfig(**old), "unet") == stage_digest(BuildConfig(), "unet") == "60068bcdfb113034"
    (tmp_path / "state.json").write_text(json.dumps({"config": old | {"world": "shapes", "base_layout": "free"}}))
    with pytest.raises(UserError, match="world"):
        check_state(tmp_path, BuildConfig(), resume=True)
    with pytest.raises(UserError, match="world .*must be one of creatures"):
        BuildConfig(world="shapes")


def test_an_old_work_dirs_checkpoint_is_refused_with_how_to_start_over(tmp_path):
    """Checkpoints in the build's former format (one 'meta' key) are not resumed into the one loop."""
    import torch
    from safetensors.torch import save_file

    from multiconcept.workflows.toyworld_build.common import Log, StageJob, stage_loop

    save_file({"m.weight": torch.zeros(2, 3)}, str(tmp_path / "ckpt.safetensors"), metadata={"meta": "{}"})
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(UserError, match="earlier multiconcept.*to start over"):
        stage_loop("t", StageJob(lambda step: model(torch.ones(1, 3)).sum(), {"m": model}), opt, steps=2,
                   max_minutes=None, peak_lr=1e-3, warmup=1, checkpoint=tmp_path / "ckpt.safetensors", digest="d",
                   checkpoint_minutes=0, log=Log(tmp_path / "log", echo=False))


@pytest.mark.parametrize("prediction_type, schedule, first, last",
                         [("v_prediction", "scaled_linear_zero_snr", 999, 32), ("v_prediction", "linear", 999, 32),
                          ("epsilon", "linear", 958, 1)])
def test_the_build_samples_where_its_unet_was_trained(prediction_type, schedule, first, last):
    # v-prediction pairs with "trailing" timesteps so sampling starts at pure noise (t = 999);
    # epsilon runs keep their old "leading" spacing, so resumed old builds sample as before.
    train, sample = make_schedulers(prediction_type, schedule)
    assert train.config.prediction_type == sample.config.prediction_type == prediction_type
    sample.set_timesteps(30)
    assert (int(sample.timesteps[0]), int(sample.timesteps[-1])) == (first, last)


def test_zero_terminal_snr_needs_v_prediction():
    train, _ = make_schedulers("v_prediction", "scaled_linear_zero_snr")
    assert float(train.alphas_cumprod[-1]) == 0.0  # pure noise at t = T: no mean colour leaks through
    with pytest.raises(UserError, match="v_prediction"):
        make_schedulers("epsilon", "scaled_linear_zero_snr")


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_stays_finite_on_the_zero_snr_schedule(name):
    """`--scheduler X` builds X from the base's scheduler config; at zero terminal SNR a
    sampler that divides by sqrt(alpha_bar) would produce inf/NaN on the first step."""
    import diffusers
    import torch

    _, ddim = make_schedulers()
    sched = getattr(diffusers, SCHEDULERS[name]).from_config(ddim.config)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        v = 0.5 * torch.randn(1, 4, 8, 8, generator=g)  # any bounded model output
        sched.scale_model_input(x, t)
        x = sched.step(v, t, x, generator=g).prev_sample if "generator" in sched.step.__code__.co_varnames \
            else sched.step(v, t, x).prev_sample
    assert torch.isfinite(x).all() and x.abs().max() < 100, name


def test_an_unknown_text_encoder_is_refused_before_any_work(tmp_path):
    from multiconcept.workflows.toyworld_build import build

    with pytest.raises(UserError, match="text_encoder"):
        build(tmp_path / "out", tmp_path / "work", config=BuildConfig(text_encoder="clip-l"), progress=False)
    assert not (tmp_path / "work").exists()


def test_every_training_caption_fits_the_text_context(tmp_path):
    """The base's context is short (32, not SD's 77) so padding does not swamp the prompt;
    a caption longer than it would lose its last words in training."""
    import numpy as np

    from multiconcept.toyworld import base_training_scene, caption
    from multiconcept.workflows.toyworld_build.common import Log
    from multiconcept.workflows.toyworld_build.tokenizer import train_tokenizer

    cfg = BuildConfig()
    tokenizer = train_tokenizer(cfg, tmp_path / "tok", Log(tmp_path / "log", echo=False))
    assert tokenizer.model_max_length == cfg.max_length
    rng = np.random.default_rng(3)
    lengths = [len(tokenizer(caption(s.to_dict(), rng if i % 2 else None)).input_ids)
               for i, s in enumerate(base_training_scene(rng) for _ in range(2000))]
    assert max(lengths) <= cfg.max_length, max(lengths)


def test_logit_normal_timesteps_spend_more_steps_where_the_class_decides_the_shape():
    import torch

    from multiconcept.workflows.toyworld_build.unet import sample_timesteps

    def share(cfg):
        t = sample_timesteps(cfg, 20000, 1000, torch.Generator().manual_seed(0))
        assert 0 <= int(t.min()) and int(t.max()) <= 999
        return float(((t >= 600) & (t < 850)).float().mean())

    uniform = share(BuildConfig(timestep_sampling="uniform"))
    focused = share(BuildConfig(timestep_sampling="logit_normal", timestep_mean=0.5, timestep_std=1.2))
    assert uniform == pytest.approx(0.25, abs=0.02) and focused > uniform + 0.03, (uniform, focused)


def test_mixed_timesteps_keep_the_highest_noise_share_and_add_the_middle():
    import torch

    from multiconcept.workflows.toyworld_build.unet import sample_timesteps

    def shares(cfg):
        t = sample_timesteps(cfg, 20000, 1000, torch.Generator().manual_seed(0))
        assert 0 <= int(t.min()) and int(t.max()) <= 999
        return float((t >= 950).float().mean()), float(((t >= 600) & (t < 850)).float().mean())

    top_u, mid_u = shares(BuildConfig(timestep_sampling="uniform"))
    top_l, mid_l = shares(BuildConfig(timestep_sampling="logit_normal", timestep_mean=1.0, timestep_std=1.0))
    top_m, mid_m = shares(BuildConfig(timestep_sampling="mixed", timestep_mean=1.0, timestep_std=1.0))
    assert top_m == pytest.approx((top_u + top_l) / 2, abs=0.01) and top_m > top_l + 0.005
    assert mid_m == pytest.approx((mid_u + mid_l) / 2, abs=0.015) and mid_m > mid_u + 0.03


def test_offset_noise_spreads_each_channels_mean_and_is_off_by_default():
    import torch

    from multiconcept.workflows.toyworld_build.unet import training_noise

    def channel_mean_std(cfg):
        return float(training_noise(cfg, (4096, 4, 16, 16), torch.Generator().manual_seed(0)).mean((2, 3)).std())

    plain, offset = channel_mean_std(BuildConfig()), channel_mean_std(BuildConfig(noise_offset=0.1))
    assert plain == pytest.approx(1 / 16, rel=0.05)  # the mean of 256 unit normals
    assert offset == pytest.approx((1 / 256 + 0.01) ** 0.5, rel=0.05)
    torch.testing.assert_close(training_noise(BuildConfig(), (2, 4, 16, 16), torch.Generator().manual_seed(3)),
                               torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3)))


def test_the_curriculum_share_draws_single_object_scenes():
    import numpy as np

    from multiconcept.workflows.toyworld_build.unet import batch_indices

    singles = np.arange(0, 100, 3)
    idx, easy = batch_indices(BuildConfig(easy_share=0.5), 100, singles, np.random.default_rng(0))
    assert len(idx) == 16 and sum(easy) == 8 and set(idx[:8]) <= set(singles)
    idx, easy = batch_indices(BuildConfig(), 100, singles, np.random.default_rng(0))
    assert not any(easy)  # the default keeps the old draw: old work dirs resume on the same batches
    np.testing.assert_array_equal(idx, np.random.default_rng(0).integers(100, size=16))


def test_a_quick_build_runs_every_stage_end_to_end(tmp_path):
    """Tokenizer, VAE, the two CLIPs, latent pool, UNet, shipping and the quality report, each through
    the one training loop, with tiny step counts; the shipped folder loads as a base and draws."""
    from multiconcept.models import load_base
    from multiconcept.workflows.toyworld_build import build

    report = build(tmp_path / "out", tmp_path / "work", config=BuildConfig.quick(), progress=False)
    assert report["unet_training"]["steps"] == 3 and report["single_object"]["prompts"] > 0
    assert set(report["clips"]) == {"evaluator", "encoder"} and (tmp_path / "out" / "encoder" / "config.json").is_file()
    assert not list((tmp_path / "work").glob("ckpt_*.safetensors"))  # finished stages discard their checkpoints
    base = load_base(str(tmp_path / "out" / "base"))
    image = base.pipe("a red robot on a gray background", num_inference_steps=2).images[0]
    assert image.size == (64, 64)
