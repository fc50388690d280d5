"""WebDataset tars as samples: members sharing a key (`000123.jpg`, `000123.json`, ...) are one sample.

The key is a member's path up to the first dot of its file name, the extension what follows (WebDataset's
rule, so `000123.mask_0.png` is extension `mask_0.png` of key `000123`). Read as a stream, so a tar on a
pipe or an HTTP response works as one on disk.
"""

from __future__ import annotations

import tarfile
import zlib
from typing import BinaryIO, Iterator

# what a cut or corrupt tar raises while it is read
TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error)


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name; None for a name with no extension or a hidden file."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_samples(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) in the tar's order. A cut or corrupt tar yields what came before the damage
    (the sample it cut, as far as it got) and then raises one of TAR_DAMAGE."""
    key, parts = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for m in tf:
                named = split_member(m.name) if m.isfile() else None
                if named is None:
                    continue
                k, ext = named
                if k != key and parts:
                    yield key, parts
                    parts = {}
                key = k
                parts[ext] = tf.extractfile(m).read()
    except TAR_DAMAGE:
        if parts:
            yield key, parts
        raise
    if parts:
        yield key, parts
