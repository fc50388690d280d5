"""The Python API: typed values in, bundles and PIL images out.

    from multiconcept import Concept, SampleSettings, Source, generate, learn

    bundle = learn("disendiff", [Concept("<cat1>", "cat"), Concept("<dog1>", "dog")],
                   [Source("pets.jpg", masks={"<cat1>": "cat_mask.png", "<dog1>": "dog_mask.png"})],
                   "pets.safetensors", base="stable-diffusion-v1-5/stable-diffusion-v1-5", settings={"steps": 400})
    images = generate("photo of a <cat1> cat and a <dog1> dog on the beach", ["pets.safetensors"],
                      n=4, base="stable-diffusion-v1-5/stable-diffusion-v1-5", sampling=SampleSettings(steps=50))

A `base` is a name as `--base` takes it (a folder, hub id, FILE.safetensors, 'tiny', 'toyworld') or a
`SingleFile(path, config)`: a single-file checkpoint with the diffusers configs that fit it (`--base-config`).
Images and masks are paths or PIL images, read under the command line's rules
(multiconcept.images); bad input raises `UserError` with the problem and the
fix. The command line calls the same workflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from PIL import Image

from .bundle import Bundle, load_bundle
from .data import Source, concept_set
from .errors import UserError
from .export import DEFAULT_RANK, ToolExport
from .images import read_image, read_mask
from .models import SingleFile
from .prompts import Concept
from .training import Progress
from .workflows.compose import ComposeSettings
from .workflows.compose_subject_diffusion import SubjectComposeSettings
from .workflows.generate import SampleSettings

__all__ = ["Bundle", "ComposeSettings", "Concept", "Progress", "SampleSettings", "SingleFile", "Source",
           "SubjectComposeSettings", "UserError", "bake", "compose", "evaluate", "export", "generate", "learn", "load_bundle"]


__all__ += ["Generation", "Setting", "attention_images", "generate_files", "method_settings", "methods",
            "parse_settings", "read_image", "read_mask"]


@dataclass
class Setting:
    """One setting of a method: its name (the --param KEY), default and help."""

    name: str
    default: object
    help: str


@dataclass
class Generation:
    """One image `generate_files` wrote: its file, seed, the settings in its metadata and, when asked
    for, one attention heatmap per prompt token (label, PNG), in prompt order."""

    path: Path
    seed: int
    metadata: dict
    attention: list[tuple[str, Path]]


def methods() -> dict[str, str]:
    """Each learning method's name and the first line of its description (`multiconcept methods`)."""
    import sys

    from .methods import METHODS

    return {m: (sys.modules[METHODS[m].__module__].__doc__ or "").strip().splitlines()[0] for m in sorted(METHODS)}


def method_settings(method: str) -> list[Setting]:
    """A method's settings with their defaults and help (`multiconcept methods NAME`)."""
    from .methods import get_method
    from .methods.settings import config_help

    return [Setting(*row) for row in config_help(get_method(method).Config)]


def parse_settings(method: str, values: Mapping[str, str]) -> dict[str, object]:
    """Settings written as text (`--param KEY=VALUE`: 'true', '1e-4', 'a|b' for a tuple) -> typed values
    for `learn`, checked by the command line's rules."""
    from dataclasses import fields

    from .methods import get_method
    from .methods.settings import apply_overrides

    cfg = apply_overrides(get_method(method).Config(), dict(values))
    names = {k.replace("-", "_") for k in values}
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in names}


def learn(method: str, concepts: Sequence[Concept], sources: Sequence[Source], out: str | Path, *,
          base: str | SingleFile | None = None, settings: dict | None = None, resume: bool = False, overwrite: bool = True,
          progress: bool = False, on_step: Callable[[Progress], None] | None = None,
          cancel: Callable[[], bool] | None = None, device: str = "auto", dtype: str = "fp32") -> Bundle | None:
    """Learn `concepts` from `sources` with `method` (see `multiconcept methods`); `settings` are the
    method's settings by name, typed (e.g. {"steps": 400, "lr": 1e-5}). Writes the bundle to `out`
    and returns it, or None when `cancel()` stopped the run (resume=True continues it)."""
    from .workflows.learn import learn_concepts

    data = concept_set(list(concepts), list(sources))
    path = learn_concepts(method, data, out, settings=settings, base=base, resume=resume, overwrite=overwrite,
                          progress=progress, on_step=on_step, cancel=cancel, device=device, dtype=dtype)
    return None if path is None else load_bundle(path)


def generate(prompt: str, bundles: Sequence[str | Path] = (), *, n: int = 1, seed: int = 0,
             sampling: SampleSettings = SampleSettings(), base: str | SingleFile | None = None, device: str = "auto",
             dtype: str = "fp32", loras: Sequence[str | Path] = (), embeddings: Sequence[str] = ()) -> list[Image.Image]:
    """n images of `prompt` (seeds seed .. seed+n-1) with the bundles' concepts, plus LoRA and embedding
    files of other tools (kohya / A1111 / ComfyUI / diffusers; an embedding 'FILE' is the token <FILE's
    name>, '<tok>=FILE' picks it)."""
    from .workflows.external import add_embedding, add_lora
    from .workflows.generate import check_prompt_tokens, draw, load_with_bundles

    check_prompt_tokens(prompt, [str(b) for b in bundles], [str(e) for e in embeddings])
    loaded = load_with_bundles(base, [str(b) for b in bundles], device=device, dtype=dtype)
    for f in loras:
        add_lora(loaded, f)
    for e in embeddings:
        add_embedding(loaded, str(e))
    return [img for _, img, _, _ in draw(prompt, loaded, n, seed, sampling)]


def export(bundle: str | Path, out: str | Path, format: str = "diffusers", *, rank: int | str = DEFAULT_RANK,
           base: str | SingleFile | None = None) -> ToolExport:
    """Write a bundle as files `format` loads: diffusers | a1111 | comfyui | kohya (the last three share
    their files: embeddings, a kohya LoRA; Custom Diffusion / DisenDiff deltas by truncated SVD at `rank`,
    or "full"). Returns the paths written and, for an SVD LoRA, its error per layer and in total."""
    from .workflows.export import export_bundle

    return export_bundle(bundle, out, format, rank=rank, base=base)


def bake(bundles: Sequence[str | Path], out: str | Path, *, base: str | SingleFile | None = None, dtype: str = "fp32",
         save_dtype: str | None = None, overwrite: bool = False):
    """Write `out`, a single-file checkpoint (A1111 / ComfyUI / kohya / diffusers' from_single_file) of `base` with
    the bundles' weight changes added, the learned tokens as `embeddings/<word>.safetensors` beside it and a
    README; returns the paths, the tokens' words and how many weight tensors changed."""
    from .workflows.bake import bake as bake_bundles

    return bake_bundles(list(bundles), out, base=base, dtype=dtype, save_dtype=save_dtype, overwrite=overwrite)


def generate_files(prompt: str, bundles: Sequence[str | Path], out: str | Path, *, n: int = 1, seed: int = 0,
                   sampling: SampleSettings = SampleSettings(), attention_maps: bool = False, overwrite: bool = False,
                   base: str | SingleFile | None = None, device: str = "auto", dtype: str = "fp32") -> list[Generation]:
    """`generate`, written the way `multiconcept generate --out OUT` writes it: PNGs with their settings
    in the metadata and, with `attention_maps`, each prompt token's heatmap in OUT/attention."""
    from .workflows.generate import check_prompt_tokens, generate, load_with_bundles, planned_paths, read_png_metadata

    out = Path(out)
    if not overwrite:
        clash = [p for p in planned_paths(out, n, seed) if p.exists()]
        if clash:
            raise UserError(f"{clash[0]} already exists: pass overwrite=True to replace it, or pick another folder or seed")
    check_prompt_tokens(prompt, [str(b) for b in bundles])
    loaded = load_with_bundles(base, [str(b) for b in bundles], device=device, dtype=dtype)
    paths = generate(prompt, loaded, n, seed, out, sampling, attention_maps=attention_maps)
    results = []
    for p in paths:
        meta = read_png_metadata(p)
        maps = sorted((out / "attention").glob(f"{p.stem}_*.png")) if attention_maps else []
        # heatmaps are named SEED_II_LABEL.png (II: the token's place in the prompt)
        results.append(Generation(p, meta["seed"], meta, [(m.stem.split("_", 2)[-1], m) for m in maps]))
    return results


def attention_images(progress: Progress, image: Image.Image | None = None) -> list[tuple[str, Image.Image]]:
    """The cross-attention of a training step (`Progress.attention`) as labelled heatmaps, laid over
    `image` when given (e.g. the training image); [] when the method computes none."""
    import torch

    from .heatmaps import heatmap_images

    maps = progress.attention() if progress.attention is not None else {}
    if not maps:
        return []
    return list(zip(maps, heatmap_images(torch.stack(list(maps.values())), image)))


def compose(prompt: str, subjects: Sequence[str], model: str | Path | None = None, *, n: int = 1, seed: int = 0,
            settings: ComposeSettings | SubjectComposeSettings | None = None, locations: Sequence[str | None] = (),
            base: str | SingleFile | None = None, device: str = "auto", dtype: str = "fp32") -> list[Image.Image]:
    """Tuning-free: n images of `prompt`, whose `<img>` markers follow the subjects ('IMG' or 'IMG:MASK').
    The model folder says the method: FastComposer (ComposeSettings) or Subject-Diffusion
    (SubjectComposeSettings; `locations`: where each subject goes, 'x0,y0,x1,y1' fractions or None).
    No model: ToyWorld's shipped one, Subject-Diffusion's when `settings` are SubjectComposeSettings."""
    from .workflows import compose_subject_diffusion as sd
    from .workflows.compose import compose_images, model_method, shipped_model

    if model is None:
        model = shipped_model("subject-diffusion" if isinstance(settings, SubjectComposeSettings) else "fastcomposer")
    if model_method(model) == "subject-diffusion":
        settings = settings or SubjectComposeSettings()
        if not isinstance(settings, SubjectComposeSettings):
            raise UserError(f"{model} is a Subject-Diffusion model: pass SubjectComposeSettings, not {type(settings).__name__}")
        return sd.compose_images(prompt, list(subjects), model, n=n, seed=seed, settings=settings,
                                 locations=list(locations), base=base, device=device, dtype=dtype)
    if locations:
        raise UserError("locations are Subject-Diffusion's: a FastComposer model places subjects from the prompt")
    settings = settings or ComposeSettings()
    if not isinstance(settings, ComposeSettings):
        raise UserError(f"{model} is a FastComposer model: pass ComposeSettings, not {type(settings).__name__}")
    return compose_images(prompt, list(subjects), model, n=n, seed=seed, settings=settings, base=base, device=device,
                          dtype=dtype)


def evaluate(generations: str | Path, references: Sequence[str], *, reference_masks: Sequence[str] = (),
             clip: str | None = None, dino: str | None = None, detector: str | None = None,
             out: str | Path | None = None) -> dict:
    """CLIP-T, CLIP-I, DINO, leakage and multi-subject fidelity of a folder `multiconcept generate` wrote,
    against references. `detector` (an OWLv2 or Grounding DINO checkpoint) finds the subjects in photos;
    ToyWorld images need none."""
    from .workflows.evaluate import evaluate as run

    return run(generations, list(references), list(reference_masks), clip=clip, dino=dino, out=out, detector=detector)
