"""Where the builder's images come from, cut into units that become one output shard each.

SOURCE is one of
- a folder of images (searched recursively; `x.txt` / `x.json` beside `x.jpg` are its caption and metadata,
  as img2dataset's "files" output has them),
- a list file (one image path per line, relative to the list's folder; `#` starts a comment),
- WebDataset / img2dataset tar shards: one `.tar`, a folder of them, or a glob such as `laion/{0000..0099}.tar`
  written as `laion/0*.tar`. Members sharing a key (`000123.jpg`, `000123.txt`, `000123.json`) are one sample.

A tar is one unit (its output shard has the same name); images from a folder or list are cut into units of
`shard_size`. Re-running skips units whose shard is finished, so unit names must not depend on anything but
the source.
"""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError, require
from .records import Item
from .tars import TAR_DAMAGE, tar_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass(frozen=True)
class Unit:
    name: str  # the output shard's name, without .tar
    tar: str | None = None  # a WebDataset tar, or
    files: tuple[str, ...] = ()  # image paths

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Unit":
        d = json.loads(text)
        return Unit(d["name"], d["tar"], tuple(d["files"]))


def list_units(source: str | Path, shard_size: int = 1000) -> list[Unit]:
    require(shard_size >= 1, f"--shard-size must be at least 1, got {shard_size}")
    text = str(source)
    if any(c in text for c in "*?["):
        tars = sorted(glob.glob(text))
        require(bool(tars), f"SOURCE {text} matches no file: check the pattern")
        require(all(t.endswith(".tar") for t in tars), f"SOURCE {text} matches files that are not .tar: "
                "a pattern must name WebDataset tars only")
        return _tar_units(tars)
    path = Path(source)
    require(path.exists(), f"SOURCE {path} does not exist: pass an image folder, a list file or .tar shards")
    if path.is_file() and path.suffix == ".tar":
        return _tar_units([str(path)])
    if path.is_file():
        return _chunk(_read_list(path), shard_size)
    tars = sorted(str(p) for p in path.glob("*.tar"))
    images = sorted(str(p) for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.is_file())
    if tars and not images:
        return _tar_units(tars)
    require(bool(images), f"SOURCE folder {path} holds no images ({', '.join(IMAGE_EXTS)}) and no .tar shards: "
            "point it at your images")
    return _chunk(images, shard_size)


def _tar_units(tars: list[str]) -> list[Unit]:
    names = [Path(t).stem for t in tars]
    require(len(set(names)) == len(names), "two SOURCE tars share a name, so their output shards would too: "
            "pass one folder of uniquely named tars")
    return [Unit(n, tar=t) for n, t in zip(names, tars)]


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"SOURCE {path} is not a text list of image paths: pass a folder, a list file or .tar shards") from e
    files = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            p = Path(line)
            files.append(str(p if p.is_absolute() else path.parent / p))
    require(bool(files), f"list file {path} names no images: one path per line")
    return files


def _chunk(files: list[str], shard_size: int) -> list[Unit]:
    return [Unit(f"{i // shard_size:06d}", files=tuple(files[i:i + shard_size]))
            for i in range(0, len(files), shard_size)]


def _key(text: str) -> str:
    return text.replace("/", "_").replace(".", "_")


# ---------------------------------------------------------------- reading a unit

def read_unit(unit: Unit) -> Iterator[Item]:
    """Items in source order. Unreadable entries become items with `reject` set, never an exception."""
    yield from (_read_tar(unit) if unit.tar else _read_files(unit))


def _read_files(unit: Unit) -> Iterator[Item]:
    seen: set[str] = set()
    for f in unit.files:
        p = Path(f)
        key = _key(p.with_suffix("").as_posix().lstrip("/"))[-120:]
        while key in seen:
            key += "_"
        seen.add(key)
        item = Item(key=key, unit=unit.name, source=f, data=b"", ext=p.suffix.lower().lstrip(".") or "jpg")
        try:
            item.data = p.read_bytes()
        except OSError as e:
            item.reject = f"read: {type(e).__name__}: {e}"
            yield item
            continue
        txt, meta = p.with_suffix(".txt"), p.with_suffix(".json")
        try:
            if txt.is_file():
                item.source_caption = txt.read_text(errors="replace").strip()
            if meta.is_file():
                item.meta = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            item.reject = f"read: sidecar of {f}: {type(e).__name__}: {e}"
        yield item


def _read_tar(unit: Unit) -> Iterator[Item]:
    try:
        with open(unit.tar, "rb") as f:
            for key, members in tar_samples(f):
                yield _sample(unit, key, members)
    except (*TAR_DAMAGE, OSError) as e:
        yield Item(key=_key(f"{unit.name}_broken"), unit=unit.name, source=unit.tar, data=b"",
                   reject=f"read: tar {unit.tar} is truncated or corrupt after this point: {type(e).__name__}: {e}")


def _sample(unit: Unit, key: str, members: dict[str, bytes]) -> Item:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    item = Item(key=_key(key), unit=unit.name, source=f"{unit.tar}:{key}", data=members.get(ext, b"") if ext else b"",
                ext=ext or "jpg")
    if ext is None:
        item.reject = f"read: sample has no image ({', '.join(IMAGE_EXTS)}); members: {', '.join(sorted(members))}"
        return item
    if "txt" in members:
        item.source_caption = members["txt"].decode("utf-8", "replace").strip()
    if "json" in members:
        try:
            item.meta = json.loads(members["json"])
        except ValueError as e:
            item.reject = f"read: {key}.json is not JSON: {e}"
    return item
