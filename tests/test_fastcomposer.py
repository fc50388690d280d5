"""FastComposer on the tiny base: parsing, crops, fusion, L_loc at work, delayed
conditioning, the official-checkpoint converter and the CLI verbs."""

import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from multiconcept.errors import UserError
from multiconcept.methods.fastcomposer import (
    FastComposer,
    FastComposerConfig,
    FusionMLP,
    augment_crop,
    parse_subject_prompt,
    subject_crop,
    tiny_image_encoder,
)
from multiconcept.models import load_base
from multiconcept.models.tiny import tiny_tokenizer
from multiconcept.toyworld import concept, layout_specs, render
from multiconcept.workflows.compose import ComposeSettings, make_scheduler, sample, text_only_calls
from multiconcept.workflows.generate import read_png_metadata
from multiconcept.workflows.train_encoder import (
    Annotation,
    EncoderTrainer,
    Record,
    ToyWorldSubjects,
    middle_resolutions,
    train_encoder,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def two_subject_record(caption="a robot and a bird"):
    creatures = [concept("robot_a").creature, concept("bird_b").creature]
    scene = render(layout_specs(creatures, "pair", np.random.default_rng(0)), "gray", "pair")
    return Record(scene.image, caption, [Annotation(s.creature.kind, s.mask, s.box) for s in scene.subjects])


class Fixed:
    """A data source that always yields the same record."""

    name = "fixed"

    def __init__(self, record):
        self.record = record

    def draw(self, n, seed):
        return [self.record] * n


# ---------------------------------------------------------------- prompts


def pieces(tok, sp):
    return tok.convert_ids_to_tokens(sp.input_ids)


def test_markers_flag_the_token_before_them(tok):
    sp = parse_subject_prompt(tok, "a star <img> and a circle <img> on a gray background", 2)
    assert sp.text == "a star and a circle on a gray background"
    assert [pieces(tok, sp)[i] for i in sp.positions] == ["star</w>", "circle</w>"]
    assert sp.input_ids == tok(sp.text).input_ids  # markers are gone from the ids

    # multi-token words: the flagged token is the word's last piece, wherever the word sits
    sp = parse_subject_prompt(tok, "a rendering <|image|> and a painting<img>, on the beach")
    p = pieces(tok, sp)
    assert sp.text == "a rendering and a painting, on the beach"
    for pos, word in zip(sp.positions, ["rendering", "painting"]):
        assert p[pos].endswith("</w>")
        start = max(i for i in range(pos) if i == 0 or p[i - 1].endswith("</w>"))
        assert "".join(p[start : pos + 1]).replace("</w>", "") == word


@pytest.mark.parametrize("prompt, n, words", [
    ("<img> a star", None, "no word before"),
    ("a star <img> <img>", None, "same word"),
    ("a star , <img>", None, "not a word"),
    ("a star <img> and a circle", 2, "1 image marker(s) but 2"),
    ("a star <img> " + "and a circle " * 40, None, "longer than"),
])
def test_bad_prompts_are_one_line_errors(tok, prompt, n, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_subject_prompt(tok, prompt, n)


# ---------------------------------------------------------------- crops and fusion


def test_crop_keeps_the_subject_and_fills_the_rest_with_seeded_noise():
    img = np.full((40, 40, 3), 128, np.uint8)
    img[10:30, 5:35] = (200, 20, 20)  # a 30 x 20 box
    mask = np.zeros((40, 40), bool)
    mask[10:30, 5:35] = True
    mask[10:15, 5:15] = False  # a background pocket inside the box
    crop = subject_crop(img, mask, size=30, rng=np.random.default_rng(1))
    px = (crop * 255).round().numpy().transpose(1, 2, 0)
    assert crop.shape == (3, 30, 30)
    inside = px[5:25][mask[10:30, 5:35]]  # padded square: the 20-high box sits at rows 5..24
    assert np.all(inside == (200, 20, 20))
    outside = np.concatenate([px[:5].reshape(-1, 3), px[25:].reshape(-1, 3), px[5:10, 0:10].reshape(-1, 3)])
    assert not np.any(np.all(outside == 128, axis=-1).mean() > 0.05)  # the gray background is gone
    assert 100 < outside.mean() < 155 and outside.std() > 60  # uniform noise: mean 127.5, std 74
    again = subject_crop(img, mask, size=30, rng=np.random.default_rng(1))
    other = subject_crop(img, mask, size=30, rng=np.random.default_rng(2))
    assert torch.equal(crop, again) and not torch.equal(crop, other)


def test_crop_augmentations_are_seeded_and_each_does_its_own_change():
    x = torch.zeros(3, 32, 32)
    x[0, 8:24, 4:16] = 1.0  # a red bar on the left half, black elsewhere
    off = FastComposerConfig(augment=False)
    assert augment_crop(x, np.random.default_rng(0), off) is x
    only = dict(aug_zoom=0.0, aug_rotation=0.0, aug_flip_p=0.0, aug_jitter=0.0, aug_blur_p=0.0, aug_grayscale_p=0.0)
    assert torch.equal(augment_crop(x, np.random.default_rng(0), FastComposerConfig(**only)), x)
    flipped = augment_crop(x, np.random.default_rng(0), FastComposerConfig(**only | {"aug_flip_p": 1.0}))
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    grey = augment_crop(x, np.random.default_rng(0), FastComposerConfig(**only | {"aug_grayscale_p": 1.0}))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2]) and grey[0, 16, 8] > 0.25
    blurred = augment_crop(x, np.random.default_rng(0), FastComposerConfig(**only | {"aug_blur_p": 1.0}))
    assert blurred[0, 16, 16] > 0 and float(blurred[0].sum()) == pytest.approx(float(x[0].sum()), rel=0.05)
    turned = augment_crop(x, np.random.default_rng(3), FastComposerConfig(**only | {"aug_rotation": 30.0}))
    assert not torch.allclose(turned, x, atol=0.1)
    assert turned[0, 8:24, 4:16].mean() > 0.5  # most of the bar stays where it was
    corners = turned[:, :2, :2]  # uncovered by the warp: noise, not black
    assert corners.std() > 0.1
    full = FastComposerConfig()
    a, b = (augment_crop(x, np.random.default_rng(7), full) for _ in range(2))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1


def test_fusion_mlp_matches_the_paper():
    assert sum(p.numel() for p in FusionMLP(768, 768).parameters()) == 2_958_336  # "≈2.96 M"
    torch.manual_seed(0)
    f = FusionMLP(32, 24)  # image size differs from the text size: projected first
    for p in f.parameters():
        p.data.normal_(0, 0.3)
    t, v = torch.randn(5, 32), torch.randn(5, 24)
    mlp = lambda m, x: m.fc2(nn.functional.gelu(m.fc1(m.norm(x))))  # noqa: E731
    h = mlp(f.mlp1, torch.cat([t, f.image_proj(v)], -1)) + t
    h = mlp(f.mlp2, h) + h
    assert torch.allclose(f(t, v), f.norm(h), atol=1e-6)


def test_only_flagged_positions_change_and_default_trainables_are_the_papers(tok):
    base = load_base("tiny")
    model = FastComposer(base, tiny_image_encoder())
    sp = parse_subject_prompt(model.tokenizer, "a star <img> and a circle <img>", 2)
    text, aug = model.condition([sp], [torch.rand(2, 3, 32, 32)])
    changed = (text - aug).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == sp.positions

    trained = model.set_trainable(FastComposerConfig())
    layers = model.encoder.layers
    assert all(p.requires_grad for p in base.unet.parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())
    assert all(p.requires_grad for layer in layers[-2:] for p in layer.parameters())
    assert not any(p.requires_grad for layer in layers[:-2] for p in layer.parameters())
    vision = model.encoder.vision
    for frozen in (base.text_encoder, base.vae, vision.visual_projection, vision.vision_model.embeddings,
                   vision.vision_model.post_layernorm):
        assert not any(p.requires_grad for p in frozen.parameters())
    assert len(trained) == sum(p.requires_grad for _, p in model.named_parts())


def test_image_encoder_from_a_clip_model_folder_is_its_vision_tower(tmp_path):
    # the ToyWorld evaluator's path: a saved CLIPModel with [-1, 1] pixel statistics
    from transformers import CLIPModel

    from multiconcept.methods.fastcomposer import load_image_encoder
    from multiconcept.models.tiny_evaluators import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "clip", image_size=32, seed=3,
                            processor={"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    enc = load_image_encoder(str(folder), load_base("tiny"))
    clip = CLIPModel.from_pretrained(folder).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = clip.visual_projection(clip.vision_model(pixel_values=x * 2 - 1).pooler_output)
        assert torch.allclose(enc(x), want, atol=1e-5)
    assert enc.embed_dim == clip.config.projection_dim and enc.image_size == 32


# ---------------------------------------------------------------- L_loc at work


def localisation_run(loc_weight: float, steps: int = 8):
    base = load_base("tiny")
    torch.manual_seed(0)
    model = FastComposer(base, tiny_image_encoder())
    cfg = FastComposerConfig(caption_dropout=0.0, subject_keep=1.0, mask_loss_p=0.0, loc_weight=loc_weight, batch_size=2)
    params = list(model.set_trainable(cfg).values())
    trainer = EncoderTrainer(model, Fixed(two_subject_record()), cfg)
    batch = trainer.batch(0)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)

    def probe():  # fixed noise and timesteps
        with torch.no_grad():
            logs = [trainer(batch, torch.Generator().manual_seed(1000 + k))[1] for k in range(3)]
        return np.mean([g["loc"] for g in logs]), np.mean([g["mass_in_mask"] for g in logs])

    before = probe()
    for step in range(steps):
        opt.zero_grad()
        trainer(batch, torch.Generator().manual_seed(step))[0].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return before, probe()


def test_localisation_loss_falls_and_attention_moves_into_the_masks():
    # The random tiny base spreads each token's attention as ~1/77 per pixel, so
    # L_loc starts near 1e-4; λ = 100 makes it count beside the noise loss here.
    (loc0, mass0), (loc1, mass1) = localisation_run(100.0)
    assert loc1 < loc0 - 0.01, (loc0, loc1)
    assert mass1 > mass0 + 0.04, (mass0, mass1)
    # the control without L_loc does not do it: the change is the loss's doing
    (c_loc0, c_mass0), (c_loc1, c_mass1) = localisation_run(0.0)
    assert c_loc1 > loc1 + 0.005 and c_mass1 < mass1 - 0.03, (c_loc1, c_mass1)


def test_middle_resolutions_leave_out_only_the_outermost_level():
    assert middle_resolutions(64)[:3] == [32, 16, 8]  # SD 1.5: down 1, down 2, mid, up 1, up 2
    assert middle_resolutions(16)[:2] == [8, 4]  # ToyWorld: down 1, mid, up 1


def test_toyworld_training_captions_leave_the_look_to_the_crops():
    # a caption that says "a red robot with a cyan head" lets the model ignore the crop of that robot
    from multiconcept.toyworld import BODY_COLOURS, HATS, HEAD_COLOURS, MARKINGS

    looks = set(BODY_COLOURS) | set(HEAD_COLOURS) | set(HATS) | set(MARKINGS)
    records = ToyWorldSubjects().draw(40, seed=5)
    for r in records:
        said = set(r.caption.split())
        assert not said & looks, r.caption
        assert [w for w in r.caption.split() if w in {s.label for s in r.subjects}] == [s.label for s in r.subjects]
    # the problems the tuning-free papers are about: two subjects of one kind, in scenes placed freely
    pairs = [r for r in records if len(r.subjects) == 2]
    assert any(a.label == b.label for a, b in (r.subjects for r in pairs))


# ---------------------------------------------------------------- delayed conditioning


@pytest.fixture(scope="module")
def composer():
    torch.manual_seed(0)
    model = FastComposer(load_base("tiny"), tiny_image_encoder())
    for p in model.fusion.parameters():  # an untrained fusion MLP is near identity; make subjects visible
        p.data.normal_(0, 0.5)
    rec = two_subject_record()
    crops = torch.stack([subject_crop(rec.image, s.mask, s.box, 32) for s in rec.subjects])
    sp = parse_subject_prompt(model.tokenizer, "a robot <img> and a bird <img>", 2)
    return model, sp, crops


@pytest.mark.parametrize("scheduler, steps, alpha", [("ddim", 10, 0.7), ("euler-a", 7, 0.5), ("dpm", 6, 1.0), ("ddim", 4, 0.0)])
def test_delayed_conditioning_uses_text_only_for_exactly_the_first_steps(composer, scheduler, steps, alpha):
    model, sp, crops = composer
    text, aug = model.condition([sp], [crops])
    seen = []
    hook = model.base.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"][1].detach().clone()), with_kwargs=True)
    try:
        sample(model, sp, crops, [0], ComposeSettings(steps=steps, alpha=alpha, scheduler=scheduler), output_type="np")
    finally:
        hook.remove()
    kinds = ["text" if torch.allclose(e, text[0]) else "subject" if torch.allclose(e, aug[0]) else "?" for e in seen]
    k = text_only_calls(len(seen), alpha)
    assert k == round((1 - alpha) * steps)
    assert kinds == ["text"] * k + ["subject"] * (len(seen) - k)


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm"])
def test_alpha_zero_is_exactly_the_plain_pipeline(composer, scheduler):
    model, sp, crops = composer
    ours = sample(model, sp, crops, [3, 4], ComposeSettings(steps=4, alpha=0.0, scheduler=scheduler), output_type="np")
    text, _ = model.condition([sp], [crops])
    empty = model.encode_text(parse_subject_prompt(model.tokenizer, "").padded_ids(model.tokenizer)[None])
    pipe = model.base.pipe
    pipe.scheduler = make_scheduler(pipe, scheduler)
    plain = pipe(prompt_embeds=text.expand(2, -1, -1), negative_prompt_embeds=empty.expand(2, -1, -1), num_inference_steps=4,
                 guidance_scale=5.0, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="np").images
    assert np.abs(ours - plain).max() < 1e-5
    subj = sample(model, sp, crops, [3, 4], ComposeSettings(steps=4, alpha=1.0, scheduler=scheduler), output_type="np")
    assert np.abs(subj - plain).max() > 1e-3  # and the subjects do change the images


# ---------------------------------------------------------------- training, resume, CLI


def fusion_state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "fusion.safetensors"))


def test_resume_continues_exactly(subject_folder, tmp_path):
    cfg = dict(steps=4, batch_size=2, lr=1e-3, checkpoint_every=0)
    full = train_encoder(str(subject_folder), tmp_path / "full", base="tiny", cfg=FastComposerConfig(**cfg), progress=False)
    part = tmp_path / "part"
    assert train_encoder(str(subject_folder), part, base="tiny", cfg=FastComposerConfig(**cfg), progress=False,
                         stop_after=2) is None
    assert (part / "checkpoint.safetensors").is_file() and not (part / "fastcomposer.json").exists()
    train_encoder(str(subject_folder), part, base="tiny", cfg=FastComposerConfig(**cfg), progress=False, resume=True)
    assert not (part / "checkpoint.safetensors").exists()
    a, b = fusion_state(full), fusion_state(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every step's loss terms, L_loc among them, in the model's log (a plateau is read from it)
    log = [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all({"noise", "loss"} <= set(r) for r in log)
    assert any("loc" in r for r in log)  # a batch whose subjects were all dropped has no L_loc
    start = FusionMLP(32, 32)  # training moved the weights away from a fresh MLP's LayerNorm ones
    assert not torch.equal(a["norm.weight"], start.norm.weight.detach())


def test_time_budget_writes_the_model_and_keeps_the_checkpoint(subject_folder, tmp_path):
    cfg = FastComposerConfig(steps=50, batch_size=1, checkpoint_every=0)
    out = train_encoder(str(subject_folder), tmp_path / "m", base="tiny", cfg=cfg, progress=False, max_minutes=1e-4)
    info = json.loads((out / "fastcomposer.json").read_text())
    assert info["stopped_for_time"] and 1 <= info["steps_done"] < 50
    assert (out / "checkpoint.safetensors").is_file()  # --resume continues from here


def test_train_encoder_and_compose_cli_end_to_end(subject_folder, run_cli, tmp_path):
    model = tmp_path / "fc"
    code, stdout, stderr = run_cli("train-encoder", "--method", "fastcomposer", "--data", subject_folder, "--base", "tiny",
                                   "--out", model, "--steps", "2", "--batch-size", "2", "--lr", "1e-4", "--no-progress")
    assert code == 0, stderr
    config = json.loads((model / "fastcomposer.json").read_text())
    assert config["base_name"] == "tiny" and config["steps_done"] == 2 and config["settings"]["loc_weight"] == 1e-3
    assert {p.name for p in model.iterdir()} == {"fastcomposer.json", "fusion.safetensors", "image_encoder.safetensors",
                                                 "unet.safetensors", "train_log.jsonl"}
    img, m0, m1 = (subject_folder / n for n in ("000000.png", "000000_0.png", "000000_1.png"))
    out = tmp_path / "out"
    prompt = "a star <img> and a circle <img> on a gray background"
    code, stdout, stderr = run_cli("compose", prompt, "--subject", f"{img}:{m0}", "--subject", f"{img}:{m1}", "--model", model,
                                   "-n", "2", "--seed", "7", "--steps", "3", "--out", out)
    assert code == 0, stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["000007.png", "000008.png"]
    meta = read_png_metadata(pngs[1])
    assert meta["prompt"] == prompt and meta["seed"] == 8 and meta["alpha"] == 0.7 and meta["guidance"] == 5.0
    assert meta["subjects"] == [f"{img}:{m0}", f"{img}:{m1}"] and meta["steps"] == 3 and meta["base"] == "tiny"
    before = pngs[0].read_bytes()
    code, _, stderr = run_cli("compose", prompt, "--subject", f"{img}:{m0}", "--subject", f"{img}:{m1}", "--model", model,
                              "-n", "1", "--seed", "7", "--steps", "3", "--out", out)
    assert code == 2 and "000007.png already exists: pass --overwrite" in stderr and pngs[0].read_bytes() == before


def test_a_shipped_model_is_fp16_and_composes_without_model(subject_folder, run_cli, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from multiconcept.workflows import compose as compose_workflow

    model, assets = tmp_path / "fc", tmp_path / "assets"
    code, _, stderr = run_cli("train-encoder", "--method", "fastcomposer", "--data", subject_folder, "--base", "tiny",
                              "--out", model, "--steps", "1", "--batch-size", "2", "--no-progress")
    assert code == 0, stderr
    monkeypatch.setattr(compose_workflow, "SHIPPED", {m: assets / m for m in compose_workflow.COMPOSE_METHODS})
    img, m0 = subject_folder / "000000.png", subject_folder / "000000_0.png"
    args = ("compose", "a star <img> on a gray background", "--subject", f"{img}:{m0}", "--steps", "2", "--out")
    code, _, stderr = run_cli(*args, tmp_path / "none")
    assert code == 2 and "fastcomposer model is not in this install" in stderr and stderr.count("\n") == 1
    (model / "checkpoint.safetensors").write_bytes(b"")
    code, _, stderr = run_cli("toyworld", "ship-model", model, "--out", assets)
    assert code == 2 and "still training" in stderr and not (assets / "fastcomposer").exists()
    (model / "checkpoint.safetensors").unlink()
    code, stdout, stderr = run_cli("toyworld", "ship-model", model, "--out", assets)
    assert code == 0 and "MB)" in stdout, stderr
    shipped = assets / "fastcomposer"
    assert {p.name for p in shipped.iterdir()} == {"fastcomposer.json", "fusion.safetensors", "image_encoder.safetensors",
                                                   "unet.safetensors"}
    for name in ("fusion", "image_encoder", "unet"):
        full, half = load_file(str(model / f"{name}.safetensors")), load_file(str(shipped / f"{name}.safetensors"))
        assert all(half[k].dtype == torch.float16 and torch.equal(half[k], v.half()) for k, v in full.items())
    code, _, stderr = run_cli(*args, tmp_path / "shipped")
    assert code == 0 and len(list((tmp_path / "shipped").glob("*.png"))) == 1, stderr
    code, _, stderr = run_cli(*args, tmp_path / "sd", "--method", "subject-diffusion")
    assert code == 2 and "subject-diffusion model is not in this install" in stderr


# ---------------------------------------------------------------- official checkpoint


class OfficialMLP(nn.Module):
    """The reference release's MLP, as the spec describes it (names are the assumed originals)."""

    def __init__(self, in_dim, out_dim, residual):
        super().__init__()
        self.layernorm, self.fc1, self.fc2 = nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)
        self.residual = residual

    def forward(self, x):
        y = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class OfficialPostfuse(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp1, self.mlp2, self.layer_norm = OfficialMLP(2 * d, d, False), OfficialMLP(d, d, True), nn.LayerNorm(d)

    def fuse(self, t, v):
        return self.layer_norm(self.mlp2(self.mlp1(torch.cat([t, v], -1)) + t))


class OfficialImageEncoder(nn.Module):
    """A CLIPVisionModel's vision_model + CLIP's visual_projection in a wrapper."""

    def __init__(self, cfg):
        from transformers import CLIPVisionModel

        super().__init__()
        self.vision_model = CLIPVisionModel(cfg)  # transformers 5's CLIPVisionModel is the old CLIPVisionTransformer
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixels):
        return self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)


@pytest.fixture
def official_checkpoint(tmp_path):
    from transformers import CLIPVisionConfig

    torch.manual_seed(0)
    base = load_base("tiny")
    enc = OfficialImageEncoder(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=3, num_attention_heads=4, projection_dim=32))
    post = OfficialPostfuse(32)
    for p in list(enc.parameters()) + list(post.parameters()):  # no two norms alike: a swapped name would show
        p.data.add_(torch.randn_like(p) * 0.2)
    unet = {k: v + 0.01 for k, v in base.unet.state_dict().items()}  # "trained": differs from the base
    sd = {f"unet.{k}": v for k, v in unet.items()}
    sd.update({f"image_encoder.{k}": v for k, v in enc.state_dict().items()})
    sd["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # transformers 4.2x saved it
    sd.update({f"postfuse_module.{k}": v for k, v in post.state_dict().items()})
    sd.update({f"text_encoder.{k}": v for k, v in base.text_encoder.state_dict().items()})
    sd.update({f"vae.{k}": v for k, v in base.vae.state_dict().items()})
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    return path, enc.eval(), post.eval(), unet


def test_converter_round_trip(official_checkpoint, run_cli, tmp_path):
    path, enc, post, unet = official_checkpoint
    out = tmp_path / "converted"
    code, stdout, stderr = run_cli("convert-fastcomposer", path, "--out", out, "--base", "tiny", "--vision-heads", "4")
    assert code == 0, stderr
    config = json.loads((out / "fastcomposer.json").read_text())
    assert config["dropped"]["text_encoder"] > 0 and config["dropped"]["vae"] > 0 and config["dropped"]["buffers"] == 1
    model = FastComposer.load(out)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encoder.vision(pixel_values=x).image_embeds, enc(x), atol=1e-5)
        t, v = torch.randn(4, 32), torch.randn(4, 32)
        assert torch.allclose(model.fusion(t, v), post.fuse(t, v), atol=1e-5)
    own = model.base.unet.state_dict()
    assert all(torch.equal(own[k], unet[k]) for k in unet)
    # and it composes
    img = tmp_path / "s.png"
    from PIL import Image

    Image.fromarray(two_subject_record().image).save(img)
    code, _, stderr = run_cli("compose", "a star <img>", "--subject", img, "--model", out, "--steps", "2",
                              "--out", tmp_path / "o")
    assert code == 0, stderr


def test_converter_refuses_pickled_objects_and_foreign_layouts(run_cli, tmp_path):
    evil = tmp_path / "evil.bin"
    torch.save({"unet.x": torch.zeros(1), "args": argparse.Namespace(lr=1)}, evil)
    code, _, stderr = run_cli("convert-fastcomposer", evil, "--out", tmp_path / "o")
    assert code == 2 and "weights-only" in stderr and stderr.strip().count("\n") == 0
    foreign = tmp_path / "foreign.bin"
    torch.save({"model.layer.weight": torch.zeros(2)}, foreign)
    code, _, stderr = run_cli("convert-fastcomposer", foreign, "--out", tmp_path / "o")
    assert code == 2 and "no known FastComposer part" in stderr
    assert not (tmp_path / "o" / "fastcomposer.json").exists()


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_exit_2_with_one_line(run_cli, subject_folder, tmp_path):
    img = subject_folder / "000000.png"
    bad_manifest = tmp_path / "bad"
    bad_manifest.mkdir()
    (bad_manifest / "subjects.jsonl").write_text('{"image": "x.png", "caption": "a star", "subjects": []}\n')
    not_model = tmp_path / "empty"
    not_model.mkdir()
    cases = [
        (["train-encoder", "--method", "subject-magic", "--data", "toyworld", "--out", tmp_path / "m", "--base", "tiny"],
         "unknown encoder method"),
        (["train-encoder", "--method", "fastcomposer", "--data", tmp_path / "nope", "--out", tmp_path / "m"], "neither"),
        (["train-encoder", "--method", "fastcomposer", "--data", bad_manifest, "--out", tmp_path / "m", "--base", "tiny"],
         "does not exist"),
        (["train-encoder", "--method", "fastcomposer", "--data", "toyworld", "--out", tmp_path / "m", "-p", "subject_keep=2"],
         "probability"),
        (["compose", "a star <img> and a circle", "--subject", img, "--subject", img, "--model", not_model],
         "no fastcomposer.json"),
        (["compose", "a star <img>", "--subject", tmp_path / "missing.png", "--model", not_model], "does not exist"),
        (["compose", "a star <img>", "--subject", img, "--model", not_model, "--alpha", "1.5"], "--alpha"),
        (["convert-fastcomposer", tmp_path / "none.bin", "--out", tmp_path / "o"], "does not exist"),
    ]
    for args, words in cases:
        code, _, stderr = run_cli(*args)
        assert code == 2, (args, stderr)
        assert words.lower() in stderr.lower() and stderr.strip().count("\n") == 0, (args, stderr)
