"""Subject-Diffusion on the tiny base: the zero start, the fusion text encoder, three-branch
guidance, the ablation flags, training moving the gates, and the CLI verbs end to end."""

import copy
import json

import numpy as np
import pytest
import torch

from multiconcept.errors import UserError
from multiconcept.methods.fastcomposer import tiny_image_encoder
from multiconcept.methods.subject_diffusion import (
    PLACEHOLDER,
    SubjectDiffusion,
    SubjectDiffusionConfig,
    adapter_gates,
    encode_fused,
    fusion_prompt,
    parse_marked_prompt,
    place_mask,
    placeholder_embeddings,
    three_branch,
)
from multiconcept.models import load_base
from multiconcept.workflows.compose_subject_diffusion import SubjectComposeSettings, read_subject, sample
from multiconcept.workflows.generate import make_scheduler, read_png_metadata


def tiny_model(**flags):
    base = load_base("tiny", device="cpu")
    original = copy.deepcopy(base.unet)
    return SubjectDiffusion(base, tiny_image_encoder(32), SubjectDiffusionConfig(**flags)), original


def conditions(model, b=2, k=2):
    """Random subjects with boxes, the second sample missing its second subject."""
    torch.manual_seed(1)
    _, patches = model.subject_features(torch.rand(b * k, 3, 32, 32))
    patches = patches.reshape(b, k, *patches.shape[1:])
    valid = torch.tensor([[True, True], [True, False]])
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.5, 0.2, 0.9, 0.9]], [[0.0, 0.0, 0.4, 0.4], [0, 0, 0, 0]]])
    maps = (torch.rand(b, 1, 32, 32) > 0.5).float()
    return model.extra_channels(maps, b, (16, 16)), model.gligen(patches, boxes, valid)


def test_at_step_zero_the_unet_is_the_base_unet():
    model, original = tiny_model()
    channels, gligen = conditions(model)
    assert channels.abs().sum() > 0 and gligen["gligen"]["patches"].abs().sum() > 0  # the new inputs carry something
    z, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = original(z, t, encoder_hidden_states=text).sample
        got = model.predict(z, t, text, channels, gligen)
        assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
        # the new parts are wired in: opening one gate or the location weights changes the output
        model.unet.conv_in.weight[:, 4].fill_(0.1)
        assert not torch.allclose(model.predict(z, t, text, channels, gligen), want, atol=1e-4)
        model.unet.conv_in.weight[:, 4].zero_()
        fuser = next(m for n, m in model.unet.named_modules() if n.endswith(".fuser"))
        fuser.alpha_attn.fill_(0.5)
        assert not torch.allclose(model.predict(z, t, text, channels, gligen), want, atol=1e-4)


def test_fusion_puts_the_image_embedding_at_each_placeholder_and_nowhere_else():
    model, _ = tiny_model()
    tok = model.tokenizer
    p = parse_marked_prompt(tok, "a star <img> and a circle <img> on a gray background", 2)
    assert p.caption == "a star and a circle on a gray background" and p.labels == ["star", "circle"]
    assert p.text.endswith(f", the star is {PLACEHOLDER}, the circle is {PLACEHOLDER}")
    ids = p.input_ids
    assert [tok.convert_ids_to_tokens(ids[i]).rstrip("</w>") for i in p.placeholders] == [PLACEHOLDER] * 2
    assert [tok.convert_ids_to_tokens(ids[i]).removesuffix("</w>") for i in p.entities] == ["star", "circle"]
    q = fusion_prompt(tok, "a dog", ["dog"])
    emb = model.text_encoder.get_input_embeddings()
    seen = []  # what the encoder's first layer receives: token + position embeddings
    handle = model.text_encoder.embeddings.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    pooled = torch.randn(3, 32)
    try:
        with torch.no_grad():
            fused = encode_fused(model.text_encoder, tok, [p, q], model.cls_mlp, pooled)
            plain = encode_fused(model.text_encoder, tok, [p, q], None, None)
    finally:
        handle.remove()
    inputs, plain_inputs = seen  # the token embeddings each run fed the encoder (hooks run in order)
    expected = model.cls_mlp(pooled).detach()
    where = [(0, p.placeholders[0]), (0, p.placeholders[1]), (1, q.placeholders[0])]
    changed = (inputs != plain_inputs).any(-1).nonzero().tolist()
    assert changed == [list(w) for w in where]
    for row, (i, j) in enumerate(where):  # the placeholder's own embedding swapped for the image's
        ph = emb.weight[([p, q][i]).input_ids[j]].detach()
        assert torch.allclose(inputs[i, j] - plain_inputs[i, j], expected[row] - ph, atol=1e-6)
    assert not torch.allclose(fused, plain)
    # a subject marked missing keeps its plain placeholder
    with placeholder_embeddings(model.text_encoder, [], torch.zeros(0, 32)):
        pass
    with torch.no_grad():
        half = encode_fused(model.text_encoder, tok, [q], model.cls_mlp, pooled[:1], valid=[[False]])
        assert torch.equal(half, encode_fused(model.text_encoder, tok, [q], None, None))


def test_three_branch_guidance_is_ordinary_cfg_when_both_scales_agree():
    a, b, c = torch.randn(3, 2, 4, 8, 8)
    assert torch.allclose(three_branch(a, b, c, 3.0, 3.0), c + 3.0 * (a - c), atol=1e-6)
    assert not torch.allclose(three_branch(a, b, c, 7.5, 1.5), c + 7.5 * (a - c), atol=1e-3)
    # the sampler with s_T = s_I = s against a hand-written two-branch loop on the same model
    model, _ = tiny_model()
    with torch.no_grad():  # open every new part so each branch differs
        for n, p in model.unet.named_parameters():
            if n.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(0.7)
        model.unet.conv_in.weight[:, 4].normal_(0, 0.3)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    from PIL import Image

    subject = type("S", (), {})()
    subject.image, subject.mask, subject.place = Image.fromarray(img), np.ones((32, 32), bool), (0.2, 0.2, 0.7, 0.9)
    prompt = parse_marked_prompt(model.tokenizer, "a star <img> on a gray background", 1)
    settings = SubjectComposeSettings(steps=2, guidance=4.0, image_guidance=4.0)
    got = sample(model, prompt, [subject], [5], settings, output_type="pt")

    from diffusers.utils.torch_utils import randn_tensor

    from multiconcept.methods.fastcomposer import subject_crop
    from multiconcept.methods.subject_diffusion import fusion_prompt as fp
    from multiconcept.methods.subject_diffusion import location_map

    with torch.no_grad():
        crops = subject_crop(subject.image, subject.mask, None, 32, np.random.default_rng(0))[None]
        pooled, patches = model.subject_features(crops)
        full = model.text_states([prompt], pooled)
        empty = model.text_states([fp(model.tokenizer, "", [])], None)
        maps = location_map([place_mask(subject.mask, subject.place, 32)], 32)[None]
        sched = make_scheduler(model.base.pipe, "ddim")
        sched.set_timesteps(2)
        gen = [torch.Generator().manual_seed(5)]
        lat = randn_tensor((1, 4, 16, 16), generator=gen, dtype=torch.float32) * sched.init_noise_sigma
        cond = (model.extra_channels(maps, 1, (16, 16)), model.gligen(patches[None], torch.tensor([[subject.place]]),
                                                                        torch.ones(1, 1, dtype=torch.bool)))
        uncond = (model.extra_channels(None, 1, (16, 16)), model.gligen(patches[None], torch.tensor([[subject.place]]),
                                                                          torch.zeros(1, 1, dtype=torch.bool)))
        for t in sched.timesteps:
            x = sched.scale_model_input(lat, t)
            e_c = model.predict(x, t, full, *cond)
            e_u = model.predict(x, t, empty, *uncond)
            lat = sched.step(e_u + 4.0 * (e_c - e_u), t, lat, generator=gen, eta=0.0, return_dict=False)[0]
        want = model.base.vae.decode(lat / model.base.vae.config.scaling_factor, return_dict=False)[0]
        want = (want / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_each_ablation_removes_exactly_its_part():
    full, _ = tiny_model()
    assert full.unet.config.in_channels == 5 and len(adapter_gates(full.unet)) == 7
    no_map, _ = tiny_model(location_map=False)
    assert no_map.unet.config.in_channels == 4 and no_map.extra_channels(torch.ones(1, 1, 32, 32), 1, (16, 16)) is None
    assert len(adapter_gates(no_map.unet)) == 7 and no_map.cls_mlp is not None
    no_adapter, _ = tiny_model(adapter=False)
    assert len(adapter_gates(no_adapter.unet)) == 0 and no_adapter.gligen(torch.zeros(1, 1, 16, 32), torch.zeros(1, 1, 4),
                                                                           torch.ones(1, 1, dtype=torch.bool)) is None
    assert no_adapter.unet.config.in_channels == 5
    no_cls, _ = tiny_model(cls_embedding=False)
    assert no_cls.cls_mlp is None and "cls_mlp.norm.weight" not in no_cls.saved_names()
    # no boxes: the object tokens do not depend on the box; with boxes they do
    no_boxes, _ = tiny_model(boxes=False)
    patches, valid = torch.randn(1, 1, 16, 32), torch.ones(1, 1, dtype=torch.bool)
    for model, moves in ((full, True), (no_boxes, False)):
        net = model.unet.position_net
        with torch.no_grad():
            a = net(patches, torch.tensor([[[0.1, 0.1, 0.4, 0.4]]]), valid)
            b = net(patches, torch.tensor([[[0.5, 0.5, 1.0, 1.0]]]), valid)
        assert (not torch.allclose(a, b)) == moves
    # trained parts are the paper's: attn2 K/V, fusers, object MLP, conv_in, the text encoder, the CLS MLP
    names = set(full.set_trainable())
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder", "cls_mlp"}
    unet = {n[5:] for n in names if n.startswith("unet.")}
    assert all(".fuser." in n or n.startswith(("position_net.", "conv_in.")) or ".attn2.to_k." in n or ".attn2.to_v." in n
               for n in unet)
    assert any(".attn2.to_k." in n for n in unet) and not any(".attn1." in n or ".attn2.to_q." in n for n in unet)


def test_bad_settings_and_places_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="add up to"):
        SubjectDiffusionConfig(text_dropout=0.6, mask_dropout=0.6)
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "s.png")
    with pytest.raises(UserError, match="0 <= x0 < x1"):
        read_subject(str(tmp_path / "s.png"), "0.5,0.1,0.2,0.9")
    with pytest.raises(UserError, match="outside"):
        read_subject(f"{tmp_path / 's.png'}:0,0,40,10", None)
    s = read_subject(f"{tmp_path / 's.png'}:8,0,24,16", None)
    assert s.place == (0.25, 0.0, 0.75, 0.5)  # default: where it stood in its reference image
    canvas = place_mask(s.mask, (0.5, 0.5, 1.0, 1.0), 32)
    assert canvas[16:, 16:].all() and canvas.sum() == 16 * 16


def test_training_opens_the_gates_and_the_cli_composes_at_the_places_asked(run_cli, tmp_path):
    model = tmp_path / "sd"
    code, _, stderr = run_cli("train-encoder", "--method", "subject-diffusion", "--data", "toyworld", "--base", "tiny",
                              "--out", model, "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--param",
                              "warmup_steps=0", "--no-progress")
    assert code == 0, stderr
    config = json.loads((model / "subject_diffusion.json").read_text())
    assert config["steps_done"] == 2 and config["ablation"] == "full" and config["settings"]["loc_weight"] == 0.01
    log = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all("loc" in r for r in log)
    loaded = SubjectDiffusion.load(model, device="cpu")
    gates = adapter_gates(loaded.unet)
    assert gates.abs().min() > 0  # every gate moved off its zero start
    assert loaded.unet.conv_in.weight[:, 4].abs().sum() > 0  # and so did the location channel

    from PIL import Image

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 4:16] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "s.png")
    out = tmp_path / "out"
    prompt = "a star <img> and a circle <img> on a gray background"
    code, _, stderr = run_cli("compose", prompt, "-s", f"{tmp_path / 's.png'}:4,8,16,24", "-s", tmp_path / "s.png",
                              "--model", model, "--method", "subject-diffusion", "--location", "0.5,0.5,1,1",
                              "--steps", "2", "--seed", "1", "--out", out)
    assert code == 0, stderr
    meta = read_png_metadata(out / "000001.png")
    assert meta["method"] == "subject-diffusion" and meta["guidance"] == 7.5 and meta["image_guidance"] == 1.5
    assert meta["locations"] == ["0.5,0.5,1,1"] and meta["seed"] == 1
    code, _, stderr = run_cli("compose", prompt, "-s", tmp_path / "s.png", "-s", tmp_path / "s.png", "--model", model,
                              "--method", "fastcomposer", "--out", out)
    assert code == 2 and "holds a subject-diffusion model" in stderr and len(stderr.strip().splitlines()) == 1
