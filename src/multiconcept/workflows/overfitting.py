"""Overfitting metrics of Infusion (arXiv 2404.14007) — RECONSTRUCTIONS.

The paper names two metrics but its definitions could not be read; what is
computed here is our reconstruction from the abstract and project page
(docs/evidence.md#infusion), and is labelled as such in every report:

- Latent Fisher divergence (concept-AGNOSTIC overfitting: did customisation
  change prompts that do not mention the concept?). For prompts p that name
  no concept (neither a learned token nor a concept's class word),

      LFD = E_{p, seed, t} mean_elements ‖ε_custom(x_t, t, p) − ε_base(x_t, t, p)‖²

  with x_t taken from the BASE model's own DDIM trajectory (so x_t ~ the
  base's p_t(x | p), the distribution a Fisher divergence is an expectation
  over), at fixed seeds and at the trajectory steps nearest fixed
  timesteps. ε is the conditional prediction (no guidance); score =
  −ε/σ_t, so this is the Fisher divergence of the scores up to the per-t
  weight σ_t² (we report ε-space, per timestep too). 0 = no drift; Infusion
  is 0 by construction on such prompts.
- Wasserstein metric (concept-SPECIFIC overfitting: does the concept follow
  prompts the way its class does?). The 2-Wasserstein (Fréchet) distance
  between Gaussians fitted to evaluator image embeddings (a transformers
  CLIPModel, by default the ToyWorld evaluator; unit-length embeddings) of
  the customised model's generations of the concept over diverse context
  prompts, and of the base model's generations of the plain class word over
  the same prompts. Lower = the concept varies with the prompt like its
  class. Reported as the squared distance, as FID is. With few images per
  side the covariances are rank-deficient and the value is biased upward;
  compare methods only at equal image counts.

Both work for any method's bundle: prompts name a concept the way its
method does (its `prompt_phrase`: "<tok> class" for token methods, the class
word alone for Infusion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import require
from ..images import read_image
from ..methods import get_method
from ..metrics.frechet import frechet_distance

RECONSTRUCTION_NOTE = (
    "Reconstructions of Infusion's (arXiv 2404.14007) Latent Fisher divergence and Wasserstein metric: the paper's "
    "definitions could not be read; see multiconcept.workflows.overfitting for exactly what is computed."
)

# In ToyWorld's words (its kinds, body colours, places and backgrounds), used for the tiny test base too.
TOY_CONTEXTS = (
    "a {} on a white background", "a {} on a black background", "a {} on a beige background",
    "a {} on a gray background", "a {} on the left", "a {} on the right",
    "a {} in the center on a white background", "a {} on the right on a black background",
)
GENERIC_NOUNS = ("dog", "cat", "car", "house", "chair", "tree", "teapot", "bicycle", "backpack", "flower")
GENERIC_CONTEXTS = (
    "a photo of a {} on the beach", "a photo of a {} in the snow", "a photo of a {} in a living room",
    "a photo of a {} in the forest", "an oil painting of a {}", "a {} on a wooden table",
    "a watercolor painting of a {}", "a {} in front of the Eiffel Tower",
)
GENERIC_NEUTRAL = (
    "a photo of a {} on the beach", "a {} in a garden", "a painting of a {} at night", "a close-up photo of a {}",
)


@dataclass
class OverfittingProtocol:
    """The fixed sampling protocol of both metrics (one place, reported with the results)."""

    fisher_prompts: int = 8
    fisher_seeds: int = 2
    fisher_timesteps: tuple = (900, 700, 500, 300, 100)
    fisher_steps: int = 25  # DDIM steps of the base trajectory that provides x_t
    guidance: float = 6.0  # CFG of every sampled trajectory (the repo's generation default)
    wasserstein_contexts: int = 8  # context prompts (of TOY_CONTEXTS / GENERIC_CONTEXTS)
    wasserstein_seeds: int = 2  # images per context prompt and side
    sample_steps: int = 50  # DDIM steps of the Wasserstein generations (Infusion's protocol)


PROTOCOL = OverfittingProtocol()


# ---------------------------------------------------------------- prompts

def world_of(base_name: str | None) -> str:
    """'toyworld' prompts for the ToyWorld and tiny bases, 'generic' for real models."""
    return "toyworld" if base_name in (None, "toyworld", "tiny") else "generic"


def neutral_prompts(avoid: Sequence[str], n: int, world: str = "toyworld") -> list[str]:
    """n fixed prompts that mention none of the words in `avoid` (class words, tokens)."""
    from ..prompts import find_word_spans

    if world == "toyworld":
        from ..toyworld.render import BACKGROUNDS, BODY_COLOURS, KINDS

        colours, backgrounds = list(BODY_COLOURS), list(BACKGROUNDS)
        # every (kind, colour, background) once, the first prompts already varying all three
        out = [f"a {colours[i % 4]} {KINDS[i % 3]} on a {backgrounds[(i // 12 + i) % 4]} background" for i in range(48)]
    else:
        out = [t.format(noun) for noun in GENERIC_NOUNS for t in GENERIC_NEUTRAL]
    out = [p for p in out if not any(find_word_spans(p, w) or (w.startswith("<") and w in p) for w in avoid)]
    require(len(out) >= n, f"only {len(out)} neutral prompts avoid {list(avoid)}: ask for fewer")
    return out[:n]


def context_prompts(world: str = "toyworld") -> tuple[str, ...]:
    """Diverse contexts, '{}' standing for the concept (or its class word)."""
    return TOY_CONTEXTS if world == "toyworld" else GENERIC_CONTEXTS


# ---------------------------------------------------------------- latent Fisher divergence

def _encode(base, prompts: list[str], guidance: bool):
    """Prompt embeddings through the pipeline's own encode_prompt (methods hook it)."""
    cond, uncond = base.pipe.encode_prompt(prompts, base.device, 1, guidance)
    return cond, uncond


def as_epsilon(sched, out: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
    """The UNet's output as an ε prediction, whatever the base predicts (SD 2's
    v-prediction bases and ToyWorld's: ε = √ᾱ·v + √(1−ᾱ)·x_t)."""
    kind = sched.config.prediction_type
    a = sched.alphas_cumprod[int(t)].to(out.device, torch.float32)
    if kind == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x.float()
    if kind == "sample":
        return (x.float() - a.sqrt() * out) / (1 - a).sqrt()
    return out


@torch.no_grad()
def latent_fisher_divergence(base, custom, prompts: Sequence[str], seeds: Sequence[int],
                             timesteps: Sequence[int] = PROTOCOL.fisher_timesteps, steps: int = PROTOCOL.fisher_steps,
                             guidance: float = PROTOCOL.guidance) -> dict:
    """E ‖ε_custom − ε_base‖² (mean over latent elements) at x_t of the base's trajectories.

    `base` and `custom` are two loaded `Base`s of the same model, `custom`
    with bundles applied. One trajectory per (prompt, seed), sampled by the
    base with DDIM and guidance `guidance`; at the steps nearest
    `timesteps` both models' conditional ε are compared on the same x_t
    (v- or x0-predicting bases are converted to ε first).
    """
    from diffusers import DDIMScheduler

    require(len(prompts) > 0 and len(seeds) > 0, "latent Fisher divergence needs at least one prompt and one seed")
    prompts, seeds = list(prompts), list(seeds)
    dev, unet = base.device, base.unet
    batch_prompts = [p for p in prompts for _ in seeds]
    base_cond, base_uncond = _encode(base, batch_prompts, True)
    custom_cond, _ = _encode(custom, batch_prompts, False)
    sched = DDIMScheduler.from_config(base.pipe.scheduler.config)
    sched.set_timesteps(steps)
    trajectory = [int(t) for t in sched.timesteps]
    chosen = sorted({min(trajectory, key=lambda s: abs(s - t)) for t in timesteps}, reverse=True)
    size = unet.config.sample_size
    x = torch.stack([torch.randn((unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(s))
                     for _ in prompts for s in seeds]).to(dev) * sched.init_noise_sigma
    per_t: dict[int, torch.Tensor] = {}
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t)
        eps_u, eps_c = unet(torch.cat([xin, xin]).to(unet.dtype), t,
                            torch.cat([base_uncond, base_cond]).to(unet.dtype)).sample.float().chunk(2)
        if int(t) in chosen:
            # both models at the same batch shape, so identical models give exactly 0 (no kernel noise)
            eps_base = as_epsilon(sched, unet(xin.to(unet.dtype), t, base_cond.to(unet.dtype)).sample.float(), xin, t)
            eps_custom = as_epsilon(sched, custom.unet(xin.to(custom.unet.dtype), t,
                                                       custom_cond.to(custom.unet.dtype)).sample.float(), xin, t)
            per_t[int(t)] = (eps_custom - eps_base).pow(2).mean(dim=(1, 2, 3)).cpu()  # one value per (prompt, seed)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    table = torch.stack([per_t[t] for t in chosen])  # timestep × (prompt, seed)
    by_prompt = table.reshape(len(chosen), len(prompts), len(seeds)).mean(dim=(0, 2))
    return {
        "value": float(table.mean()),
        "per_timestep": {str(t): float(table[i].mean()) for i, t in enumerate(chosen)},
        "per_prompt": {p: float(v) for p, v in zip(prompts, by_prompt)},
        "prompts": prompts, "seeds": seeds, "timesteps": chosen, "requested_timesteps": list(timesteps),
        "trajectory": {"scheduler": "ddim", "steps": steps, "guidance": guidance, "sampled_by": "base"},
    }


# ---------------------------------------------------------------- Fréchet / 2-Wasserstein

def _generate_set(loaded, prompts: list[str], seeds: list[int], folder: Path, steps: int, guidance: float) -> list[Path]:
    from .generate import SampleSettings, generate

    settings = SampleSettings(steps=steps, guidance=guidance, batch_size=max(1, len(seeds)))
    paths = []
    for i, p in enumerate(prompts):
        paths += generate(p, loaded, len(seeds), seeds[0], folder, settings, name_prefix=f"p{i:02d}_")
    return paths


def concept_wasserstein(custom, base, phrase: str, class_word: str, scorer, out_dir: str | Path,
                        contexts: Sequence[str], seeds: Sequence[int], steps: int = PROTOCOL.sample_steps,
                        guidance: float = PROTOCOL.guidance) -> dict:
    """Fréchet distance of evaluator embeddings: custom(phrase in contexts) vs base(class word in contexts).

    `custom`, `base`: `workflows.generate.Loaded`; `scorer`: a
    `metrics.clip.ClipScorer`. Images are written under `out_dir`
    (custom/, base/) with their generation metadata.
    """
    out_dir = Path(out_dir)
    seeds = list(seeds)
    custom_prompts = [c.format(phrase) for c in contexts]
    base_prompts = [c.format(class_word) for c in contexts]
    custom_paths = _generate_set(custom, custom_prompts, seeds, out_dir / "custom", steps, guidance)
    base_paths = _generate_set(base, base_prompts, seeds, out_dir / "base", steps, guidance)

    def embed(paths):
        return scorer.image_embeddings([read_image(p) for p in paths])

    return {
        "value": frechet_distance(embed(custom_paths), embed(base_paths)),
        "custom_prompts": custom_prompts, "base_prompts": base_prompts, "seeds": seeds,
        "images_per_side": len(custom_paths), "sampling": {"scheduler": "ddim", "steps": steps, "guidance": guidance},
        "folder": str(out_dir),
    }


# ---------------------------------------------------------------- the report

def overfitting_report(base, bundles: list[str], out_dir: Path, evaluator: str | None, seed: int) -> dict:
    """Both metrics for a base (a --base name or a SingleFile; None: the first bundle's) + bundles; the entry
    point of `multiconcept evaluate --overfitting`.

    The latent Fisher divergence is of the base with ALL `bundles` loaded
    together, on prompts naming none of their concepts; the Wasserstein
    metric is per concept. `evaluator`: a CLIPModel folder or hub id (None =
    the ToyWorld evaluator). Seeds are seed, seed+1, ...; images go under
    `out_dir`. Returns a JSON-ready dict with the values and everything
    needed to repeat them (prompts, seeds, timesteps, protocol).
    """
    from ..bundle import read_header
    from ..metrics.clip import load_clip
    from .generate import load_with_bundles

    require(bool(bundles), "the overfitting metrics compare a customised model with its base: pass at least one --bundle")
    scorer = load_clip(evaluator)  # fail on a missing evaluator before any sampling
    proto = PROTOCOL
    headers = [(str(p), read_header(p)) for p in bundles]
    base_name = base if base is not None else headers[0][1]["base_name"]
    plain = load_with_bundles(base_name, [])
    custom = load_with_bundles(base_name, [p for p, _ in headers])
    world = world_of(base_name)
    concepts = [(p, h["method"], t, c) for p, h in headers for t, c in zip(h["tokens"], h["class_words"])]
    avoid = [c for *_, c in concepts] + [t for _, _, t, _ in concepts]
    fisher_seeds = [seed + i for i in range(proto.fisher_seeds)]
    fisher = latent_fisher_divergence(plain.base, custom.base, neutral_prompts(avoid, proto.fisher_prompts, world),
                                      fisher_seeds, proto.fisher_timesteps, proto.fisher_steps, proto.guidance)
    w_seeds = [seed + i for i in range(proto.wasserstein_seeds)]
    wasserstein = {}
    for path, method, token, class_word in concepts:
        phrase = get_method(method).prompt_phrase(token, class_word)
        name = f"{Path(path).stem}:{token}"
        wasserstein[name] = {
            "bundle": path, "method": method, "token": token, "class_word": class_word, "phrase": phrase,
            **concept_wasserstein(custom, plain, phrase, class_word, scorer,
                                  Path(out_dir) / "wasserstein" / f"{Path(path).stem}_{token.strip('<>').replace(':', '_')}",
                                  context_prompts(world)[: proto.wasserstein_contexts], w_seeds, proto.sample_steps,
                                  proto.guidance),
        }
    return {
        "note": RECONSTRUCTION_NOTE,
        "base": str(base_name), "bundles": [p for p, _ in headers], "evaluator": scorer.describe(),
        "latent_fisher_divergence": fisher,
        "wasserstein": wasserstein,
        "protocol": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(proto).items()},
        "seed": seed, "world": world,
    }
