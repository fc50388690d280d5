"""One image on its way through the builder, its entities, and their encodings.

An `Item` is what every stage reads and extends: the source's bytes, then a
caption, nouns, entities (label, box, score, mask). `pack` / `unpack` carry a
batch of items between Ray processes as plain bytes (a JSON header and raw
buffers: nothing is pickled). Masks are stored in shards as PNG or COCO RLE.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class Entity:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    score: float  # the detector's confidence (Grounding DINO's logit after sigmoid)
    mask: np.ndarray | None = field(default=None, repr=False)  # bool (H, W) on the source image
    mask_score: float | None = None  # the segmenter's predicted IoU

    @property
    def box_area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass
class Item:
    key: str  # unique within its shard; no dots (WebDataset splits names at the first one)
    unit: str  # the output shard it belongs to
    source: str  # where it came from, for rejects.jsonl
    data: bytes = field(repr=False)  # the encoded image exactly as read
    ext: str = "jpg"
    source_caption: str | None = None  # the source's .txt (alt text)
    meta: dict = field(default_factory=dict)  # the source's .json
    caption: str | None = None
    nouns: list[str] = field(default_factory=list)
    entities: list[Entity] = field(default_factory=list)
    size: tuple[int, int] | None = None  # width, height once decoded
    reject: str | None = None  # why it could not be processed (unreadable, a stage failed)
    dropped_by: str | None = None  # the image-level filter that dropped it
    tally: dict[str, list[int]] = field(default_factory=dict)  # filter -> [images or entities in, dropped]
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> this item's share of the stage's time
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.reject is None and self.dropped_by is None

    def image(self) -> Image.Image:
        """The decoded RGB image (decoded once per process)."""
        if self._image is None:
            self._image = decode_image(self.data)
            self.size = self._image.size
        return self._image


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            # transparent pixels become white, as data.load_image does for user images
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return im.convert("RGB")


# ---------------------------------------------------------------- masks in shards

def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def mask_from_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) > 127


def mask_rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE ({"size": [h, w], "counts": str}), as pycocotools writes it."""
    from pycocotools import mask as coco

    rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_from_rle(rle: dict) -> np.ndarray:
    from pycocotools import mask as coco

    return coco.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


# ---------------------------------------------------------------- batches between processes

def pack(items: list[Item]) -> bytes:
    """A batch as bytes: u32 header length, JSON header, then each item's image and packed masks."""
    blobs: list[bytes] = []
    header = []
    for it in items:
        d = {k: getattr(it, k) for k in ("key", "unit", "source", "ext", "source_caption", "meta", "caption",
                                         "nouns", "size", "reject", "dropped_by", "tally", "seconds")}
        d["data"] = len(it.data)
        blobs.append(it.data)
        ents = []
        for e in it.entities:
            ed = {"label": e.label, "box": list(e.box), "score": e.score, "mask_score": e.mask_score, "mask": None}
            if e.mask is not None:
                bits = np.packbits(e.mask, axis=None).tobytes()
                ed["mask"] = [list(e.mask.shape), len(bits)]
                blobs.append(bits)
            ents.append(ed)
        d["entities"] = ents
        header.append(d)
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def unpack(payload: bytes) -> list[Item]:
    (n,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + n])
    pos = 4 + n
    items = []
    for d in header:
        size = d.pop("data")
        data = bytes(payload[pos:pos + size])
        pos += size
        ents = []
        for ed in d.pop("entities"):
            mask = None
            if ed["mask"] is not None:
                shape, nbytes = ed["mask"]
                bits = np.frombuffer(payload, np.uint8, nbytes, pos)
                pos += nbytes
                mask = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
            ents.append(Entity(ed["label"], tuple(ed["box"]), ed["score"], mask, ed["mask_score"]))
        size_wh = tuple(d.pop("size")) if d.get("size") else None
        d.pop("size", None)
        items.append(Item(data=data, entities=ents, size=size_wh, **d))
    return items
