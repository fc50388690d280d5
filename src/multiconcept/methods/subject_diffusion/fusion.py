"""The fusion text encoder (Subject-Diffusion §3.3): each subject is named in a
clause appended to the caption,

    "[caption], the [label_0] is *, the [label_1] is *"

and the input embedding of each placeholder "*" is REPLACED by the subject
image's pooled embedding through an MLP (LN → Linear → GELU → Linear) before
the text encoder runs, so the encoder, trained whole, mixes the subject into
every token it attends to. The localisation loss reads the cross-attention of
the placeholder and of the label word in its clause (the token two before the
placeholder in the released code)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...errors import require
from ...prompts import Encoded, find_word_spans, token_positions, tokenize_checked
from ..fastcomposer import MARKER_PATTERN, parse_subject_prompt
from ..fastcomposer.encoder import MLP
from .config import PLACEHOLDER


@dataclass
class FusionPrompt:
    caption: str  # what the user (or the data) says, without the subject clauses
    labels: list[str]  # each subject's noun, in image order
    text: str  # caption + one clause per subject: what the text encoder reads
    input_ids: list[int]  # BOS ... EOS, unpadded
    placeholders: list[int]  # token index of each subject's placeholder
    entities: list[int]  # token index of each subject's label in its clause (its last piece)

    def padded_ids(self, tokenizer) -> torch.Tensor:
        n = tokenizer.model_max_length
        return torch.tensor(self.input_ids + [tokenizer.pad_token_id] * (n - len(self.input_ids)))


def with_clauses(caption: str, labels: list[str]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The template text and the character spans of each label and placeholder in its clause."""
    text = caption.strip().rstrip(",.;")
    label_spans, ph_spans = [], []
    for label in labels:
        text += ", the " if text else "the "
        label_spans.append((len(text), len(text) + len(label)))
        text += f"{label} is "
        ph_spans.append((len(text), len(text) + len(PLACEHOLDER)))
        text += PLACEHOLDER
    return text, label_spans, ph_spans


def fusion_prompt(tokenizer, caption: str, labels: list[str], truncate: bool = False) -> FusionPrompt:
    """Tokenise the template. A text longer than the encoder's limit is an error,
    unless `truncate` (training captions): then the caption loses words from its
    end until the clauses fit, so no subject is cut off."""
    words = caption.split()
    while True:
        text, label_spans, ph_spans = with_clauses(" ".join(words), labels)
        enc = tokenizer(text, return_offsets_mapping=True, truncation=False, verbose=False)
        if not truncate or len(enc["input_ids"]) <= tokenizer.model_max_length or not words:
            break
        words = words[:-1]
    if truncate:
        require(len(enc["input_ids"]) <= tokenizer.model_max_length,
                f"{len(labels)} subject clause(s) alone exceed the text encoder's limit: give fewer subjects")
        enc = Encoded(text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
    else:
        enc = tokenize_checked(tokenizer, text)
    placeholders, entities = [], []
    for (ls, le), (ps, pe) in zip(label_spans, ph_spans):
        ph = token_positions(enc, (ps, pe))
        require(len(ph) == 1, f"the tokenizer splits the placeholder {PLACEHOLDER!r} into {len(ph)} tokens: "
                              "this base cannot use Subject-Diffusion's fusion text encoder")
        placeholders.append(ph[0])
        entities.append(token_positions(enc, (ls, le))[-1])
    return FusionPrompt(" ".join(words), list(labels), text, enc.input_ids, placeholders, entities)


def parse_marked_prompt(tokenizer, prompt: str, n_subjects: int) -> FusionPrompt:
    """The compose syntax shared with FastComposer: 'a star <img> and a circle <img> on a gray
    background' → caption 'a star and a circle on a gray background', labels star, circle."""
    require(PLACEHOLDER not in prompt, f"the prompt may not contain {PLACEHOLDER!r}: Subject-Diffusion uses it "
                                       "as the subjects' placeholder; mark subjects with <img>")
    parsed = parse_subject_prompt(tokenizer, prompt, n_subjects)  # checks the markers, one line per mistake
    labels = [piece.split()[-1] for piece in MARKER_PATTERN.split(prompt)[:-1]]
    for label in labels:
        require(bool(find_word_spans(parsed.text, label)), f"subject word {label!r} is not a word: put {label!r} "
                                                           "before its marker as a plain noun")
    return fusion_prompt(tokenizer, parsed.text, labels)


class ClsMLP(MLP):
    """The subject image's pooled embedding → a token input embedding (LN, GELU; paper §3.3)."""

    def __init__(self, image_dim: int, token_dim: int):
        super().__init__(image_dim, token_dim)
        self.image_dim, self.token_dim = image_dim, token_dim


@contextmanager
def placeholder_embeddings(text_encoder, where: list[tuple[int, int]], embeds: torch.Tensor):
    """While open, the text encoder's token-embedding output at each (sample, token)
    of `where` is the matching row of `embeds` ``n d``; every other position keeps
    its own embedding."""
    if not where:
        yield
        return
    b = torch.tensor([w[0] for w in where])
    t = torch.tensor([w[1] for w in where])

    def replace(module, args, output):
        return output.index_put((b.to(output.device), t.to(output.device)), embeds.to(output.dtype))

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_fused(text_encoder, tokenizer, prompts: list[FusionPrompt], cls_mlp: ClsMLP | None,
                 pooled: torch.Tensor | None, valid: list[list[bool]] | None = None) -> torch.Tensor:
    """Text states ``batch 77 d`` of the prompts, each placeholder's input embedding
    replaced by cls_mlp(its subject's pooled image embedding); with no MLP (the
    'no CLS' ablation) the placeholders stay plain tokens. `pooled` holds the
    subjects of every prompt in order, ``sum(len(labels)) e``; `valid[i][j]`
    False leaves subject j of prompt i's placeholder plain (a missing image)."""
    device = next(text_encoder.parameters()).device
    ids = torch.stack([p.padded_ids(tokenizer) for p in prompts]).to(device)
    where, rows, k = [], [], 0
    for i, p in enumerate(prompts):
        for j, pos in enumerate(p.placeholders):
            if valid is None or valid[i][j]:
                where.append((i, pos))
                rows.append(k)
            k += 1
    if cls_mlp is None or not where:
        return text_encoder(ids)[0].float()
    require(pooled is not None and len(pooled) == k, f"{k} subject(s) in the prompts but "
                                                     f"{0 if pooled is None else len(pooled)} image embedding(s)")
    embeds = cls_mlp(pooled[rows].float())
    with placeholder_embeddings(text_encoder, where, embeds):
        return text_encoder(ids)[0].float()
