"""Scoring generated PNGs (+ their metadata) against references.

Each PNG written by `generate` carries its prompt, seed, tokens and class
words. An image is scored by what its prompt holds (DisenDiff's protocol):
- every concept ("combined"): image alignment to the whole source image,
  and to each concept's reference separately (the multi-subject protocol);
- one concept: image alignment to that concept's reference — a crop of the
  source cut out by its mask, background blanked — and leakage, the
  alignment to every OTHER concept's reference;
- always text alignment (CLIP-T) of the prompt with the learned tokens
  removed.
On ToyWorld sources, whose ground truth says each concept's kind and parts,
the exact measures of `metrics.leakage` are added (prompted kinds present,
identity, leakage). Images with several concepts also get the multi-subject
fidelity of `metrics.fidelity`: on ToyWorld from the analytic checker's
readings, elsewhere when a detector is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import load_image
from ..errors import UserError, require
from ..metrics import SCALES, check_scale, clip_text, load_clip, load_dino, per_image_alignment, scaled, toyworld_measures
from ..metrics.fidelity import box_masks, match_subjects, summarise_matches, toyworld_objects
from ..protocols import COMBINED
from .generate import read_png_metadata
from .sources import References, concept_crop

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
    detector: object | None = None  # datasets.boxes.Detector; ToyWorld images need none

    def describe(self) -> dict:
        return {"clip": self.clip.describe(), "dino": self.dino.describe() if self.dino else None,
                "detector": self.detector.name if self.detector else "ToyWorld's analytic checker (ToyWorld sources)"}


# OWLv2's scores run low; 0.1 is transformers' default threshold for it (and MuDI's detector)
DETECTOR_THRESHOLD = 0.1


def load_scorers(clip: str | None = None, dino: str | None = None, device: str = "cpu", batch_size: int = 64,
                 detector: str | None = None, detector_threshold: float = DETECTOR_THRESHOLD) -> Scorers:
    found = None
    if detector:
        import torch

        from ..datasets.boxes import load_detector

        found = load_detector(detector, torch.device(device), box_threshold=detector_threshold)
    return Scorers(load_clip(clip, device=device, batch_size=batch_size),
                   load_dino(dino, device=device, batch_size=batch_size) if dino else None, found)


def subject_fidelity(g: Generation, refs: References, scorers: Scorers, spaces: dict, concept_emb: dict) -> dict:
    """Detect, crop, compare and match (metrics.fidelity) for one image with several concepts;
    {} when there is no way to detect (no detector and not ToyWorld) or a concept has no reference."""
    present = g.present
    if not all(concept_emb[k].get(t) is not None for k in spaces for t in present):
        return {}
    image = load_image(g.path)
    if scorers.detector is not None:
        words = dict(zip(g.tokens, g.class_words))
        require(all(t in words for t in present), f"{g.path} names no class word for {present}: regenerate it "
                                                  "with `multiconcept generate`")
        found = scorers.detector([image], [sorted({words[t] for t in present})])[0]
        masks = box_masks(image.size, [e.box for e in found])
    elif refs.signatures and all(t in refs.signatures for t in present):
        masks = toyworld_objects(image)
    else:
        return {}
    crops = [concept_crop(image, Image.fromarray(m.astype(np.uint8) * 255)) for m in masks]
    out = {}
    for key, scorer in spaces.items():
        emb = scorer.image_embeddings(crops) if crops else None
        sim = np.array([[per_image_alignment(emb[d: d + 1], concept_emb[key][t])[0] for t in present]
                        for d in range(len(crops))]).reshape(len(crops), len(present))
        summary = summarise_matches(match_subjects(sim))
        out[f"fidelity_{key}"] = summary["fidelity"]
        if key == "clip_i":
            out["fidelity_missing"], out["fidelity_confused"] = summary["missing"], summary["confused"]
    return out


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
        if kind == COMBINED:
            r.update(subject_fidelity(g, refs, scorers, spaces, concept_emb))
        if toyworld and refs.signatures and kind != "none" and all(t in refs.signatures for t in g.tokens):
            m = toyworld_measures(load_image(g.path), [refs.signatures[t] for t in present],
                                  [refs.signatures[t] for t in g.tokens if t not in present])
            r["toyworld_present"] = m["present"]
            r["toyworld_identity"] = m["identity"]
            r["toyworld_subjects"] = m["subjects"]
            if kind != COMBINED:
                r["toyworld_leak"] = m["leak"]
        records.append(r)
    return {"images": records, "prompts": _by_prompt(records), "summary": summarise(records)}


NUMERIC = ("clip_t", "clip_t_clipscore", "clip_t_100", "clip_i", "clip_i_subject_mean", "dino", "dino_subject_mean",
           "fidelity_clip_i", "fidelity_dino", "fidelity_missing", "fidelity_confused", "leakage_clip_i", "leakage_dino",
           "toyworld_present", "toyworld_identity", "toyworld_leak")


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
