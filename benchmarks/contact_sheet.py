"""A labelled contact sheet of evidence images, for a human look (docs/evidence.md's sheets).

    .venv/bin/python benchmarks/contact_sheet.py docs/evidence/fastcomposer-pair.png \\
        --row "references=runs/fc/refs/robot_d.png,runs/fc/refs/robot_e.png" \\
        --row "no L_loc=runs/fc/images/plateau-noloc-a0.7/robot_d+robot_e_*.png" --per-row 8

Each --row is LABEL=PATTERNS: comma-separated files or glob patterns, taken in sorted order, at most --per-row
of them; every image is shown at 64 px (ToyWorld's size) times --scale. LABEL=overlapping:PATTERNS keeps only
the images where ToyWorld's checker reads one subject standing in front of another (an overlap).
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
from PIL import Image


def row_images(patterns: str, limit: int) -> list[np.ndarray]:
    from multiconcept.toyworld import analyse

    only_overlaps = patterns.startswith("overlapping:")
    paths = [p for pattern in patterns.removeprefix("overlapping:").split(",") for p in sorted(glob.glob(pattern.strip()))]
    images = []
    for p in paths:
        image = np.asarray(Image.open(p).convert("RGB").resize((64, 64)))
        if not only_overlaps or any(r.occluded for r in analyse(image).subjects):
            images.append(image)
        if len(images) == limit:
            break
    if not images:
        raise SystemExit(f"no image matches {patterns!r}")
    return images


def main():
    from multiconcept.workflows.toyworld_build.quality import contact_sheet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--row", action="append", required=True, help="LABEL=PATTERNS")
    ap.add_argument("--per-row", type=int, default=8)
    ap.add_argument("--scale", type=int, default=2)
    args = ap.parse_args()
    rows = {}
    for row in args.row:
        label, sep, patterns = row.partition("=")
        if not sep:
            raise SystemExit(f"--row {row!r}: write LABEL=PATTERNS")
        rows[label] = row_images(patterns, args.per_row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {contact_sheet(args.out, rows, args.scale)}")


if __name__ == "__main__":
    main()
