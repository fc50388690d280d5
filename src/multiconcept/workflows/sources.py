"""Sources and references: what generated images are compared with.

A *source* is a folder holding one image with several concepts, a mask per
concept and ``concepts.json``::

    {"image": "image.png", "world": "toyworld" | "photo",
     "concepts": [{"token": "<c1>", "class": "robot", "mask": "robot_a_mask.png",
                   "signature": {"kind": "robot", "body_colour": "blue", "head_colour": "orange",
                                 "hat": "block", "marking": "spot", "marking_colour": "black"}}, ...]}

("signature", the concept's creature, only for ToyWorld). A folder written by
`toyworld.write_two_concept_folder` (scene.json, no concepts.json) is read
as a source too, with tokens taken from the generations (or <c1>, <c2>).

References are built from sources, or from plain image folders given per token
(``<c1>=DIR``), each concept cut out of its image by its mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..bundle import atomic_write
from ..data import list_images, load_image, load_mask, split_token_path
from ..errors import UserError, is_dir, require
from ..metrics import Signature

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

        require("subjects" in scene, f"source {folder} holds a scene of an earlier ToyWorld (shapes, not creatures): "
                                     f"render it again with `multiconcept benchmark --source toyworld:A+B`")
        subjects = left_to_right([o for o in scene["subjects"] if o.get("concept")])
        tokens = list(tokens or DEFAULT_TOKENS[: len(subjects)])
        require(len(tokens) >= len(subjects), f"source {folder} holds {len(subjects)} concepts but {len(tokens)} tokens "
                                              f"were given: give one token per concept")
        concepts = [SourceConcept(t, o["kind"], folder / f"{o['concept']}_mask.png", Signature.from_dict(o))
                    for t, o in zip(tokens, subjects)]
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
    """A ToyWorld two-concept scene as a benchmark source (image, masks, scene.json, concepts.json); tokens
    go to the concepts left to right, the order the base's captions name them."""
    from ..toyworld import left_to_right, write_two_concept_folder

    folder = Path(folder)
    scene = write_two_concept_folder(concept_a, concept_b, folder, seed=seed)
    source = Source(folder.name, folder, folder / "image.png", [
        SourceConcept(t, s.creature.kind, folder / f"{s.concept}_mask.png", s.creature)
        for t, s in zip(tokens, left_to_right(scene.subjects))], "toyworld")
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
