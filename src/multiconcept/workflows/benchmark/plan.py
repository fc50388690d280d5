"""From sources and settings to cells (source × method) and the jobs of each stage."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ...bundle import atomic_write
from ...errors import UserError, require
from ...methods import get_method
from ...protocols import expand, load_protocol
from ..sources import Source, load_source
from .jobs import Cell, GenerateJob, LearnJob, ScoreJob
from .settings import BenchmarkSettings, digest, file_digest, seed_runs

TOYWORLD_SOURCE = "toyworld:"


def resolve_source(spec: str | Path, out: Path) -> Source:
    """A source folder, or 'toyworld:CONCEPT_A+CONCEPT_B[@SEED]': that ToyWorld
    scene rendered into OUT/sources/ (the same scene for the same seed)."""
    spec = str(spec)
    if not spec.startswith(TOYWORLD_SOURCE):
        return load_source(spec)
    from ...toyworld import PERSONAL_CONCEPTS

    body, _, seed = spec[len(TOYWORLD_SOURCE):].partition("@")
    names = body.split("+")
    require(len(names) == 2 and all(n in PERSONAL_CONCEPTS for n in names) and names[0] != names[1],
            f"source {spec!r} must be toyworld:A+B[@SEED] with two different concepts from "
            f"{', '.join(sorted(PERSONAL_CONCEPTS))}")
    kinds = [PERSONAL_CONCEPTS[n].creature.kind for n in names]
    other = next(n for n, c in PERSONAL_CONCEPTS.items() if c.creature.kind != kinds[0])
    require(kinds[0] != kinds[1], f"source {spec!r} holds two {kinds[0]}s: a two-concept source needs two kinds "
                                  f"(e.g. {names[0]}+{other})")
    try:
        seed_value = int(seed or 0)
    except ValueError as e:
        raise UserError(f"source {spec!r}: the seed after @ must be an integer") from e
    folder = out / "sources" / f"{names[0]}+{names[1]}@{seed_value}"
    if not (folder / "concepts.json").is_file():
        from ..sources import write_toyworld_source

        write_toyworld_source(names[0], names[1], folder, seed=seed_value)
    return load_source(folder)


def plan_cells(sources: list[Source], settings: BenchmarkSettings, out: Path, base_fingerprint: str) -> list[tuple[Cell, dict]]:
    names = [s.name for s in sources]
    require(len(set(names)) == len(names), f"two sources share a folder name ({names}): give them distinct names")
    cells = []
    for src in sources:
        protocol = load_protocol(settings.protocol, src.world)
        for method in settings.methods:
            # how a prompt names a concept is the method's call ("<c1> star"; Infusion: "star")
            phrase = get_method(method).prompt_phrase
            prompts = tuple(expand(protocol, [(c.token, c.class_word) for c in src.concepts], phrase))
            folder = out / "cells" / src.name / method
            cell = Cell(src, method, folder, prompts, protocol.path.name)
            learn_part = {"source": file_digest([src.image, *(c.mask for c in src.concepts)]),
                          "concepts": src.to_dict(), "method": method, "base": settings.base,
                          "fingerprint": base_fingerprint, "steps": settings.steps, "params": settings.params,
                          "train_seed": settings.train_seed}
            gen_part = {"prompts": [p.text for p in prompts], "seeds": settings.seeds,
                        "sampling": asdict(settings.sampling), "learn": digest(learn_part)}
            score_part = {"generate": digest(gen_part), "clip": settings.clip, "dino": settings.dino,
                          "scale": settings.scale, "text_prefix": settings.text_prefix}
            digests = {"learn": digest(learn_part), "generate": digest(gen_part), "score": digest(score_part)}
            record = folder / "cell.json"
            if record.is_file():
                old = json.loads(record.read_text())
                if old.get("digests", {}).get("generate") != digests["generate"]:
                    raise UserError(f"{folder} holds a run with other settings (source, method, base, steps, prompts, "
                                    f"seeds or sampler): use another --out, or delete that folder to redo it")
            else:
                text = json.dumps({"source": src.name, "method": method, "digests": digests,
                                   "learn": learn_part, "generate": gen_part}, indent=1, default=str)
                atomic_write(record, lambda tmp, text=text: Path(tmp).write_text(text))
            cells.append((cell, digests))
    return cells


def stage_jobs(cells: list[tuple[Cell, dict]], settings: BenchmarkSettings) -> dict[str, list]:
    learn = [LearnJob(c, settings) for c, _ in cells]
    generate = [GenerateJob(c, p, run, i == 0, settings)
                for c, _ in cells for p in c.prompts for i, run in enumerate(seed_runs(settings.seeds, settings.batch_size))]
    score = [ScoreJob(c, settings, d["score"]) for c, d in cells]
    return {"learn": learn, "generate": generate, "score": score}
