"""evaluate: generated PNGs (+ their metadata) and references → metric JSON.

Each PNG written by `generate` carries its prompt, seed, tokens and class
words. An image is scored by what its prompt holds (DisenDiff's protocol):
- every concept ("combined"): image alignment to the whole source image,
  and to each concept's reference separately (the multi-subject protocol);
- one concept: image alignment to that concept's reference — a crop of the
  source cut out by its mask, background blanked — and leakage, the
  alignment to every OTHER concept's reference;
- always text alignment (CLIP-T) of the prompt with the learned tokens
  removed.
On ToyWorld sources, whose ground truth says each concept's colours, the
exact leakage measure of `metrics.leakage` is added.

A *source* is a folder holding one image with several concepts, a mask per
concept and ``concepts.json``::

    {"image": "image.png", "world": "toyworld" | "photo",
     "concepts": [{"token": "<c1>", "class": "star", "mask": "star_mask.png",
                   "signature": {"noun": "star", "colour": "orange",
                                 "pattern": "checkered", "second_colour": null}}, ...]}

("signature" only for ToyWorld). A folder written by
`toyworld.write_two_concept_folder` (scene.json, no concepts.json) is read
as a source too, with tokens taken from the generations (or <c1>, <c2>).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..bundle import atomic_write
from ..data import list_images, load_image, load_mask, split_token_path
from ..errors import UserError, is_dir, require
from ..metrics import (
    SCALES,
    Signature,
    check_scale,
    clip_text,
    load_clip,
    load_dino,
    per_image_alignment,
    scaled,
    toyworld_measures,
)
from ..protocols import COMBINED
from .generate import read_png_metadata

DEFAULT_TOKENS = ("<c1>", "<c2>", "<c3>")
CROP_FILL = (255, 255, 255)  # ToyWorld's masked_crop blanks to white as well


# ---------------------------------------------------------------- sources

@dataclass
class SourceConcept:
    token: str
    class_word: str
    mask: Path
    signature: Signature | None = None

    @property
    def spec(self) -> str:
        return f"{self.token}={self.class_word}"


@dataclass
class Source:
    name: str
    folder: Path
    image: Path
    concepts: list[SourceConcept]
    world: str = "photo"

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.concepts]

    def to_dict(self) -> dict:
        return {"image": self.image.name, "world": self.world,
                "concepts": [{"token": c.token, "class": c.class_word, "mask": c.mask.name,
                              **({"signature": c.signature.to_dict()} if c.signature else {})}
                             for c in self.concepts]}


def is_source(folder: Path) -> bool:
    return is_dir(folder) and ((folder / "concepts.json").is_file() or (folder / "scene.json").is_file())


def load_source(folder: str | Path, tokens: Sequence[str] | None = None) -> Source:
    """A source folder (concepts.json, or a ToyWorld scene.json); `tokens` name
    the concepts of a scene.json folder (default <c1>, <c2>, ...)."""
    folder = Path(folder)
    require(folder.is_dir(), f"source {folder} is not a folder: pass a folder holding image.png, masks and concepts.json")
    spec_path = folder / "concepts.json"
    if spec_path.is_file():
        try:
            spec = json.loads(spec_path.read_text())
            concepts = [SourceConcept(c["token"], c["class"], folder / c["mask"],
                                      Signature.from_dict(c["signature"]) if c.get("signature") else None)
                        for c in spec["concepts"]]
            image, world = folder / spec.get("image", "image.png"), spec.get("world", "photo")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{spec_path} is not a valid concepts file ({type(e).__name__}: {e}): it needs "
                            '{"image": ..., "concepts": [{"token": "<c1>", "class": "cat", "mask": "cat_mask.png"}, ...]}') from e
    elif (folder / "scene.json").is_file():
        scene = json.loads((folder / "scene.json").read_text())
        from ..toyworld import left_to_right

        objects = left_to_right([o for o in scene["objects"] if o.get("concept")])
        tokens = list(tokens or DEFAULT_TOKENS[: len(objects)])
        require(len(tokens) >= len(objects), f"source {folder} holds {len(objects)} concepts but {len(tokens)} tokens "
                                             f"were given: give one token per concept")
        concepts = [SourceConcept(t, o["noun"], folder / f"{o['concept']}_mask.png", Signature.from_dict(o))
                    for t, o in zip(tokens, objects)]
        image, world = folder / "image.png", "toyworld"
    else:
        raise UserError(f"source {folder} has no concepts.json: write one giving the image, and per concept its token, "
                        f"class word and mask (see `multiconcept benchmark --help`)")
    require(image.is_file(), f"source {folder}: image {image.name} does not exist: add it or fix concepts.json")
    require(len(concepts) >= 1, f"source {folder} names no concept: list them in concepts.json")
    for c in concepts:
        require(c.mask.is_file(), f"source {folder}: mask {c.mask.name} of {c.token} does not exist: add it or fix concepts.json")
    return Source(folder.name, folder, image, concepts, world)


def write_toyworld_source(concept_a: str, concept_b: str, folder: str | Path, seed: int = 0,
                          tokens: Sequence[str] = DEFAULT_TOKENS[:2]) -> Source:
    """A ToyWorld two-concept scene as a benchmark source (image, masks, scene.json, concepts.json)."""
    from ..toyworld import left_to_right, write_two_concept_folder

    folder = Path(folder)
    scene = write_two_concept_folder(concept_a, concept_b, folder, seed=seed)
    source = Source(folder.name, folder, folder / "image.png", [
        SourceConcept(t, o.noun, folder / f"{o.concept}_mask.png", Signature(o.noun, o.colour, o.appearance.pattern,
                                                                              o.appearance.second_colour))
        for t, o in zip(tokens, left_to_right(scene.objects))], "toyworld")
    text = json.dumps(source.to_dict(), indent=1)
    atomic_write(folder / "concepts.json", lambda tmp: Path(tmp).write_text(text))
    return source


# ---------------------------------------------------------------- references

def concept_crop(image: Image.Image, mask: Image.Image, fill=CROP_FILL) -> Image.Image:
    """The concept alone: pixels outside its mask blanked, cropped to the mask's
    box, then padded to a square with the same fill so the metric's centre crop
    cuts nothing off."""
    arr = np.asarray(image.convert("RGB")).copy()
    m = np.asarray(mask.convert("L")) > 127
    require(bool(m.any()), "a reference mask is empty: paint the concept white on black")
    arr[~m] = fill
    ys, xs = np.nonzero(m)
    crop = arr[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = fill
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top: top + h, left: left + w] = crop
    return Image.fromarray(canvas)


@dataclass
class References:
    whole: list[Image.Image] = field(default_factory=list)  # images holding every concept
    concept: dict[str, list[Image.Image]] = field(default_factory=dict)  # token → crops / its own images
    signatures: dict[str, Signature] = field(default_factory=dict)  # token → ToyWorld ground truth
    sources: list[str] = field(default_factory=list)
    source_tokens: set[str] = field(default_factory=set)

    def add_source(self, source: Source) -> None:
        image = load_image(source.image)
        self.whole.append(image)
        for c in source.concepts:
            self.concept.setdefault(c.token, []).append(concept_crop(image, load_mask(c.mask, image.size)))
            if c.signature is not None:
                self.signatures[c.token] = c.signature
        self.sources.append(str(source.folder))
        self.source_tokens.update(source.tokens)

    @classmethod
    def from_source(cls, source: Source) -> "References":
        refs = cls()
        refs.add_source(source)
        return refs


def _token_spec(spec: str, flag: str) -> tuple[str | None, str]:
    token, path = split_token_path(spec)
    require(token is not None or flag != "--reference-mask",
            f"{flag} {spec!r} must say its concept: TOKEN=PATH, e.g. '<c1>=cat_mask.png'")
    return token, path


def build_references(reference: Sequence[str], reference_masks: Sequence[str], tokens: Sequence[str]) -> References:
    """--reference PATH | TOKEN=PATH (image, folder or source folder), --reference-mask TOKEN=PATH."""
    require(bool(reference), "no reference given: add --reference IMAGE_OR_FOLDER (the source image, or TOKEN=PATH per concept)")
    refs = References()
    for spec in reference:
        token, path = _token_spec(spec, "--reference")
        p = Path(path)
        if token is None and is_source(p):
            refs.add_source(load_source(p, tokens))
        elif token is None:
            refs.whole.extend(load_image(f, role="reference image") for f in list_images(p, "reference"))
        else:
            require(token in tokens,
                    f"--reference {spec!r} names {token}, which no generation uses: use one of {', '.join(tokens)}")
            refs.concept.setdefault(token, []).extend(load_image(f, role="reference image") for f in list_images(p, "reference"))
    masks: dict[str, list[str]] = {}
    for spec in reference_masks:
        token, path = _token_spec(spec, "--reference-mask")
        require(token in tokens,
                f"--reference-mask {spec!r} names {token}, which no generation uses: use one of {', '.join(tokens)}")
        masks.setdefault(token, []).append(path)
    for token, paths in masks.items():
        require(len(paths) == len(refs.whole),
                f"{token} has {len(paths)} reference mask(s) for {len(refs.whole)} whole reference image(s): "
                f"give one mask per image, in order")
        for image, mp in zip(refs.whole, paths):
            refs.concept.setdefault(token, []).append(concept_crop(image, load_mask(mp, image.size)))
    unknown = refs.source_tokens - set(tokens)
    require(not unknown, f"the source names tokens {sorted(unknown)} that no generation uses ({', '.join(tokens)}): "
                         f"fix its concepts.json or generate with those tokens")
    return refs


# ---------------------------------------------------------------- generations

@dataclass
class Generation:
    path: Path
    prompt: str
    seed: int
    tokens: list[str]  # every concept loaded when it was drawn
    class_words: list[str]

    @property
    def present(self) -> list[str]:
        return [t for t in self.tokens if t in self.prompt]

    @property
    def kind(self) -> str:
        p = self.present
        return COMBINED if len(p) >= 2 else (p[0] if p else "none")


def list_generations(gen_dir: str | Path) -> list[Generation]:
    """Every PNG under gen_dir (attention heatmaps excluded), with its metadata."""
    gen_dir = Path(gen_dir)
    require(gen_dir.is_dir(), f"{gen_dir} is not a folder: pass the folder `multiconcept generate` wrote")
    files = sorted(p for p in gen_dir.rglob("*.png") if "attention" not in p.relative_to(gen_dir).parts[:-1])
    require(bool(files), f"{gen_dir} holds no PNG images: pass the folder `multiconcept generate` wrote")
    out = []
    for f in files:
        try:
            meta = read_png_metadata(f)
        except (json.JSONDecodeError, OSError) as e:
            raise UserError(f"{f} has unreadable multiconcept metadata ({type(e).__name__}): regenerate it") from e
        require("prompt" in meta and "tokens" in meta,
                f"{f} metadata lacks prompt/tokens: it was not written by `multiconcept generate`")
        out.append(Generation(f, meta["prompt"], int(meta.get("seed", 0)), list(meta["tokens"]),
                              list(meta.get("class_words", []))))
    return out


# ---------------------------------------------------------------- scoring

@dataclass
class Scorers:
    clip: object
    dino: object | None = None

    def describe(self) -> dict:
        return {"clip": self.clip.describe(), "dino": self.dino.describe() if self.dino else None}


def load_scorers(clip: str | None = None, dino: str | None = None, device: str = "cpu", batch_size: int = 64) -> Scorers:
    return Scorers(load_clip(clip, device=device, batch_size=batch_size),
                   load_dino(dino, device=device, batch_size=batch_size) if dino else None)


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _emb(scorer, images):
    return scorer.image_embeddings(images) if images else None


def _embed_files(scorer, paths: list[Path]) -> "torch.Tensor":  # noqa: F821
    """Embeddings of image files, read one model batch at a time (thousands of
    generations never sit in memory at once)."""
    import torch

    step = scorer.batch_size
    return torch.cat([scorer.image_embeddings([load_image(p) for p in paths[i: i + step]])
                      for i in range(0, len(paths), step)])


def score_generations(gens: list[Generation], refs: References, scorers: Scorers, scale: str = "raw",
                      text_prefix: str = "", root: Path | None = None, toyworld: bool = True) -> dict:
    """Per-image metrics, per-prompt and per-kind means (Combined / each concept / Mean)."""
    check_scale(scale)
    require(bool(gens), "no generations to score")
    spaces = {"clip_i": scorers.clip, **({"dino": scorers.dino} if scorers.dino else {})}
    gen_emb = {k: _embed_files(s, [g.path for g in gens]) for k, s in spaces.items()}
    whole_emb = {k: _emb(s, refs.whole) for k, s in spaces.items()}
    concept_emb = {k: {t: _emb(s, ims) for t, ims in refs.concept.items()} for k, s in spaces.items()}
    all_tokens = sorted({t for g in gens for t in g.tokens})
    if len(all_tokens) == 1 and refs.whole and all_tokens[0] not in refs.concept:
        # one concept and its own reference images (DreamBench): the whole images are its references
        concept_emb = {k: {all_tokens[0]: whole_emb[k]} for k in spaces}
    texts = [clip_text(g.prompt, g.tokens, text_prefix) for g in gens]
    t_cos = (gen_emb["clip_i"] * scorers.clip.text_embeddings(texts)).sum(-1).tolist()

    records = []
    for i, g in enumerate(gens):
        kind, present = g.kind, g.present
        r = {"file": str(g.path.relative_to(root)) if root else str(g.path), "prompt": g.prompt, "seed": g.seed,
             "kind": kind, "text": texts[i], "clip_t": t_cos[i]}
        if scale != "raw":
            r[f"clip_t_{scale}"] = scaled(t_cos[i], scale)
        for key in spaces:
            row = gen_emb[key][i: i + 1]
            subjects = {t: per_image_alignment(row, concept_emb[key][t])[0]
                        for t in present if concept_emb[key].get(t) is not None}
            missing = [t for t in present if t not in subjects]
            if kind == COMBINED:
                if whole_emb[key] is not None:
                    r[key] = per_image_alignment(row, whole_emb[key])[0]
                    r[f"{key}_against"] = "source image"
                else:
                    require(not missing, f"no reference for {', '.join(missing)} nor a whole source image: pass "
                                         f"--reference SOURCE_IMAGE, --reference-mask TOKEN=MASK or --reference TOKEN=PATH")
                    r[key] = _mean(subjects.values())
                    r[f"{key}_against"] = "subject mean"
                if subjects:
                    r[f"{key}_subjects"] = subjects
                    r[f"{key}_subject_mean"] = _mean(subjects.values())
            elif kind != "none":
                require(not missing, f"no reference for {kind} (prompt {g.prompt!r}): pass --reference-mask {kind}=MASK "
                                     f"(with the source image as --reference) or --reference {kind}=IMAGES")
                r[key] = subjects[kind]
                others = [t for t in g.tokens if t != kind and concept_emb[key].get(t) is not None]
                if others:
                    r[f"leakage_{key}"] = _mean(per_image_alignment(row, concept_emb[key][t])[0] for t in others)
        if toyworld and refs.signatures and kind != "none" and all(t in refs.signatures for t in g.tokens):
            m = toyworld_measures(load_image(g.path), [refs.signatures[t] for t in present],
                                  [refs.signatures[t] for t in g.tokens if t not in present])
            r["toyworld_present"] = m["present"]
            r["toyworld_detections"] = m["detections"]
            if kind != COMBINED:
                r["toyworld_colour_leak"] = m["colour_leak"]
                r["toyworld_object_leak"] = m["object_leak"]
        records.append(r)
    return {"images": records, "prompts": _by_prompt(records), "summary": summarise(records)}


NUMERIC = ("clip_t", "clip_t_clipscore", "clip_t_100", "clip_i", "clip_i_subject_mean", "dino", "dino_subject_mean",
           "leakage_clip_i", "leakage_dino", "toyworld_present", "toyworld_colour_leak", "toyworld_object_leak")


def _aggregate(records: list[dict]) -> dict:
    out: dict = {"images": len(records)}
    for k in NUMERIC:
        vals = [r[k] for r in records if r.get(k) is not None]
        if vals:
            out[k] = float(np.mean([float(v) for v in vals]))
    return out


def _by_prompt(records: list[dict]) -> list[dict]:
    order: dict[str, list[dict]] = {}
    for r in records:
        order.setdefault(r["prompt"], []).append(r)
    return [{"prompt": p, "kind": rs[0]["kind"], **_aggregate(rs)} for p, rs in order.items()]


def summarise(records: list[dict]) -> dict:
    """Columns Combined / concept 1 / concept 2 / ... and their Mean (DisenDiff's table)."""
    kinds: dict[str, list[dict]] = {}
    for r in records:
        kinds.setdefault(r["kind"], []).append(r)
    columns = ([COMBINED] if COMBINED in kinds else []) + sorted(k for k in kinds if k not in (COMBINED, "none"))
    summary = {k: _aggregate(kinds[k]) for k in columns}
    if "none" in kinds:
        summary["none"] = _aggregate(kinds["none"])
    summary["mean"] = {k: _mean(summary[c].get(k) for c in columns) for k in NUMERIC
                       if any(summary[c].get(k) is not None for c in columns)}
    summary["columns"] = columns
    return summary


def models_block(scorers: Scorers, scale: str, text_prefix: str) -> dict:
    return {**scorers.describe(), "scale": scale, "scale_formula": SCALES[scale][0],
            "scale_applies_to": "clip_t (raw cosine always reported as clip_t)", "text_prefix": text_prefix}


# ---------------------------------------------------------------- the workflow

def evaluate(gen_dir: str | Path, reference: Sequence[str], reference_masks: Sequence[str] = (), *,
             clip: str | None = None, dino: str | None = None, scale: str = "raw", text_prefix: str = "",
             out: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
             overfitting: bool = False, bundles: Sequence[str] = (), base: str | None = None, seed: int = 0) -> dict:
    check_scale(scale)
    gens = list_generations(gen_dir)
    tokens = sorted({t for g in gens for t in g.tokens}, key=lambda t: min(g.tokens.index(t) for g in gens if t in g.tokens))
    refs = build_references(reference, reference_masks, tokens)
    scorers = load_scorers(clip, dino, device, batch_size)
    result = {"gen_dir": str(gen_dir), "references": {"whole": len(refs.whole),
                                                       "concept": {t: len(v) for t, v in refs.concept.items()},
                                                       "sources": refs.sources},
              "models": models_block(scorers, scale, text_prefix),
              **score_generations(gens, refs, scorers, scale, text_prefix, root=Path(gen_dir))}
    if overfitting:
        from .overfitting import overfitting_report

        paths = resolve_bundles(gen_dir, gens, bundles)
        bases = {read_png_metadata(g.path).get("base") for g in gens}
        base = base or (bases.pop() if len(bases) == 1 else None)
        require(base is not None, f"the generations come from several bases {sorted(map(str, bases))}: pass --base")
        # beside the results, never inside gen_dir (its PNGs would be read as generations next time)
        where = Path(out).with_name(Path(out).stem + ".overfitting") if out else \
            Path(gen_dir).with_name(Path(gen_dir).name + ".overfitting")
        result["overfitting"] = overfitting_report(base, [str(p) for p in paths], where, clip, seed)
    if out is not None:
        text = json.dumps(result, indent=1, default=_json_default)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return result


def resolve_bundles(gen_dir: str | Path, gens: list[Generation], given: Sequence[str]) -> list[Path]:
    """--bundle paths, or the bundle files the metadata names, found beside the generations."""
    if given:
        for b in given:
            require(Path(b).is_file(), f"bundle {b} does not exist: check the path")
        return [Path(b) for b in given]
    names = sorted({n for g in gens for n in read_png_metadata(g.path).get("bundles", [])})
    require(bool(names), "the generations name no bundle: pass --bundle PATH for the overfitting metrics")
    found = []
    for n in names:
        hits = [d / n for d in (Path(gen_dir), Path(gen_dir).parent) if (d / n).is_file()]
        require(bool(hits), f"bundle {n} (named in the PNG metadata) is not beside {gen_dir}: pass --bundle PATH")
        found.append(hits[0])
    return found


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
