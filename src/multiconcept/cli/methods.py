"""`multiconcept methods`: the methods, or one method's settings."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.table import Table

from .options import out


def methods(name: Optional[str] = typer.Argument(None, help="a method name for its settings")):
    """List methods, or one method's settings with defaults and help."""
    from ..methods import METHODS, get_method
    from ..methods.settings import config_help
    from ..models import ARCHITECTURES

    if name is None:
        for m in sorted(METHODS):
            doc = METHODS[m].__module__ and sys.modules[METHODS[m].__module__].__doc__ or ""
            out.print(f"{m}: {doc.strip().splitlines()[0]}")
        return
    cls = get_method(name)
    t = Table("setting (--param KEY=VALUE)", "default", "help", title=name)
    for k, default, help_ in config_help(cls.Config):
        t.add_row(k, str(default), help_)
    out.print(t)
    out.print(f"runs on: {', '.join(ARCHITECTURES.values())} (--base; a bundle records its base's architecture)",
              markup=False)
