"""Evaluation protocols as editable prompt files (the papers' prompt lists).

A protocol file is plain text: ``# comments``, a ``[both]`` section whose
prompts hold every concept ({a}, {b}, {c}, ... = concept 1, 2, 3 as
"<token> class word") and an ``[each]`` section whose prompts hold one
concept ({x}), used once per concept. Files come per world: NAME.txt for
photo-world bases (Stable Diffusion), NAME.toyworld.txt in the vocabulary
of the ToyWorld base; `load_protocol` picks by the source's world, and any
other file can be passed by path.

Shipped: two-concept (DisenDiff: 10 both + 10 each), dreambench and
dreambench-live (DreamBench's 25 templates, CC-BY-4.0, attributed in the
files), multi-subject (pairs; image alignment per subject).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, require

PROTOCOL_DIR = Path(__file__).parent
WORLDS = ("photo", "toyworld")
SECTIONS = ("both", "each")
COMBINED = "combined"  # the kind of a prompt that holds every concept


@dataclass(frozen=True)
class Protocol:
    name: str
    path: Path
    both: tuple[str, ...]
    each: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "file": self.path.name, "both": list(self.both), "each": list(self.each)}


@dataclass(frozen=True)
class ProtocolPrompt:
    index: int  # position in the expanded list: names the prompt's image folder
    kind: str  # COMBINED, or the token of the single concept it holds
    text: str
    template: str


def available() -> list[str]:
    return sorted({p.name.split(".")[0] for p in PROTOCOL_DIR.glob("*.txt")})


def protocol_file(name: str, world: str = "photo") -> Path:
    require(world in WORLDS, f"unknown world {world!r}: use one of {', '.join(WORLDS)}")
    path = Path(name)
    if path.suffix == ".txt" or path.is_file():
        require(path.is_file(), f"protocol file {name} does not exist: check the path, or use one of {', '.join(available())}")
        return path
    require(name in available(), f"unknown protocol {name!r}: use one of {', '.join(available())}, or a .txt file")
    if world == "toyworld":
        flavoured = PROTOCOL_DIR / f"{name}.toyworld.txt"
        require(flavoured.is_file(), f"protocol {name!r} has no ToyWorld flavour ({flavoured.name}): "
                                     f"use one of {', '.join(p.name.split('.')[0] for p in PROTOCOL_DIR.glob('*.toyworld.txt'))}")
        return flavoured
    return PROTOCOL_DIR / f"{name}.txt"


def parse_protocol(text: str, where: str = "protocol") -> tuple[tuple[str, ...], tuple[str, ...]]:
    sections: dict[str, list[str]] = {s: [] for s in SECTIONS}
    current = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            require(m.group(1) in SECTIONS, f"{where} line {n}: unknown section [{m.group(1)}]: use [both] or [each]")
            current = m.group(1)
            continue
        require(current is not None, f"{where} line {n}: a prompt before any section: start with [both] or [each]")
        fields = {f for _, f, _, _ in string.Formatter().parse(line) if f is not None}
        allowed = {"x"} if current == "each" else set("abcdefgh")
        require(fields <= allowed and bool(fields),
                f"{where} line {n}: {line!r} uses placeholders {sorted(fields) or 'none'}: "
                + ("an [each] prompt needs {x}" if current == "each" else "a [both] prompt uses {a}, {b}, ..."))
        sections[current].append(line)
    require(any(sections.values()), f"{where} holds no prompts: add a [both] or [each] section")
    return tuple(sections["both"]), tuple(sections["each"])


def load_protocol(name: str, world: str = "photo") -> Protocol:
    path = protocol_file(name, world)
    both, each = parse_protocol(path.read_text(encoding="utf-8"), str(path))
    return Protocol(path.name.split(".")[0], path, both, each)


def expand(protocol: Protocol, concepts: list[tuple[str, str]], phrase=None) -> list[ProtocolPrompt]:
    """Concrete prompts for concepts [(token, class word), ...]: [both] once, [each] per concept.
    `phrase(token, class_word)` names a concept in a prompt (a method's `prompt_phrase`)."""
    from ..prompts import Concept

    phrase = phrase or (lambda tok, cls: Concept(tok, cls).phrase)
    phrases = {chr(ord("a") + i): phrase(tok, cls) for i, (tok, cls) in enumerate(concepts)}
    out: list[ProtocolPrompt] = []
    require(not protocol.both or len(concepts) >= 2,
            f"protocol {protocol.name} has [both] prompts but the source has one concept: "
            f"use a single-subject protocol (dreambench)")
    for t in protocol.both:
        used = {f for _, f, _, _ in string.Formatter().parse(t) if f}
        missing = sorted(used - set(phrases))
        if missing:
            raise UserError(f"protocol {protocol.name} prompt {t!r} needs {len(phrases) + len(missing)} concepts, "
                            f"the source has {len(concepts)}: give a source with more concepts or edit the prompt")
        out.append(ProtocolPrompt(len(out), COMBINED, t.format(**phrases), t))
    for tok, cls in concepts:
        for t in protocol.each:
            out.append(ProtocolPrompt(len(out), tok, t.format(x=phrase(tok, cls)), t))
    return out
