"""Prompts with image markers: which token each subject's embedding replaces."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ...errors import require
from ...prompts import Encoded, tokenize_checked
from .config import MARKER, MARKER_PATTERN


@dataclass
class SubjectPrompt:
    """A prompt with its image markers removed and each subject's token found."""

    prompt: str  # as written, markers included
    text: str  # markers removed: what the text encoder reads
    input_ids: list[int]  # BOS ... EOS, unpadded
    positions: list[int]  # flagged token index per subject, in marker order
    kept: list[int] = field(default_factory=list)  # which subjects survived truncation (training only)

    def padded_ids(self, tokenizer) -> torch.Tensor:
        n = tokenizer.model_max_length
        return torch.tensor(self.input_ids + [tokenizer.pad_token_id] * (n - len(self.input_ids)))


def parse_subject_prompt(tokenizer, prompt: str, n_subjects: int | None = None, truncate: bool = False) -> SubjectPrompt:
    """'a star <img> and a circle <img> on a gray background': remove the
    markers and flag the token right before each (the last token of the noun
    phrase, the last piece of a multi-token word), found from character
    offsets. Image order = marker order.

    A prompt longer than the text encoder's limit is an error, unless
    `truncate` (training captions): then it is cut as SD training cuts
    captions, and subjects whose token falls past the cut are left out
    (`kept` lists the surviving subjects' indices)."""
    pieces = MARKER_PATTERN.split(prompt)
    text, ends = pieces[0], []
    for i, piece in enumerate(pieces[1:], 1):
        text = text.rstrip()
        require(bool(text), f"image marker {i} in {prompt!r} has no word before it: write the subject's noun first, "
                            f"e.g. 'a star {MARKER}'")
        require(not ends or len(text) > ends[-1],
                f"image markers {i - 1} and {i} in {prompt!r} follow the same word: put each marker after its own subject")
        ends.append(len(text))
        text += (" " if piece[:1].isalnum() else "") + piece
    if n_subjects is not None:
        require(len(ends) == n_subjects,
                f"the prompt has {len(ends)} image marker(s) but {n_subjects} subject image(s) were given: "
                f"put one {MARKER} after each subject's noun, in the order of the images")
    if truncate:
        raw = tokenizer(text, return_offsets_mapping=True, truncation=False, verbose=False)
        limit = tokenizer.model_max_length
        ids, offsets = list(raw["input_ids"]), [tuple(o) for o in raw["offset_mapping"]]
        if len(ids) > limit:
            ids, offsets = ids[: limit - 1] + ids[-1:], offsets[: limit - 1] + offsets[-1:]
        enc = Encoded(text, ids, offsets)
    else:
        enc = tokenize_checked(tokenizer, text)
    positions, kept = [], []
    for i, end in enumerate(ends, 1):
        before = [j for j, (s, e) in enumerate(enc.offsets) if s < e <= end]
        require(bool(before), f"image marker {i} in {prompt!r} has no token before it: put it after the subject's noun")
        j = before[-1]
        s, e = enc.offsets[j]
        if truncate and e < end:  # the subject's word was cut off
            continue
        require(bool(re.search(r"\w", text[s:e])),
                f"image marker {i} in {prompt!r} follows {text[s:e]!r}, not a word: put it right after the subject's noun")
        positions.append(j)
        kept.append(i - 1)
    return SubjectPrompt(prompt, text, enc.input_ids, positions, kept)
