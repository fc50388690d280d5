"""Stage 1: a byte-level BPE tokenizer in CLIP's format, on the world's captions and common English."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .common import Log, replace_dir
from .settings import BuildConfig
from .world import WORLD

COMMON_WORDS = """
a an the of on in at to with and or for from by as is are be this that it its one two three
photo picture image painting drawing sketch render rendering illustration close up view shot
good nice cool small big large tiny huge little old new bright dark light red orange yellow green
cyan blue purple pink white black gray grey beige brown gold silver colorful shiny wooden metal
beach jungle snow city mountain forest desert river lake ocean sea water sky cloud clouds sun moon
street road cobblestone floor table chair bed room kitchen house home garden park field grass tree
trees flower flowers fabric carpet wall window door background foreground top bottom left right
center middle side front back near next behind under over above below inside outside floating
wearing hat santa chef outfit police firefighter rainbow scarf sunglasses purple red pink sitting
standing lying dog cat bear toy teddy backpack bowl can candle clock boot sneaker vase cup glass
robot duck monster teapot berry cartoon style pixel art oil watercolor pencil graphic design logo
sticker pattern shape shapes object objects thing things thing person people man woman boy girl
friend together alone pair group many several some another other same different both each every
made paper plastic stone brick sand snowy rainy sunny night day morning evening autumn spring
winter summer eiffel tower bridge building buildings car boat train bike plane sidewalk shop
store market street sign fence pool bath towel book books shelf lamp plant pot box basket bag
""".split()

PROMPT_TEMPLATES = [
    "a photo of a {} on the beach", "a {} in the jungle", "a {} in the snow", "a {} on a cobblestone street",
    "a {} with a city in the background", "a {} with a mountain in the background", "a {} on top of pink fabric",
    "a {} on top of a wooden floor", "a {} floating on top of water", "a red {}", "a shiny {}", "a {} and a {}",
    "a photo of a {} and a {}", "a close up photo of a {}", "a painting of a {}", "a {} wearing a santa hat",
]


# ---------------------------------------------------------------- helpers


def train_tokenizer(cfg: BuildConfig, folder: Path, log: Log):
    """Byte-level BPE with CLIP's normaliser, pre-tokeniser and `</w>` word ends,
    so transformers' CLIPTokenizer loads it from vocab.json + merges.txt."""
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import CLIPTokenizer

    corpus = WORLD.corpus(np.random.default_rng([cfg.seed, 1]))
    corpus += [" ".join(COMMON_WORDS)] * 3 + [t.replace("{}", n) for t in PROMPT_TEMPLATES for n in WORLD.nouns]

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=cfg.bpe_vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    # CLIP's layout: bytes, bytes at a word end, merged tokens, then the two specials.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=cfg.max_length)
    tok.save_pretrained(tmp)
    replace_dir(tmp, folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    probe = WORLD.probe
    log(f"tokenizer: {len(tok)} tokens; {probe!r} -> {tok.tokenize(probe)}")
    return tok


# ---------------------------------------------------------------- 2. VAE
