"""evaluate: generated PNGs (+ their metadata) and references → metric JSON.

What a source holds is in `sources`, how each image is scored in `scoring`;
this is the workflow that ties them and, when asked, the overfitting report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..bundle import atomic_write
from ..errors import require
from ..metrics import check_scale
from .generate import read_png_metadata
from .scoring import DETECTOR_THRESHOLD, Generation, list_generations, load_scorers, models_block, score_generations
from .sources import build_references


def evaluate(gen_dir: str | Path, reference: Sequence[str], reference_masks: Sequence[str] = (), *,
             clip: str | None = None, dino: str | None = None, scale: str = "raw", text_prefix: str = "",
             out: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
             overfitting: bool = False, bundles: Sequence[str] = (), base: str | None = None, seed: int = 0,
             detector: str | None = None, detector_threshold: float = DETECTOR_THRESHOLD) -> dict:
    check_scale(scale)
    gens = list_generations(gen_dir)
    tokens = sorted({t for g in gens for t in g.tokens}, key=lambda t: min(g.tokens.index(t) for g in gens if t in g.tokens))
    refs = build_references(reference, reference_masks, tokens)
    scorers = load_scorers(clip, dino, device, batch_size, detector, detector_threshold)
    result = {"gen_dir": str(gen_dir), "references": {"whole": len(refs.whole),
                                                       "concept": {t: len(v) for t, v in refs.concept.items()},
                                                       "sources": refs.sources},
              "models": models_block(scorers, scale, text_prefix),
              **score_generations(gens, refs, scorers, scale, text_prefix, root=Path(gen_dir))}
    if overfitting:
        from .overfitting import overfitting_report

        paths = resolve_bundles(gen_dir, gens, bundles)
        bases = {read_png_metadata(g.path).get("base") for g in gens}
        base = base or (bases.pop() if len(bases) == 1 else None)
        require(base is not None, f"the generations come from several bases {sorted(map(str, bases))}: pass --base")
        # beside the results, never inside gen_dir (its PNGs would be read as generations next time)
        where = Path(out).with_name(Path(out).stem + ".overfitting") if out else \
            Path(gen_dir).with_name(Path(gen_dir).name + ".overfitting")
        result["overfitting"] = overfitting_report(base, [str(p) for p in paths], where, clip, seed)
    if out is not None:
        text = json.dumps(result, indent=1, default=_json_default)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return result


def resolve_bundles(gen_dir: str | Path, gens: list[Generation], given: Sequence[str]) -> list[Path]:
    """--bundle paths, or the bundle files the metadata names, found beside the generations."""
    if given:
        for b in given:
            require(Path(b).is_file(), f"bundle {b} does not exist: check the path")
        return [Path(b) for b in given]
    names = sorted({n for g in gens for n in read_png_metadata(g.path).get("bundles", [])})
    require(bool(names), "the generations name no bundle: pass --bundle PATH for the overfitting metrics")
    found = []
    for n in names:
        hits = [d / n for d in (Path(gen_dir), Path(gen_dir).parent) if (d / n).is_file()]
        require(bool(hits), f"bundle {n} (named in the PNG metadata) is not beside {gen_dir}: pass --bundle PATH")
        found.append(hits[0])
    return found


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
