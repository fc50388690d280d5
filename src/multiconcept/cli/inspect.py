"""`multiconcept inspect`: a bundle's header, integrity and tensors."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .options import out


def inspect(bundle: Path = typer.Argument(..., help="a bundle file"),
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Show a bundle's header and tensors (shapes, bytes)."""
    from ..bundle import describe
    from ..models import ARCHITECTURES

    d = describe(bundle)
    if as_json:
        print(json.dumps(d, indent=1))
        return
    h = d["header"]
    out.print(f"[bold]{bundle}[/bold]  method={h['method']}  format={h['format_version']}")
    out.print(f"tokens: {', '.join(f'{t} ({c})' for t, c in zip(h['tokens'], h['class_words']))}")
    arch = h.get("architecture") or ""
    arch = f"  architecture {arch} ({ARCHITECTURES.get(arch, 'unknown')})" if arch else ""
    weights = ", ".join(f"{g} {v}" for g, v in sorted(h.get("base_weights", {}).items()))
    out.print(f"base: {h['base_name']}  fingerprint {h['base_fingerprint']}{arch}"
              + (f"  weights {weights}" if weights else ""), highlight=False, markup=False)
    out.print("integrity: " + ("verified (content sha256 matches)" if d["integrity"] == "verified"
                               else "unchecked (written before bundles carried a digest)"))
    out.print("hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(h["hyperparameters"].items())))
    if h.get("extra"):
        out.print("extra: " + json.dumps(h["extra"]))
    t = Table("tensor", "shape", "dtype", "bytes")
    for r in d["tensors"][:40]:
        t.add_row(r["name"], "x".join(map(str, r["shape"])), r["dtype"], f"{r['bytes']:,}")
    if len(d["tensors"]) > 40:
        t.add_row(f"... {len(d['tensors']) - 40} more", "", "", "")
    out.print(t)
    out.print(f"tensor bytes: {d['tensor_bytes']:,} ({d['tensor_bytes'] / 1024:.1f} KiB); file bytes: {d['file_bytes']:,}")
