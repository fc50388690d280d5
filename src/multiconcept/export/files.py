"""Writing an export folder: every file staged first, moved in last, nothing left behind on error."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import require


def token_name(token: str) -> str:
    """The file name stem a token exports to: '<cat1>' -> 'cat1'. In A1111, ComfyUI and kohya's
    scripts an embedding's file name is the word the prompt types, and '<' '>' are not allowed in
    Windows file names. A token comes from a bundle's tensor names: no path separator or NUL may
    reach the file name."""
    name = token.strip("<>")
    for c in "/\\\0":
        name = name.replace(c, "_")
    return name


def token_file(token: str) -> str:
    return token_name(token) + ".safetensors"


def check_out_dir(out: Path) -> None:
    """Refuse an output that is an existing file (cheap: call it before loading any model)."""
    require(not out.exists() or out.is_dir(),
            f"--out {out} is an existing file: export writes a folder; pass a new or existing folder")


def write_all(out: Path, files: dict) -> list[Path]:
    """Call each write(path) for {relative name: write} into a staging folder beside (or inside) `out`,
    then move the files in; names may hold one level of sub-folder ("loras/x.safetensors")."""
    created = out if not out.exists() else None  # the top folder this call creates, removed on error
    while created is not None and not created.parent.exists():
        created = created.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out if out.is_dir() else out.parent))
        try:
            for name, write in files.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                write(staging / name)
            if out.is_dir():
                for name in files:
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / name, out / name)
                shutil.rmtree(staging)
            else:
                os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except BaseException:
        if created is not None and created.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise
    return [out / name for name in files]
