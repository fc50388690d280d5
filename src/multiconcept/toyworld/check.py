"""Read every creature's kind and parts back from pixels, with no learned model in the loop.

Each subject is found by its head: heads are the only pixels in the head palette, and heads never touch
in the world's layouts, overlapping ones included. The head gives the frame (centre and scale); each
part is then read in its own region of that frame:
  body colour     majority of body-palette pixels in the body region
  kind            silhouette of the body region against the three kinds' templates (IoU, small search)
  hat             foreground above the head against the three hats' templates
  marking         body pixels nearer an achromatic marking colour than the body colour, against the three
                  markings' templates; its colour by majority
When two subjects overlap, the one whose body colour fills the overlap is in front, and the other's
regions are cut where the front one covers them, so it is read from its visible pixels only; kinds are
left-right symmetric, so an occluded subject's kind is read from its free half.

A subject is only read where one is drawn: its head must be head-sized and round, mostly of one head
colour, its kind readable, and its surroundings (its frame outside its silhouette and its neighbours')
mostly background. Without these, noise of a random or untrained model reads as dozens of "subjects",
and matching readings to the subject asked for would find its parts among them by chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from .render import (
    BACKGROUNDS,
    BODY_COLOURS,
    HATS,
    HEAD_CENTRE,
    HEAD_COLOURS,
    HEAD_RADIUS,
    IMAGE_SIZE,
    KINDS,
    MARKING_COLOURS,
    MARKINGS,
    PARTS,
    template,
)

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour
MIN_HEAD_AREA = 10  # pixels left after an opening; at scale 0.6 a head has ~40
# Gates measured on 150 world-pool renders and 100 blurred ones (sigma 1.2, noise std 8) against 4x4-block
# colour noise: head width >= 8 px on renders (1st percentile; noise: 4), area / disc of its width 0.70-1.32
# (noise 0.39-3.8), height / width 0.64-1.21; head colour share >= 0.73 (noise <= 0.47); background share
# around the subject >= 0.72 (noise <= 0.42).
MIN_HEAD_WIDTH = 6.5  # a head at scale 0.5, the smallest the checker reads
HEAD_FILL = (0.6, 1.45)
HEAD_ASPECT = (0.55, 1.35)
MIN_HEAD_SHARE = 0.6
MIN_CLEAR = 0.5
OFFSETS = [(dx, dy, ds) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for ds in (0.95, 1.0, 1.05)]

_NAMES = [*BODY_COLOURS, *HEAD_COLOURS]
_RGB = np.asarray([*BODY_COLOURS.values(), *HEAD_COLOURS.values()], np.float32)
_IS_HEAD = np.asarray([n in HEAD_COLOURS for n in _NAMES])
_MARK_RGB = np.asarray(list(MARKING_COLOURS.values()), np.float32)


@dataclass
class Reading:
    """One subject as read from an image; a part is None where it could not be read."""
    cx: float
    cy: float
    scale: float
    kind: str | None
    parts: dict[str, str | None]
    scores: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    occluded: bool = False  # read from its visible pixels only: another subject stands in front of it
    mask: np.ndarray | None = field(default=None, repr=False)  # its pixels as far as colours tell (_subject_mask)


@dataclass
class Analysis:
    background: str
    subjects: list[Reading]  # left to right


def _rgb(image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the checker expects a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got shape {rgb.shape}")
    return rgb


def _labels(rgb: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per pixel: index into _NAMES of the nearest saturated palette colour, or -1 (background or neutral)."""
    d = ((rgb[..., None, :] - _RGB) ** 2).sum(-1)
    nearest = d.argmin(-1)
    neutral = ((rgb - rgb.mean(-1, keepdims=True)) ** 2).sum(-1) < 30 ** 2  # markings, backgrounds
    far = np.sqrt(((rgb - bg) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    return np.where(far & ~neutral, nearest, -1)


def _heads(labels: np.ndarray) -> list[np.ndarray]:
    """Head masks: compact blobs of head-palette pixels (an opening removes blended outlines)."""
    head = _IS_HEAD[np.maximum(labels, 0)] & (labels >= 0)
    head = ndimage.binary_opening(head, structure=np.ones((3, 3)))
    comp, n = ndimage.label(head)
    masks = []
    for i in range(1, n + 1):
        m = comp == i
        if m.sum() < MIN_HEAD_AREA:
            continue
        ys, xs = np.nonzero(m)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        if w > 1.6 * h:  # two heads run together: split at the thinnest column between them
            cols = m.sum(0)
            mid = xs.min() + w // 4 + int(np.argmin(cols[xs.min() + w // 4: xs.max() + 1 - w // 4]))
            left, right = m.copy(), m.copy()
            left[:, mid:] = False
            right[:, :mid + 1] = False
            masks += [x for x in (left, right) if x.sum() >= MIN_HEAD_AREA]
        else:
            masks.append(m)
    return [m for m in masks if _head_shaped(m)]


def _head_shaped(m: np.ndarray) -> bool:
    """Round and at least a smallest head wide (a body may cut a head's bottom, never its width)."""
    ys, xs = np.nonzero(m)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = m.sum() / (np.pi * (w / 2) ** 2)
    return w >= MIN_HEAD_WIDTH and HEAD_FILL[0] <= fill <= HEAD_FILL[1] and HEAD_ASPECT[0] <= h / w <= HEAD_ASPECT[1]


def _frame_box(r: Reading, pad: float) -> np.ndarray:
    """The reading's frame (x in [-12, 12], y in [-22, 21] at its scale), padded by `pad` pixels."""
    s, x, y = r.scale, np.arange(IMAGE_SIZE)[None, :], np.arange(IMAGE_SIZE)[:, None]
    return ((x >= r.cx - 12 * s - pad) & (x < r.cx + 12 * s + pad) & (y >= r.cy - 22 * s - pad)
            & (y < r.cy + 21 * s + pad))


def _silhouette(r: Reading) -> np.ndarray:
    """Where the reading's kind, hat and head stand, with a margin of 2 px."""
    out = template(kind=r.kind, cx=r.cx, cy=r.cy, scale=r.scale)
    if r.parts.get("hat"):
        out |= template(hat=r.parts["hat"], cx=r.cx, cy=r.cy, scale=r.scale)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    out |= (xx - r.cx) ** 2 + (yy - r.cy - HEAD_CENTRE[1] * r.scale) ** 2 <= ((HEAD_RADIUS + 2) * r.scale) ** 2
    return ndimage.binary_dilation(out, iterations=2)


def _clear(r: Reading, silhouettes: list[np.ndarray], fg: np.ndarray) -> float:
    """Background share of the reading's frame outside every reading's silhouette: ~1 around a drawn
    subject, ~0 in noise (0 when nothing of the frame is left to judge by)."""
    ring = _frame_box(r, 3)
    for s in silhouettes:
        ring &= ~s
    return float(1 - fg[ring].mean()) if ring.sum() > 10 else 0.0


def _majority(values: np.ndarray, names) -> tuple[str | None, dict[str, float]]:
    if len(values) == 0:
        return None, {}
    idx, counts = np.unique(values, return_counts=True)
    shares = {names[i]: c / len(values) for i, c in zip(idx, counts)}
    return max(shares, key=shares.get), shares


def _best(mask: np.ndarray, region: np.ndarray, templates: dict[str, list[np.ndarray]]) -> tuple[str | None, dict]:
    """The template (over its frame offsets) with the highest IoU with `mask`, both inside `region`."""
    if not (mask & region).any():
        return None, {}
    scores = {}
    for name, variants in templates.items():
        scores[name] = max(((t & mask & region).sum() / max(1, ((t | mask) & region).sum())) for t in variants)
    return max(scores, key=scores.get), {k: float(v) for k, v in scores.items()}


def _columns(lo: float, hi: float) -> np.ndarray:
    x = np.arange(IMAGE_SIZE)[None, :]
    return np.broadcast_to((x >= lo) & (x < hi), (IMAGE_SIZE, IMAGE_SIZE))


def _read(rgb, labels, fg, r: Reading, visible: np.ndarray, kind_side: np.ndarray) -> None:
    """Fill in r's parts from the pixels in `visible` (everything but a front subject's body)."""
    s, cx, cy = r.scale, r.cx, r.cy
    y = np.arange(IMAGE_SIZE)[:, None]
    body_rows = np.broadcast_to((y >= cy - 1 * s) & (y < cy + 22 * s), (IMAGE_SIZE, IMAGE_SIZE))
    body_region = body_rows & _columns(cx - 13 * s, cx + 13 * s) & visible
    body_labels = labels[body_region]
    body_colour, shares = _majority(body_labels[(body_labels >= 0) & ~_IS_HEAD[np.maximum(body_labels, 0)]], _NAMES)
    r.parts["body_colour"] = body_colour
    r.scores["body_colour"] = shares
    frames = [(cx + dx, cy + dy, s * ds) for dx, dy, ds in OFFSETS]
    kinds = {k: [template(kind=k, cx=x, cy=yy, scale=ss) for x, yy, ss in frames] for k in KINDS}
    r.kind, r.scores["kind"] = _best(fg, body_region & kind_side, kinds)
    hat_rows = np.broadcast_to((y >= cy - 24 * s) & (y < cy - 10 * s), (IMAGE_SIZE, IMAGE_SIZE))
    hat_region = hat_rows & _columns(cx - 10 * s, cx + 10 * s) & visible
    not_head = ~(_IS_HEAD[np.maximum(labels, 0)] & (labels >= 0))
    hats = {h: [template(hat=h, cx=x, cy=yy, scale=ss) for x, yy, ss in frames] for h in HATS}
    r.parts["hat"], r.scores["hat"] = _best(fg & not_head, hat_region, hats)
    if body_colour is None or r.kind is None:
        r.parts |= {"marking": None, "marking_colour": None}
        return
    # marking: body pixels nearer an achromatic marking colour than the body colour, inside the body
    body_t = ndimage.binary_erosion(template(kind=r.kind, cx=cx, cy=cy, scale=s)) & visible
    d_mark = ((rgb[..., None, :] - _MARK_RGB) ** 2).sum(-1)
    d_body = ((rgb - np.asarray(BODY_COLOURS[body_colour], np.float32)) ** 2).sum(-1)
    mark = (d_mark.min(-1) < d_body) & body_t
    markings = {m: [template(marking=m, cx=x, cy=yy, scale=ss) for x, yy, ss in frames] for m in MARKINGS}
    r.parts["marking"], r.scores["marking"] = _best(mark, body_t, markings)
    colour, shares = _majority(d_mark[mark].argmin(-1), list(MARKING_COLOURS))
    r.parts["marking_colour"], r.scores["marking_colour"] = colour, shares


def analyse(image) -> Analysis:
    """Background and every subject found, left to right, with its kind and parts."""
    rgb = _rgb(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda n: np.sum((np.asarray(BACKGROUNDS[n]) - bg_rgb) ** 2))
    labels = _labels(rgb, bg_rgb)
    fg = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    readings = []
    for m in _heads(labels):
        ys, xs = np.nonzero(m)
        # A head's width and top are never covered (a body may cut its bottom, a hat is drawn behind it).
        width = xs.max() - xs.min() + 1
        scale = float(np.clip(width / (2 * HEAD_RADIUS + 1), 0.5, 1.25))
        hx = (xs.min() + xs.max() + 1) / 2
        top = ys.min()
        head_colour, shares = _majority(labels[m], _NAMES)
        if shares[head_colour] < MIN_HEAD_SHARE:
            continue
        readings.append(Reading(hx, top + (HEAD_RADIUS - HEAD_CENTRE[1] + 0.5) * scale, scale, None,
                                {"head_colour": head_colour},
                                {"head_colour": shares}))
    readings.sort(key=lambda r: r.cx)
    everything = np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)
    for i, r in enumerate(readings):
        neighbours = [o for o in readings if o is not r and abs(o.cx - r.cx) < 24 * max(o.scale, r.scale)]
        if not neighbours:
            _read(rgb, labels, fg, r, everything, everything)
            continue
        o = min(neighbours, key=lambda o: abs(o.cx - r.cx))
        mid = (r.cx + o.cx) / 2
        own_side = _columns(-1, mid) if r.cx < o.cx else _columns(mid, IMAGE_SIZE + 1)
        free_half = _columns(-1, r.cx) if r.cx < o.cx else _columns(r.cx, IMAGE_SIZE + 1)
        _read(rgb, labels, fg, r, own_side, free_half)
    # who is in front: the subject whose body colour fills the strip where two bodies meet
    for a, b in zip(readings, readings[1:]):
        if abs(b.cx - a.cx) >= 24 * max(a.scale, b.scale) or not (a.parts["body_colour"] and b.parts["body_colour"]):
            continue
        mid = (a.cx + b.cx) / 2
        y = np.arange(IMAGE_SIZE)[:, None]
        strip = _columns(mid - 3, mid + 3) & np.broadcast_to((y >= a.cy) & (y < a.cy + 15 * a.scale),
                                                               (IMAGE_SIZE, IMAGE_SIZE))
        votes = labels[strip]
        na = (votes == _NAMES.index(a.parts["body_colour"])).sum()
        nb = (votes == _NAMES.index(b.parts["body_colour"])).sum()
        front, back = (a, b) if na > nb else (b, a)
        edge = front.cx - 12 * front.scale if front.cx > back.cx else front.cx + 12 * front.scale
        back_visible = _columns(-1, edge) if back.cx < front.cx else _columns(edge, IMAGE_SIZE + 1)
        free_half = _columns(-1, back.cx) if back.cx < front.cx else _columns(back.cx, IMAGE_SIZE + 1)
        head_colour = back.parts["head_colour"]
        back.parts, back.occluded = {"head_colour": head_colour}, True
        _read(rgb, labels, fg, back, back_visible, free_half)
        front_side = _columns(-1, IMAGE_SIZE + 1)
        front.parts = {"head_colour": front.parts["head_colour"]}
        _read(rgb, labels, fg, front, front_side, _columns(-1, front.cx) if front.cx < back.cx
              else _columns(front.cx, IMAGE_SIZE + 1))
    for r in readings:
        r.parts = {p: r.parts.get(p) for p in PARTS}
        r.mask = _subject_mask(labels, fg, r)
    silhouettes = [_silhouette(r) for r in readings if r.kind]
    for r in readings:
        r.scores["clear"] = _clear(r, silhouettes, fg) if r.kind else 0.0
    return Analysis(background, [r for r in readings if r.kind and r.scores["clear"] >= MIN_CLEAR])


def _subject_mask(labels: np.ndarray, fg: np.ndarray, r: Reading) -> np.ndarray:
    """The pixels of r's frame in its body or head colour (the hat is the body's), and the holes they enclose
    (markings may be as dark or light as the background): an overlapping neighbour's pixels stay out unless
    it wears the same colours. A subject behind another loses the part of its marking the front one cuts
    open. With no body colour read, the frame's foreground."""
    y = np.arange(IMAGE_SIZE)[:, None]
    frame = np.broadcast_to((y >= r.cy - 24 * r.scale) & (y < r.cy + 22 * r.scale), (IMAGE_SIZE, IMAGE_SIZE)) \
        & _columns(r.cx - 13 * r.scale, r.cx + 13 * r.scale)
    if r.parts["body_colour"] is None:
        return ndimage.binary_fill_holes(fg & frame)
    own = labels == _NAMES.index(r.parts["body_colour"])
    if r.parts["head_colour"] is not None:
        own |= labels == _NAMES.index(r.parts["head_colour"])
    return ndimage.binary_fill_holes(own & frame)
