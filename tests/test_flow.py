"""Flow-matching transformer bases (FLUX.1, FLUX.2 [klein], SD3): the tiny pipelines, their conditioning
sequence, and the rectified-flow loss of the one training loop against diffusers' own helpers."""

import pytest
import torch

from multiconcept.data import build_concept_set
from multiconcept.methods import get_method
from multiconcept.methods.finetune import Trainer
from multiconcept.models import load_base
from multiconcept.prompts import Concept, locate_concepts

FLOW_BASES = ["tiny-flux", "tiny-flux2", "tiny-sd3"]


@pytest.mark.parametrize("name,arch,encoders", [("tiny-flux", "flux1", 2), ("tiny-flux-schnell", "flux1", 2),
                                                ("tiny-flux2", "flux2", 1), ("tiny-sd3", "sd3", 3),
                                                ("tiny-sd3-no-t5", "sd3", 2)])
def test_tiny_flow_bases_are_diffusers_pipelines_of_their_architecture(name, arch, encoders):
    base = load_base(name)
    assert base.architecture == arch and base.denoiser_name == "transformer" and base.resolution == 32
    assert len(base.text_encoders) == len(base.tokenizers) == encoders
    assert type(base.pipe).__name__ == {"flux1": "FluxPipeline", "flux2": "Flux2KleinPipeline",
                                        "sd3": "StableDiffusion3Pipeline"}[arch]
    assert base.fingerprint == load_base(name).fingerprint  # built from a seed: the same base every time
    assert not any(p.requires_grad for p in base.denoiser.parameters())


@pytest.mark.parametrize("name", FLOW_BASES)
def test_sequence_positions_are_where_the_pipeline_puts_the_prompt(name):
    """Our view of the conditioning sequence against the ids the pipeline's encode_prompt feeds its encoders:
    a concept token sits where the encoder whose states fill that part of the sequence reads it (FLUX.1: T5's;
    SD3: CLIP's 77, then T5's; FLUX.2 [klein]: Qwen's, after the chat template's opening)."""
    from multiconcept.prompts import add_concept_tokens

    base = load_base(name)
    concepts = [Concept("<a1>", "cat")]
    for tok, te in zip(base.tokenizers, base.text_encoders):
        add_concept_tokens(tok, te, concepts)
    prompt = "photo of a <a1> cat"
    enc = locate_concepts(base.sequence_tokenizer, prompt, concepts)
    fed = {}
    def record(k):
        def hook(module, args, out):
            fed.setdefault(k, args[0][0].tolist())
        return hook

    hooks = [te.get_input_embeddings().register_forward_hook(record(k)) for k, te in enumerate(base.text_encoders)]
    with torch.no_grad():
        hidden = base.flow.encode(base.pipe, [prompt], base.sequence_length)[0]
    for h in hooks:
        h.remove()
    where = {k: [i for i, t in enumerate(ids) if t == base.tokenizers[k].convert_tokens_to_ids("<a1>")] for k, ids in fed.items()}
    expected = where[1] if name == "tiny-flux" else where[0] + [77 + i for i in where.get(2, [])]
    assert where[0] == where.get(1, where[0]) or name == "tiny-flux"  # SD3's CLIP-L and CLIP-G read it alike
    assert expected and sorted(enc.positions["<a1>"]) == sorted(expected), (enc.positions, where)
    assert hidden.shape[1] == {"tiny-sd3": 77 + base.sequence_length}.get(name, base.sequence_length)


@pytest.mark.parametrize("name", FLOW_BASES)
def test_one_batch_loss_is_the_flow_matching_loss_by_hand(scene, name):
    """Trainer.loss against the rectified-flow loss written out from diffusers' own helpers: σ and the timestep
    from the scheduler's tables (its shift), x_t = (1 − σ)x₀ + σε, target ε − x₀, the SD3 weighting."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    base = load_base(name)
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [])
    cls = get_method("textual-inversion")
    cfg = cls.Config(batch_size=2, weighting_scheme="logit_normal", logit_mean=0.3, guidance=2.0)
    method = cls(base, data, cfg)
    method.setup()
    try:
        tr = Trainer(method, base, data, cfg)
        batch = tr.batch(0, 0)
        with torch.no_grad():
            ours = tr.loss(batch, torch.Generator().manual_seed(7))[0]
            gen = torch.Generator().manual_seed(7)
            z0 = tr.latents(batch, gen)
            sched = FlowMatchEulerDiscreteScheduler.from_config(base.pipe.scheduler.config)
            u = compute_density_for_timestep_sampling("logit_normal", 2, 0.3, 1.0, 1.29, generator=gen)
            idx = (u * sched.config.num_train_timesteps).long()
            t, sigma = sched.timesteps[idx], sched.sigmas[idx].view(-1, 1, 1, 1)
            noise = torch.randn(z0.shape, generator=gen)
            xt = (1 - sigma) * z0 + sigma * noise
            pipe, b = base.pipe, z0.shape[0]
            if name == "tiny-sd3":
                hidden, _, pooled, _ = pipe.encode_prompt(batch["prompts"], None, None, do_classifier_free_guidance=False,
                                                          max_sequence_length=base.sequence_length)
                pred = pipe.transformer(hidden_states=xt, timestep=t, encoder_hidden_states=hidden,
                                        pooled_projections=pooled).sample
            elif name == "tiny-flux":
                hidden, pooled, txt_ids = pipe.encode_prompt(batch["prompts"], max_sequence_length=base.sequence_length)
                h, w = xt.shape[-2:]
                packed = pipe._pack_latents(xt, b, xt.shape[1], h, w)
                img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype)
                out = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((b,), 2.0),
                                       pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids,
                                       img_ids=img_ids).sample
                pred = pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                            pipe.vae_scale_factor)
            else:
                hidden, txt_ids = pipe.encode_prompt(batch["prompts"], max_sequence_length=base.sequence_length)
                ids = pipe._prepare_latent_ids(xt)
                out = pipe.transformer(hidden_states=pipe._pack_latents(xt), timestep=t / 1000, encoder_hidden_states=hidden,
                                       txt_ids=txt_ids, img_ids=ids).sample
                pred = out.transpose(1, 2).reshape(xt.shape)
            weight = compute_loss_weighting_for_sd3("logit_normal", sigma)
            by_hand = (weight * (pred - (noise - z0)) ** 2).reshape(b, -1).mean(1).mean()
    finally:
        method.teardown()
    assert torch.allclose(ours, by_hand, rtol=1e-5, atol=1e-6), (ours.item(), by_hand.item())


# ---------------------------------------------------------------- bad input: one line, exit 2, before models load


def test_a_bundle_of_one_architecture_is_refused_on_another(scene, tmp_path, run_cli):
    out = tmp_path / "ti.safetensors"
    code, _, err = run_cli("learn", "-m", "textual-inversion", "-c", "<a1>=cat", "-i", scene["image"], "--base",
                           "tiny-flux", "-o", out, "--param", "steps=1")
    assert code == 0, err
    code, _, err = run_cli("inspect", out)
    assert code == 0 and "architecture flux1 (FLUX.1)" in " ".join(_.split())
    for other in ("tiny-sd3", "tiny"):
        code, _, err = run_cli("generate", "photo of a <a1> cat", "-b", out, "--base", other, "-o", tmp_path / "x")
        assert code == 2 and "FLUX.1" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("methods", "disendiff")
    assert code == 0 and "FLUX.2 [klein]" in _ and "SD3" in _


def test_tuning_free_methods_refuse_a_transformer_base_before_loading(tmp_path, run_cli, monkeypatch):
    import multiconcept.models as models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_base", no_loading)
    code, _, err = run_cli("train-encoder", "--method", "fastcomposer", "--data", "toyworld", "--base", "tiny-flux",
                           "--out", tmp_path / "fc")
    assert code == 2 and "transformer" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "fc").exists()


def test_a_flux_folder_without_t5_is_refused_before_loading(tmp_path, run_cli):
    import json

    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": [None, None], "tokenizer_2": [None, None],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    code, _, err = run_cli("generate", "a cat", "--base", folder, "-o", tmp_path / "x")
    assert code == 2 and "text_encoder_2" in err and "T5" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("base,params,words", [
    ("tiny-flux", ["train_qkv=true"], "to_q"), ("tiny-sd3", ["all_resolutions=true"], "all_resolutions"),
    ("tiny-flux2", ["attention_blocks=5"], "attention_blocks")])
def test_disendiff_settings_without_an_analogue_on_a_transformer_are_refused(scene, tmp_path, run_cli, base, params, words):
    args = ["learn", "-m", "disendiff", "-c", "<a1>=cat", "-i", scene["image"], "--base", base, "-o", tmp_path / "d.safetensors"]
    for p in params:
        args += ["--param", p]
    code, _, err = run_cli(*args)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d.safetensors").exists()


def test_lora_on_klein_text_encoder_is_refused(scene, tmp_path, run_cli):
    code, _, err = run_cli("learn", "-m", "lora", "-c", "<a1>=cat", "-i", scene["image"], "--base", "tiny-flux2",
                           "-o", tmp_path / "l.safetensors", "--param", "train_text_encoder=true")
    assert code == 2 and "Flux2KleinPipeline" in err and len(err.strip().splitlines()) == 1, err


def test_prior_preservation_draws_class_images_with_the_flow_pipeline(scene, tmp_path, run_cli):
    """--reg-generate: the base draws the class prompt (klein's pipeline takes the prompt by keyword, at the
    sequence length training uses), and those images are sampled beside the concept's."""
    out = tmp_path / "cd.safetensors"
    code, _, err = run_cli("learn", "-m", "custom-diffusion", "-c", "<a1>=cat", "-i", scene["image"], "--base", "tiny-flux2",
                           "-o", out, "--reg-generate", "2", "--reg-steps", "2", "--param", "steps=2")
    assert code == 0, err
    assert len(list((tmp_path / "cd.reg").glob("reg_*.png"))) == 2 and out.is_file()


@pytest.mark.parametrize("name", FLOW_BASES)
def test_a_saved_pipeline_folder_is_a_base(tmp_path, run_cli, name):
    """--base FOLDER: diffusers' own from_pretrained of the pipeline class its model_index.json names (T5's and Qwen's
    trained tokenizers saved and read back), the same weights and sequence."""
    from multiconcept.models.tiny_flow import TINY_FLOW

    TINY_FLOW[name]().save_pretrained(tmp_path / "pipe")
    tiny, folder = load_base(name), load_base(str(tmp_path / "pipe"))
    assert folder.architecture == tiny.architecture and folder.weights == tiny.weights
    prompt = "photo of a red cat"
    assert folder.sequence_tokenizer(prompt)["input_ids"] == tiny.sequence_tokenizer(prompt)["input_ids"]
    code, _, err = run_cli("generate", prompt, "--base", tmp_path / "pipe", "--steps", "1", "-n", "1", "-o", tmp_path / "img")
    assert code == 0 and (tmp_path / "img" / "000000.png").is_file(), err
