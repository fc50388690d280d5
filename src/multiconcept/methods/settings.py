"""Settings dataclasses that check themselves: one source for a setting's default, help and allowed values.

A field is declared with `hp(default, help, ...)` (peft's habit: the help text the CLI shows lives beside the
default) and may name the values it allows. A dataclass deriving from `Settings` checks every field when it is
made, so a config is valid wherever it came from: the CLI's `--param key=value` strings (`apply_overrides`),
the Python API's typed values (`apply_values`), or code that builds one directly. Both appliers go through
`dataclasses.replace`, which builds a new config and so checks it again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, field, fields, replace

from ..errors import UserError, require
from ..models.compiled import COMPILE_MODES

PROBABILITY = dict(at_least=0.0, at_most=1.0)
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def hp(default, help: str, *, choices: tuple | None = None, items: type | None = None,
       at_least=None, above=None, at_most=None, below=None):
    """A setting: its default, the help text `multiconcept methods` shows, and the values it allows
    (`items`: the type of a tuple's members, when the default is empty)."""
    bounds = {k: v for k, v in dict(at_least=at_least, above=above, at_most=at_most, below=below).items() if v is not None}
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds, "items": items})


def compile_setting():
    """The `compile` setting every trained model shares (models/compiled.py says what compiles and what stays eager)."""
    return hp("off", "on: torch.compile the denoiser's repeated blocks, forward and backward (attention capture and "
                     "Infusion's residuals stay eager); off: eager. Part of the checkpoint's settings",
              choices=COMPILE_MODES)


def _item_type(f):
    return f.metadata.get("items") or (type(f.default[0]) if isinstance(f.default, tuple) and f.default else None)


def config_help(cfg_cls) -> list[tuple[str, object, str]]:
    return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cfg_cls)]


def config_dict(cfg) -> dict:
    """JSON-ready: tuples become lists."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


_BOUND_WORDS = {"at_least": ("at least", lambda v, b: v >= b), "above": ("greater than", lambda v, b: v > b),
                "at_most": ("at most", lambda v, b: v <= b), "below": ("less than", lambda v, b: v < b)}


def _typed(name: str, value, default):
    """`value` in the type of the setting's default: an int for a float and a list for a tuple are fine."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    require(ok, f"setting {name}={value!r} must be of type {kind.__name__}: fix the value")
    return value


def _rule(cls, name: str, key: str):
    """A field's rule, inherited: a subclass that only changes a default and its help keeps its parent's bounds."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get(key):
            return f.metadata[key]
    return None


class Settings:
    """Mixin for a settings dataclass: every field is checked when the dataclass is made."""

    def __post_init__(self):
        for f in fields(self):
            v = _typed(f.name, getattr(self, f.name), f.default)
            object.__setattr__(self, f.name, v)
            item = _item_type(f)
            if isinstance(v, tuple) and item is not None:
                require(all(isinstance(x, item) and not isinstance(x, bool) for x in v),
                        f"setting {f.name}={v!r} must hold values of type {item.__name__}: fix the value")
            choices = _rule(type(self), f.name, "choices")
            if choices is not None and v not in choices:
                raise UserError(f"{f.name} must be {', '.join(map(str, choices[:-1]))} or {choices[-1]}, got {v!r}: "
                                f"fix --param {f.name}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"setting {f.name} must be a finite number, got {v}: fix --param {f.name} (or its option)")
            bounds = _rule(type(self), f.name, "bounds") or {}
            if bounds == PROBABILITY and not 0 <= v <= 1:
                raise UserError(f"setting {f.name} is a probability, got {v}: give a value from 0 to 1")
            for kind, bound in bounds.items():
                words, holds = _BOUND_WORDS[kind]
                if not holds(v, bound):
                    raise UserError(f"setting {f.name} must be {words} {bound}, got {v}: "
                                    f"fix --param {f.name} (or its option)")


def apply_values(cfg, values: dict[str, object]):
    """A copy of `cfg` with typed values (the Python API's), checked."""
    known = {f.name for f in fields(cfg)}
    for key in values:
        require(key in known, f"{type(cfg).__name__} has no setting {key!r}: see `multiconcept methods` for the list")
    return replace(cfg, **values)


def _parse(key: str, text: str, f, current):
    try:
        if isinstance(current, bool):
            if text.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(text)
            return text.lower() in TRUE_WORDS
        if isinstance(current, tuple):  # members separated by "|", as in "8|4"
            return tuple((_item_type(f) or str)(x.strip()) for x in text.split("|") if x.strip())
        return type(current)(text)
    except ValueError as e:
        form = " (members separated by '|', e.g. 8|4)" if isinstance(current, tuple) else ""
        raise UserError(f"setting {key}={text!r} is not a valid {type(current).__name__}{form}: fix the value") from e


def apply_overrides(cfg, overrides: dict[str, str]):
    """A copy of `cfg` with `--param key=value` strings parsed by the type of each setting's default, checked."""
    known = {f.name: f for f in fields(cfg)}
    values = {}
    for k, text in overrides.items():
        key = k.replace("-", "_")
        require(key in known, f"{type(cfg).__name__} has no setting {k!r}: see `multiconcept methods` for the list")
        values[key] = _parse(k, text, known[key], getattr(cfg, key))
    return replace(cfg, **values)
