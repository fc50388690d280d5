"""The benchmark's jobs: learn one cell, draw one batch of seeds for one prompt, score one cell.

Each writes its output atomically and is skipped when the output is already there, so a killed run resumes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ...bundle import atomic_write
from ...errors import require
from ...protocols import ProtocolPrompt
from ..scoring import list_generations, load_scorers, score_generations
from ..sources import References, Source
from .settings import BenchmarkSettings


@dataclass(frozen=True)
class Cell:
    source: Source
    method: str
    folder: Path
    prompts: tuple[ProtocolPrompt, ...]
    protocol_file: str

    @property
    def key(self) -> str:
        return f"{self.source.name}/{self.method}"

    @property
    def bundle(self) -> Path:
        return self.folder / "bundle.safetensors"

    @property
    def scores(self) -> Path:
        return self.folder / "scores.json"

    def image_dir(self, prompt: ProtocolPrompt) -> Path:
        return self.folder / "images" / f"p{prompt.index:02d}"


@dataclass(frozen=True)
class LearnJob:
    cell: Cell
    settings: BenchmarkSettings

    def done(self) -> bool:
        return self.cell.bundle.is_file()

    def run(self) -> dict:
        from ...data import Source as TrainingImage
        from ...data import concept_set
        from ...methods import get_method
        from ...methods.settings import apply_overrides, apply_values
        from ...prompts import Concept
        from ..learn import learn_concepts

        s, src = self.settings, self.cell.source
        cfg = apply_overrides(get_method(self.cell.method).Config(), dict(s.params))  # --param strings, as typed
        cfg = apply_values(cfg, {"seed": s.train_seed} | ({} if s.steps is None else {"steps": s.steps}))
        data = concept_set([Concept(c.token, c.class_word) for c in src.concepts],
                           [TrainingImage(src.image, {c.token: c.mask for c in src.concepts})])
        learn_concepts(self.cell.method, data, self.cell.bundle, config=cfg, base=s.base, resume=True, device=s.device,
                       progress=False)
        return {}


@dataclass(frozen=True)
class GenerateJob:
    cell: Cell
    prompt: ProtocolPrompt
    seeds: tuple[int, ...]
    attention: bool
    settings: BenchmarkSettings

    def done(self) -> bool:
        d = self.cell.image_dir(self.prompt)
        if not all((d / f"{s:06d}.png").is_file() for s in self.seeds):
            return False
        return not self.attention or any((d / "attention").glob(f"{self.seeds[0]:06d}_*.png"))

    def run(self) -> dict:
        from ..generate import generate

        loaded = cached_pipeline(self.settings.base, str(self.cell.bundle), self.settings.device)
        generate(self.prompt.text, loaded, len(self.seeds), self.seeds[0], self.cell.image_dir(self.prompt),
                 self.settings.sampling, attention_maps=self.attention)
        return {}


@dataclass(frozen=True)
class ScoreJob:
    cell: Cell
    settings: BenchmarkSettings
    digest: str

    def done(self) -> bool:
        if not self.cell.scores.is_file():
            return False
        try:
            if json.loads(self.cell.scores.read_text()).get("digest") != self.digest:
                return False
        except json.JSONDecodeError:
            return False
        # an image redrawn after scoring (a resumed run) means the scores are stale
        newest = max((p.stat().st_mtime_ns for p in (self.cell.folder / "images").rglob("*.png")), default=0)
        return self.cell.scores.stat().st_mtime_ns >= newest

    def run(self) -> dict:
        s = self.settings
        scorers = cached_scorers(s.clip, s.dino, s.device)
        gens = list_generations(self.cell.folder / "images")
        expected = len(self.cell.prompts) * len(s.seeds)
        require(len(gens) == expected, f"{self.cell.folder / 'images'} holds {len(gens)} images, the plan {expected}: "
                                       f"delete that folder and run again")
        scores = score_generations(gens, References.from_source(self.cell.source), scorers, s.scale, s.text_prefix,
                                   root=self.cell.folder)
        payload = {"digest": self.digest, "source": self.cell.source.name, "method": self.cell.method, **scores}
        text = json.dumps(payload, indent=1)
        atomic_write(self.cell.scores, lambda tmp: Path(tmp).write_text(text))
        return {}


def run_job(job) -> dict:
    """What an executor runs: one job, with torch's threads fixed (same numbers everywhere)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(job.settings.threads)
    t0 = time.perf_counter()
    try:
        out = job.run()
    finally:
        torch.set_num_threads(previous)
    return {**out, "seconds": time.perf_counter() - t0}


# Loaded models kept per process (a Ray worker runs many jobs): one pipeline, one scorer set.
_PIPELINE: dict = {}  # one of each per process: a worker keeps what its last job loaded
_SCORERS: dict = {}


def clear_caches() -> None:
    _PIPELINE.clear()
    _SCORERS.clear()


def cached_pipeline(base, bundle: str, device: str):
    from ..generate import load_with_bundles

    key = (base, bundle, Path(bundle).stat().st_mtime_ns, device)
    if key not in _PIPELINE:
        _PIPELINE.clear()
        _PIPELINE[key] = load_with_bundles(base, [bundle], device=device)
    return _PIPELINE[key]


def cached_scorers(clip, dino, device):
    key = (clip, dino, device)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = load_scorers(clip, dino, device)
    return _SCORERS[key]
