"""Concepts, concept tokens and where their words sit in a tokenised prompt.

A concept is a new token (``<cat1>``) bound to a class word (``cat``) that
the base already knows. Prompts name a concept as "<cat1> cat". Positions
are found from the fast tokenizer's character offsets, so multi-token class
words ("teddy bear", or words the vocabulary splits) and several concepts
per prompt are handled without assuming "the next token".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import UserError, require

TOKEN_PATTERN = re.compile(r"^<[^<>\s|]+>$")  # no "|": CLIP's specials are <|...|>
# a concept token inside a prompt; CLIP's own specials look like <|endoftext|> and are not concepts
PROMPT_TOKEN = re.compile(r"<[^<>\s|]+>")


def concept_tokens_in(prompt: str) -> list[str]:
    """The <name> tokens a prompt uses, in order, each once."""
    return list(dict.fromkeys(PROMPT_TOKEN.findall(prompt)))


@dataclass
class Concept:
    token: str  # the new word, e.g. "<cat1>"
    class_word: str  # what it is, e.g. "cat" or "teddy bear"
    initializer: str = ""  # words whose embedding starts the token; "" = the class word

    def __post_init__(self):
        require(
            bool(TOKEN_PATTERN.match(self.token)),
            f"concept token {self.token!r} must look like <name> (angle brackets, no spaces or |), e.g. <cat1>",
        )
        require(bool(self.class_word.strip()), f"concept {self.token} needs a class word, e.g. {self.token}=cat")
        require(is_text(self.token + self.class_word),
                f"concept {self.token!r}={self.class_word!r} holds bytes that are not UTF-8 text: retype it")

    @property
    def phrase(self) -> str:
        """How a prompt names the concept: '<cat1> cat', the token beside the word the base knows."""
        return f"{self.token} {self.class_word}"


def parse_concept(spec: str) -> Concept:
    """'<cat1>=cat' or '<cat1>=teddy bear'."""
    if "=" not in spec:
        raise UserError(f"concept {spec!r} must be TOKEN=CLASS, e.g. '<cat1>=cat'")
    token, cls = spec.split("=", 1)
    return Concept(token.strip(), cls.strip())


def find_word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of `word` (a phrase allowed) as a whole word, case-insensitive."""
    pat = re.compile(r"(?<![\w<])" + r"\s+".join(map(re.escape, word.split())) + r"(?![\w>])", re.IGNORECASE)
    return [m.span() for m in pat.finditer(prompt)]


@dataclass
class Encoded:
    """A tokenised prompt with the positions of the words we care about."""

    prompt: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    positions: dict[str, list[int]] = field(default_factory=dict)


def is_text(s: str) -> bool:
    """False when `s` holds a lone surrogate: how Python decodes argv bytes that are not UTF-8 (the
    shell passed raw Latin-1, say). Tokenizers refuse such strings with a TypeError."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def tokenize_checked(tokenizer, prompt: str) -> Encoded:
    require(is_text(prompt), f"prompt {prompt!r} holds bytes that are not UTF-8 text: retype it, or save it as UTF-8")
    enc = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    n, limit = len(enc["input_ids"]), tokenizer.model_max_length
    require(
        n <= limit,
        f"prompt is {n} tokens, longer than the text encoder's limit of {limit}: shorten it ({prompt[:40]!r}...)",
    )
    return Encoded(prompt, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])


def token_positions(enc: Encoded, span: tuple[int, int]) -> list[int]:
    """Token indices whose character offsets overlap `span` (BOS/EOS have empty offsets)."""
    a, b = span
    return [i for i, (s, e) in enumerate(enc.offsets) if e > s and s < b and e > a]


def locate_concepts(tokenizer, prompt: str, concepts: list[Concept]) -> Encoded:
    """Positions of each concept token and of its class word in `prompt`.

    ``positions[token]`` holds the new token's index; ``positions[token + '/class']``
    the class word's tokens that follow it (the nearest occurrence after the
    token, else the nearest anywhere). A concept absent from the prompt is
    simply not in ``positions``; a concept present without its class word is
    an error, since every loss and every residual keys on that word.
    """
    enc = tokenize_checked(tokenizer, prompt)
    for c in concepts:
        tok_spans = [(m.start(), m.end()) for m in re.finditer(re.escape(c.token), prompt)]
        if not tok_spans:
            continue
        tok_pos = [p for s in tok_spans for p in token_positions(enc, s)]
        enc.positions[c.token] = tok_pos
        cls_spans = find_word_spans(prompt, c.class_word)
        require(
            bool(cls_spans),
            f"class word {c.class_word!r} of {c.token} is absent from the prompt {prompt!r}: write '{c.token} {c.class_word}'",
        )
        after = [s for s in cls_spans if s[0] >= tok_spans[0][1]]
        span = after[0] if after else cls_spans[0]
        enc.positions[c.token + "/class"] = token_positions(enc, span)
    return enc


def strip_tokens(prompt: str, tokens: list[str]) -> str:
    """The prompt with learned tokens removed and spaces tidied (for CLIP-T)."""
    for t in tokens:
        prompt = prompt.replace(t, " ")
    return re.sub(r"\s+", " ", prompt).strip()


# ---------------------------------------------------------------- new tokens

def add_concept_tokens(tokenizer, text_encoder, concepts: list[Concept]) -> list[int]:
    """Add each concept's token to the vocabulary; its embedding row starts as
    the mean embedding of its initializer words. Returns the new ids."""
    vocab = tokenizer.get_vocab()
    for c in concepts:
        require(
            c.token not in vocab,
            f"token {c.token} is already in the vocabulary: pick another name, e.g. <{c.token.strip('<>')}2>",
        )
    init_rows = []
    emb = text_encoder.get_input_embeddings().weight
    for c in concepts:
        words = c.initializer or c.class_word
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        require(bool(ids), f"initializer {words!r} of {c.token} tokenizes to nothing: give a real word")
        init_rows.append(emb[ids].detach().float().mean(0))
    tokenizer.add_tokens([c.token for c in concepts])
    new_ids = tokenizer.convert_tokens_to_ids([c.token for c in concepts])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i, row in zip(new_ids, init_rows):
            weight[i] = row.to(weight.dtype)
    return list(new_ids)


def set_token_rows(tokenizer, text_encoder, rows: dict[str, torch.Tensor]) -> None:
    """Add tokens with given embedding rows (loading a bundle)."""
    vocab = tokenizer.get_vocab()
    for t in rows:
        require(t not in vocab, f"token {t} is already loaded: two bundles define it; rename one concept or load one bundle")
    tokenizer.add_tokens(list(rows))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for t, row in rows.items():
            require(
                row.shape == weight.shape[1:],
                f"embedding for {t} has size {tuple(row.shape)} but this base's text encoder uses {weight.shape[1]}: "
                "the bundle is for another base",
            )
            weight[tokenizer.convert_tokens_to_ids(t)] = row.to(weight)
