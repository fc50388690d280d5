"""Streaming a subject dataset's shards for training: a fixed order per epoch, any position, any share.

Sources (`open_stream`):
- a folder `multiconcept dataset build` wrote, or the same folder served over http(s): its shards.json
  gives each shard's sample count and bytes, and the shards are ROOT/shards/NAME.tar;
- any WebDataset with the builder's keys (KEY.jpg|png, KEY.json holding "caption" and "entities" with a
  "mask" each, KEY.mask_I.png): a .tar path or URL, a glob, or a range ('shards/{00000..00099}.tar'). With
  no shards.json to say how many samples each holds, they are counted at the start (local tars from their
  headers; URLs by reading them once).

Order. Epoch e visits the shards in a permutation seeded by (seed, e) and each shard's samples in one seeded
by (seed, e, shard), so an epoch is a fixed order for a seed. Sample i of a run (counted over epochs) is
sample i mod N of epoch i div N: every sample comes once per epoch, the last partial batch of an epoch is
completed from the next, and the stream never ends, so no process runs out before another.

Sharing. A reader asks for the positions it needs, in increasing order. A shard none of them falls in is
never opened; a shard one falls in is read whole (its samples are shuffled, so any of them may be asked
for) but only the samples asked for are decoded. Every process and loader worker thus reads the bytes of
the shards its positions touch and decodes only its own samples. Memory: one shard per reader.

Damage. A sample that does not load (a corrupt image, JSON or mask, a missing member, a tar cut short) is
replaced by the next sample of its shard's order that does, so a batch keeps its size and every process
stays in step; each replacement is reported with the sample it gave.

Why this reader and not the webdataset package (1.0.2): its pipeline splits whole shards between nodes and
workers, which cannot hand micro-batch m·P + r to rank r nor restart at a sample; reading HTTP through a
`curl` subprocess with 30 retries turns a wrong URL into a minute's wait and an exit status; and what is
left, grouping a tar's members into samples, is `tars.tar_samples` here, shared with the builder.
"""

from __future__ import annotations

import bisect
import glob
import http.client
import itertools
import json
import random
import re
import tarfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError, gist, require
from .shards import SHARD_TABLE, SHARD_TABLE_FORMAT
from .tars import TAR_DAMAGE, split_member, tar_samples

TIMEOUT = 60  # seconds without a byte before an HTTP read fails
RETRIES = 3  # an HTTP shard that fails mid-read is read again from its start


def is_url(where: str) -> bool:
    return where.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Shard:
    where: str  # a local path or an http(s) URL
    name: str
    samples: int
    bytes: int | None = None  # None: not known (a WebDataset without shards.json)


@dataclass
class Sample:
    key: str  # SHARD/KEY
    value: object  # what `load` made of it
    epoch: int
    index: int  # in the epoch's order
    skipped: list[str] = field(default_factory=list)  # damaged samples this one replaces: "SHARD/KEY: reason"


Load = Callable[[str, str, dict], object]  # (shard name, key, {extension: bytes}) -> a sample, or raises


class ShardStream:
    """The samples of `shards`, epoch after epoch, each epoch in its fixed order for `seed` (module doc)."""

    def __init__(self, shards: list[Shard], name: str, seed: int = 0):
        self.shards, self.name, self.seed = shards, name, seed
        self.total = sum(s.samples for s in shards)
        require(self.total > 0, f"{name} holds no sample: build the dataset first")
        self._epoch: tuple[int, list[int], list[int]] | None = None  # (epoch, shard order, first index of each)
        self._open: _OpenShard | None = None

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order

    def position(self, i: int) -> tuple[int, int]:
        """(epoch, index in its order) of sample i of the run."""
        return divmod(i, self.total)

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(epoch, index, shard, rank in that shard's order) of sample i of the run."""
        epoch, index = self.position(i)
        if self._epoch is None or self._epoch[0] != epoch:
            order = self.shard_order(epoch)
            self._epoch = (epoch, order, list(itertools.accumulate((self.shards[j].samples for j in order), initial=0)))
        _, order, starts = self._epoch
        slot = bisect.bisect_right(starts, index) - 1
        return epoch, index, order[slot], index - starts[slot]

    def read(self, i: int, load: Load) -> Sample:
        """Sample i of the run, loaded. Reading increasing positions opens each shard once."""
        epoch, index, shard, rank = self.locate(i)
        if self._open is None or self._open.ident != (epoch, shard):
            self._open = None  # one shard in memory at a time
            self._open = _OpenShard(self.shards[shard], (epoch, shard), f"samples/{self.seed}/{epoch}/{shard}")
        key, value, skipped = self._open.take(rank, load)
        return Sample(key, value, epoch, index, skipped)


class _OpenShard:
    """One shard's samples, undecoded, in its order for one epoch."""

    def __init__(self, shard: Shard, ident: tuple[int, int], seed: str):
        self.shard, self.ident = shard, ident
        self.samples, self.problem = read_whole(shard)
        self.order = list(range(shard.samples))
        random.Random(seed).shuffle(self.order)

    def take(self, rank: int, load: Load) -> tuple[str, object, list[str]]:
        name, skipped = self.shard.name, []
        for t in range(len(self.order)):
            j = self.order[(rank + t) % len(self.order)]
            if j >= len(self.samples):
                skipped.append(f"{name}/#{j}: {self.problem or 'missing: the shard holds fewer samples than counted'}")
                continue
            key, parts = self.samples[j]
            try:
                return f"{name}/{key}", load(name, key, parts), skipped
            except Exception as e:  # whatever a damaged member makes a decoder raise
                skipped.append(f"{name}/{key}: {type(e).__name__}: {gist(e, 100)}")
        raise UserError(f"no sample of shard {self.shard.where} can be read ({skipped[0]}): rebuild or remove the shard")


# ---------------------------------------------------------------- reading bytes


def open_bytes(where: str):
    """A shard's (or shards.json's) bytes as a stream; a missing file or URL is a UserError."""
    try:
        if is_url(where):
            return urllib.request.urlopen(where, timeout=TIMEOUT)
        return open(where, "rb")
    except urllib.error.HTTPError as e:
        raise UserError(f"{where} answered HTTP {e.code} {e.reason}: check the URL") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot open {where} ({gist(e)}): check the path or URL") from e


def read_whole(shard: Shard) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    """Every sample of a shard, undecoded, and why the tar ended early (None: it did not)."""
    for attempt in itertools.count():
        samples: list[tuple[str, dict[str, bytes]]] = []
        try:
            with open_bytes(shard.where) as f:
                try:
                    samples.extend(tar_samples(f))
                except TAR_DAMAGE as e:
                    return samples, f"the tar is cut or corrupt after {len(samples)} samples ({type(e).__name__})"
            return samples, None
        except (OSError, http.client.HTTPException) as e:  # the connection broke (or the disk failed) mid-read
            if not is_url(shard.where) or attempt + 1 >= RETRIES:
                raise UserError(f"cannot read shard {shard.where} ({gist(e)}): check the path or URL") from e
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _remote_size(url: str) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT) as r:
            size = r.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        raise UserError(f"shard {url} answered HTTP {e.code} {e.reason}: check that it was uploaded") from e
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot reach shard {url} ({gist(e)}): check the URL") from e
    return int(size) if size is not None else None


def _size(where: str) -> int | None:
    if is_url(where):
        return _remote_size(where)
    try:
        return Path(where).stat().st_size
    except OSError:
        return None


# ---------------------------------------------------------------- opening a source

RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_range(spec: str) -> list[str]:
    """'a/{000..002}.tar' -> a/000.tar, a/001.tar, a/002.tar (each number as wide as the first bound)."""
    m = RANGE.search(spec)
    if not m:
        return [spec]
    lo, hi = m.group(1), m.group(2)
    return [s for n in range(int(lo), int(hi) + 1)
            for s in expand_range(f"{spec[:m.start()]}{str(n).zfill(len(lo))}{spec[m.end():]}")]


def is_tar_spec(spec: str) -> bool:
    return bool(re.search(r"\.(tar|tar\.gz|tgz)$", spec))


def open_stream(spec: str, seed: int = 0) -> ShardStream:
    """A built dataset's folder or URL, or WebDataset tars (module doc); checked before anything trains:
    the shards exist at the sizes shards.json gives, and the first sample carries subject masks."""
    stream = _open_tars(spec, seed) if is_tar_spec(spec) else _open_built(spec.rstrip("/"), seed)
    _check_masks(stream.shards[0])
    return stream


def _open_built(root: str, seed: int) -> ShardStream:
    where = f"{root}/{SHARD_TABLE}"
    if not is_url(root):
        folder = Path(root)
        require(folder.is_dir(), f"--data {root} does not exist: pass a folder `multiconcept dataset build` wrote")
        if not (folder / SHARD_TABLE).is_file():
            require(not (folder / "shards").is_dir(),
                    f"{root} has shards/ but no {SHARD_TABLE} (the build has not finished, or predates it): re-run "
                    "the same `multiconcept dataset build` command, which keeps finished shards and writes it")
            raise UserError(f"{root} is not a built dataset (no {SHARD_TABLE}): pass a folder `multiconcept dataset "
                            "build` wrote, WebDataset tars ('DIR/*.tar'), or a folder with subjects.jsonl")
    with open_bytes(where) as f:
        raw = f.read()
    try:
        table = json.loads(raw)
        require(table.get("format") == SHARD_TABLE_FORMAT, "")
        shards = [Shard(f"{root}/shards/{r['name']}.tar", r["name"], int(r["samples"]), int(r["bytes"]))
                  for r in table["shards"]]
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"{where} is not a shard table this version reads: re-run the same `multiconcept dataset "
                        "build` command to rewrite it") from e
    require(bool(shards), f"{root} holds no finished shard: re-run `multiconcept dataset build` to finish it")
    with ThreadPoolExecutor(8) as pool:  # one stat or HEAD per shard: nothing is read
        sizes = list(pool.map(_size, [s.where for s in shards]))
    for s, size in zip(shards, sizes):
        require(size is not None, f"shard {s.where} is missing ({SHARD_TABLE} lists it): restore it, or delete "
                                  f"parts/{s.name}.json and re-run the same `multiconcept dataset build`")
        require(size == s.bytes, f"shard {s.where} is {size} bytes but {SHARD_TABLE} says {s.bytes}: it changed after "
                                 f"the build; restore it, or delete parts/{s.name}.json and re-run the same build")
    return ShardStream(shards, root, seed)


def _open_tars(spec: str, seed: int) -> ShardStream:
    found = []
    for s in expand_range(spec):
        found += [s] if is_url(s) else sorted(glob.glob(s))
    require(bool(found), f"--data {spec} matches no tar: check the path or pattern")
    # no shards.json: each tar's samples are counted before training (local: headers only)
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(_count, found))
    shards = [Shard(w, Path(w).name.split(".")[0], n) for w, n in zip(found, counts)]
    return ShardStream(shards, spec, seed)


def _count(where: str) -> int:
    if is_url(where):
        samples, _ = read_whole(Shard(where, where, 0))
        return len(samples)
    try:
        with tarfile.open(where, "r:*") as tf:
            keys = {named[0] for m in tf if m.isfile() and (named := split_member(m.name))}
    except (*TAR_DAMAGE, OSError) as e:
        raise UserError(f"{where} is not a readable tar ({gist(e)}): pass WebDataset .tar shards") from e
    return len(keys)


def _check_masks(shard: Shard) -> None:
    """Training needs a mask per subject: the first sample of the first shard must carry them."""
    with open_bytes(shard.where) as f:
        try:
            key, parts = next(tar_samples(f), (None, {}))
        except TAR_DAMAGE as e:
            raise UserError(f"{shard.where} is not a readable tar ({gist(e)}): pass WebDataset .tar shards") from e
    try:
        entities = json.loads(parts["json"])["entities"]
        ok = bool(entities) and all(isinstance(e.get("mask"), (str, dict)) for e in entities)
    except (KeyError, ValueError, TypeError, AttributeError):
        ok = False
    require(ok, f"{shard.where} has no subject masks (its first sample, {key}, carries no \"entities\" with a "
                "\"mask\" each): train on a dataset `multiconcept dataset build` wrote, or add KEY.json entities "
                "with masks")
