"""Exports of bundles learned on the tiny FLUX.1, FLUX.2 [klein] and SD3 pipelines: learn, export, load into a
fresh diffusers pipeline by the README's own code (or diffusers' kohya loaders), same image as `generate`."""

import re

import numpy as np
import pytest
import torch

from multiconcept.bundle import load_bundle
from multiconcept.data import build_concept_set
from multiconcept.methods import get_method
from multiconcept.methods.finetune import train
from multiconcept.models import base_from_pipeline, load_base
from multiconcept.models.tiny_flow import TINY_FLOW, tiny_flux_pipeline
from multiconcept.prompts import Concept
from multiconcept.workflows.export import export_bundle
from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

PROMPT = "photo of a <a1> cat"
STEPS, SEED = 3, 4
PARAMS = {"textual-inversion": {"lr": 0.5}, "lora": {"lr": 0.05}, "custom-diffusion": {"lr": 0.05},
          "disendiff": {"lr": 0.05}}


def learn(scene, tmp_path, base, method: str):
    cls = get_method(method)
    cfg = cls.Config(**{"steps": 3, "grad_accum": 1, "batch_size": 1, "scale_lr": False, "checkpoint_every": 0,
                        **PARAMS[method]})
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [f"<a1>={scene['m1']}"])
    base = load_base(base) if isinstance(base, str) else base
    return train(cls, base, data, cfg, tmp_path / f"{method}.safetensors", progress=False)


def ours(bundle, base, folder) -> np.ndarray:
    loaded = load_with_bundles(base, [str(bundle)])
    path = generate(PROMPT, loaded, 1, SEED, folder, SampleSettings(steps=STEPS, guidance=3.5))[0]
    return np.asarray(__import__("PIL.Image").Image.open(path), dtype=np.int16)


def plain_diffusers(pipe, base) -> np.ndarray:
    """The fresh pipeline called as `generate` calls it (prompt, steps, guidance, the sequence length, seed)."""
    img = pipe(prompt=[PROMPT], num_inference_steps=STEPS, guidance_scale=3.5, height=32, width=32,
               max_sequence_length=base.sequence_length, generator=[torch.Generator().manual_seed(SEED)]).images[0]
    return np.asarray(img, dtype=np.int16)


def run_readme(readme: str, pipe) -> None:
    """The README's python block on `pipe`: every line but the pipeline's own loading and the image call."""
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code[: code.index("image = pipe(")]
    code = "\n".join(line for line in code.splitlines() if not line.startswith("pipe = "))
    exec(code, {"pipe": pipe})


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux2", "tiny-sd3"])
@pytest.mark.parametrize("method", ["textual-inversion", "lora", "custom-diffusion"])
def test_diffusers_export_gives_the_same_image(scene, tmp_path, name, method):
    bundle = learn(scene, tmp_path, name, method)
    mine = ours(bundle, name, tmp_path / "ours")
    out = tmp_path / "exported"
    export_bundle(bundle, out, "diffusers", rank="full", base=name)
    base = load_base(name)
    pipe = TINY_FLOW[name]()
    untouched = plain_diffusers(pipe, base)
    run_readme((out / "README.md").read_text(), pipe)
    theirs = plain_diffusers(pipe, base)
    assert np.abs(mine - untouched).max() > 2  # the bundle changes the image
    assert np.abs(mine - theirs).max() <= 2, np.abs(mine - theirs).max()


@pytest.mark.parametrize("name,method", [("tiny-flux", "custom-diffusion"), ("flux-joint-only", "lora"),
                                         ("tiny-flux2", "lora"), ("tiny-flux2", "disendiff")])
def test_kohya_export_round_trips_through_diffusers_kohya_loader(scene, tmp_path, monkeypatch, name, method):
    """The kohya-layout LoRA (fused qkv) read back by diffusers' own converters gives the same image; tokens by
    the README's code. (diffusers' FLUX.1 reader knows the single-stream blocks' fused projection only at FLUX.1's
    real width, so FLUX.1's LoRA is checked on a tiny FLUX.1 without single-stream blocks.)"""
    build = (lambda: tiny_flux_pipeline(single_layers=0)) if name == "flux-joint-only" else TINY_FLOW[name]
    base = base_from_pipeline(build(), name)
    bundle = learn(scene, tmp_path, base, method)
    mine = ours(bundle, base_from_pipeline(build(), name), tmp_path / "ours")
    out = tmp_path / "kohya"
    result = export_bundle(bundle, out, "comfyui", rank="full", base=base_from_pipeline(build(), name))
    lora_file = out / "loras" / f"{result.lora}.safetensors"
    from safetensors.torch import load_file

    keys = set(load_file(str(lora_file)))
    assert any(re.fullmatch(r"lora_unet_double_blocks_\d+_(img|txt)_attn_qkv\.lora_down\.weight", k) for k in keys), keys
    pipe = build()
    monkeypatch.chdir(out)  # the README's paths are the export folder's
    run_readme((out / "README.md").read_text(), pipe)
    theirs = plain_diffusers(pipe, base)
    assert np.abs(mine - theirs).max() <= 2, np.abs(mine - theirs).max()


def test_flux1_single_block_lora_fuses_exactly(scene, tmp_path):
    """FLUX.1's single-stream `linear1` (Q, K, V and the MLP input in one projection): the fused LoRA's
    up·down·alpha/rank is each part's own B·A·alpha/r in its rows, zero in the MLP's."""
    from multiconcept.export.diffusers import lora_parts
    from multiconcept.export.flow import kohya_flow_lora, lora_factors

    bundle_path = learn(scene, tmp_path, "tiny-flux", "lora")
    bundle, base = load_bundle(bundle_path), load_base("tiny-flux")
    sd, _, _ = kohya_flow_lora(bundle_path, bundle, base, None)
    factors = lora_factors(bundle, lora_parts(bundle_path, bundle, bundle.with_prefix("lora/"), base))["transformer"]
    stem = "lora_unet_single_blocks_0_linear1"
    down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
    fused = up @ down * sd[f"{stem}.alpha"] / down.shape[0]
    parts = [factors.get(f"single_transformer_blocks.0.attn.{p}") for p in ("to_q", "to_k", "to_v")]
    expected = torch.cat([b @ a * s for a, b, s in parts] + [torch.zeros(64, 16)])
    assert fused.shape == expected.shape and torch.allclose(fused, expected, atol=1e-6)


def test_sd3_kohya_names(scene, tmp_path):
    """No diffusers reader exists for kohya's SD3 layout: the names are kohya's lora_sd3 ones (joint_blocks_N_
    x_block / context_block, SD3.5's attn2), and each fused delta is the trained K/V change with zero Q rows."""
    from safetensors.torch import load_file

    bundle = learn(scene, tmp_path, "tiny-sd3", "custom-diffusion")
    result = export_bundle(bundle, tmp_path / "k", "kohya", rank="full", base="tiny-sd3")
    sd = load_file(str(tmp_path / "k" / "loras" / f"{result.lora}.safetensors"))
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert stems == {f"lora_unet_joint_blocks_{i}_context_block_attn_qkv" for i in range(2)}
    deltas = load_bundle(bundle).with_prefix("transformer_delta/")
    for i in range(2):
        stem = f"lora_unet_joint_blocks_{i}_context_block_attn_qkv"
        fused = sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"]
        q, k, v = fused.chunk(3)
        assert q.abs().max() < 1e-6  # float noise of the SVD: the Q rows are zero
        assert torch.allclose(k, deltas[f"transformer_blocks.{i}.attn.add_k_proj.weight"], atol=1e-5)
        assert torch.allclose(v, deltas[f"transformer_blocks.{i}.attn.add_v_proj.weight"], atol=1e-5)


def test_exported_embedding_loads_with_generate_embedding(scene, tmp_path, run_cli):
    bundle = learn(scene, tmp_path, "tiny-flux2", "textual-inversion")
    export_bundle(bundle, tmp_path / "e", "comfyui", base="tiny-flux2")
    args = ["generate", PROMPT, "--base", "tiny-flux2", "--steps", "2", "-n", "1"]
    code, _, err = run_cli(*args, "--embedding", f"<a1>={tmp_path / 'e' / 'embeddings' / 'a1.safetensors'}",
                           "-o", tmp_path / "via-embedding")
    assert code == 0, err
    code, _, err = run_cli(*args, "-b", bundle, "-o", tmp_path / "via-bundle")
    assert code == 0, err
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "via-embedding" / "000000.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "via-bundle" / "000000.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_infusion_is_not_exported_on_a_flow_base(scene, tmp_path, run_cli):
    cls = get_method("infusion")
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [f"<a1>={scene['m1']}"])
    out = train(cls, load_base("tiny-sd3"), data, cls.Config(steps=1, batch_size=1, grad_accum=1, checkpoint_every=0),
                tmp_path / "i.safetensors", progress=False)
    code, _, err = run_cli("export", out, "--format", "comfyui", "-o", tmp_path / "x")
    assert code == 2 and "Infusion" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
