"""The nouns stage: which words of a caption name things a detector should look for.

The published script takes spaCy's (`en_core_web_sm`) NOUN tokens as the detector's tag prompt. spaCy's
English model is not on PyPI and this project never installs a re-upload of it: a user who installed it
(`python -m spacy download en_core_web_sm`) gets it by default; everyone else passes a vocabulary file
(`vocab:FILE`, one noun per line) or, with a Florence-2 captioner, its phrase grounding (`grounding`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, require
from .defaults import NOUNS as DEFAULT_NOUNS


def _dedupe(words) -> list[str]:
    seen, out = set(), []
    for w in words:
        if w and w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _words(caption: str) -> list[str]:
    return [w.strip(".,;:!?\"'()").lower() for w in caption.split()]


class SpacyNouns:
    def __init__(self, model: str = "en_core_web_sm"):
        try:
            import spacy
        except ImportError as e:
            raise UserError("--nouns spacy needs spaCy and its English model, which this project does not install: "
                            "pip install spacy && python -m spacy download en_core_web_sm, or pass --nouns vocab:FILE") from e
        try:
            self.nlp = spacy.load(model, disable=["ner", "lemmatizer"])
        except OSError as e:
            raise UserError(f"spaCy's model {model} is not installed: python -m spacy download {model}, "
                            "or pass --nouns vocab:FILE") from e

    def __call__(self, captions: list[str], images=None) -> list[list[str]]:
        return [_dedupe(t.text.lower() for t in doc if t.pos_ == "NOUN") for doc in self.nlp.pipe(captions)]


class VocabNouns:
    """Caption words found in a vocabulary; a plural ('dogs') counts when its singular is listed."""

    def __init__(self, path: str | Path):
        path = Path(path)
        require(path.is_file(), f"--nouns vocab:{path}: no such file; give a text file with one noun per line")
        self.vocab = {line.strip().lower() for line in path.read_text().splitlines() if line.strip()}
        require(bool(self.vocab), f"--nouns vocab:{path} is empty: one noun per line")

    def known(self, w: str) -> bool:
        return w in self.vocab or (w.endswith("s") and w[:-1] in self.vocab) or (w.endswith("es") and w[:-2] in self.vocab)

    def __call__(self, captions: list[str], images=None) -> list[list[str]]:
        return [_dedupe(w for w in _words(c) if self.known(w)) for c in captions]


class GroundingNouns:
    """Florence-2's grounded phrases, each reduced to its last word (the head noun of an English noun phrase)."""

    def __init__(self, captioner):
        require(hasattr(captioner, "ground"), "--nouns grounding needs a captioner that grounds phrases "
                "(Florence-2, e.g. microsoft/Florence-2-large): pass one with --captioner, or use --nouns vocab:FILE")
        self.captioner = captioner

    def __call__(self, captions: list[str], images=None) -> list[list[str]]:
        phrases = self.captioner.ground(images, captions)
        return [_dedupe(_words(p)[-1] for p in ps if p.strip()) for ps in phrases]


def load_nouns(spec: str = DEFAULT_NOUNS, captioner=None):
    kind, _, arg = spec.partition(":")
    if kind == "spacy":
        return SpacyNouns(arg or "en_core_web_sm")
    if kind == "vocab":
        require(bool(arg), "--nouns vocab needs a file: --nouns vocab:nouns.txt")
        return VocabNouns(arg)
    if kind == "grounding":
        return GroundingNouns(captioner)
    raise UserError(f"--nouns {spec!r}: choose spacy[:MODEL], vocab:FILE or grounding")
