"""benchmark: methods × protocol × source images → results.json + report.html.

For every (source, method) *cell*: learn the source's concepts with the
method, generate the protocol's prompts with fixed seeds, score them
(workflows.evaluate). Work is split into jobs — learn one cell, draw one
batch of seeds for one prompt, score one cell — that an executor runs: in
this process by default, or as Ray tasks (`--ray`) on a local Ray or the
cluster RAY_ADDRESS names. A job's output goes to disk atomically as it
finishes, and a job whose output is already there is not run again, so a
killed benchmark resumes where it stopped; results.json is rebuilt from the
cells' files at the end. Every job fixes its seeds and torch's thread count,
so the numbers are the same on a re-run and under either executor.

Layout of OUT::

    results.json  report.html  run.json (timings of the last run)
    cells/<source>/<method>/cell.json         settings digest of the cell
                            bundle.safetensors
                            images/pNN/<seed>.png  (+ attention/ for the first seed)
                            scores.json

With Ray on several machines, OUT and the sources must be on a filesystem
every node sees (NFS or similar), and multiconcept installed on each node.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..bundle import atomic_write
from ..errors import UserError, require
from ..methods import get_method
from ..protocols import COMBINED, ProtocolPrompt, expand, load_protocol
from .evaluate import (
    References,
    Source,
    list_generations,
    load_scorers,
    load_source,
    models_block,
    score_generations,
)
from .generate import SampleSettings

RESULTS_VERSION = 1


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class BenchmarkSettings:
    methods: tuple[str, ...]
    protocol: str = "two-concept"
    base: str | None = None
    steps: int | None = None  # training steps; None = each method's default
    params: tuple[tuple[str, str], ...] = ()  # --param KEY=VALUE for every method
    train_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # image seeds, the same for every prompt
    sample_steps: int = 50
    guidance: float = 6.0
    scheduler: str = "ddim"
    batch_size: int = 4
    clip: str | None = None
    dino: str | None = None
    scale: str = "raw"
    text_prefix: str = ""
    threads: int = 1  # torch threads per job: fixed, so numbers do not depend on the executor
    device: str = "cpu"

    @property
    def sampling(self) -> SampleSettings:
        return SampleSettings(steps=self.sample_steps, guidance=self.guidance, scheduler=self.scheduler,
                              batch_size=self.batch_size)


# a range is expanded into a list: '0-9999999999' would fill the memory before anything else runs;
# 10,000 images per prompt is far past any protocol (the default draws 4)
MAX_SEEDS = 10_000


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2', '0-7' or a mix: '0-3,10'."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if "-" in part:
                a, b = part.split("-", 1)
                require(int(a) <= int(b), f"--seeds range {part!r} runs backwards: write low-high")
                require(int(b) - int(a) < MAX_SEEDS - len(seeds),
                        f"--seeds {text!r} names more than {MAX_SEEDS} seeds: give fewer (e.g. 0-7)")
                seeds.extend(range(int(a), int(b) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError as e:
        raise UserError(f"--seeds {text!r} is not a list of non-negative integers: write e.g. 0,1,2,3 or 0-7") from e
    require(bool(seeds), f"--seeds {text!r} names no seed: write e.g. 0,1,2,3 or 0-7")
    require(len(set(seeds)) == len(seeds), f"--seeds {text!r} repeats a seed: give each seed once")
    return tuple(seeds)


def seed_runs(seeds: Sequence[int], batch: int) -> list[tuple[int, ...]]:
    """Batches of consecutive seeds (generate draws seed, seed+1, ...); the
    first seed alone, since its batch also records the attention heatmaps."""
    runs: list[list[int]] = [[seeds[0]]]
    current: list[int] = []
    for s in seeds[1:]:
        if current and (s != current[-1] + 1 or len(current) >= batch):
            runs.append(current)
            current = []
        current.append(s)
    if current:
        runs.append(current)
    return [tuple(r) for r in runs]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- jobs

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
        from ..data import Source as TrainingImage
        from ..data import concept_set
        from ..methods import get_method
        from ..methods.base import apply_overrides, apply_values
        from ..prompts import Concept
        from .learn import learn_concepts

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
        from .generate import generate

        loaded = _cached_pipeline(self.settings.base, str(self.cell.bundle), self.settings.device)
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
        scorers = _cached_scorers(s.clip, s.dino, s.device)
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
_PIPELINE: dict = {}
_SCORERS: dict = {}


def _cached_pipeline(base, bundle: str, device: str):
    from .generate import load_with_bundles

    key = (base, bundle, Path(bundle).stat().st_mtime_ns, device)
    if key not in _PIPELINE:
        _PIPELINE.clear()
        _PIPELINE[key] = load_with_bundles(base, [bundle], device=device)
    return _PIPELINE[key]


def _cached_scorers(clip, dino, device):
    key = (clip, dino, device)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = load_scorers(clip, dino, device)
    return _SCORERS[key]


# ---------------------------------------------------------------- executors

class LocalExecutor:
    name = "local"

    def map(self, fn: Callable, jobs: list) -> Iterator[tuple[object, dict]]:
        for job in jobs:
            yield job, fn(job)

    def close(self) -> None:
        pass


class RayExecutor:
    """Jobs as Ray tasks, each asking for `threads` CPUs (so a node runs
    CPUs / threads jobs at once). Connects to the cluster RAY_ADDRESS names,
    else starts a local Ray with `num_cpus` CPUs (default: all)."""

    name = "ray"

    def __init__(self, threads: int, num_cpus: int | None = None):
        import logging
        import os

        try:
            import ray
        except ImportError as e:
            raise UserError("--ray needs Ray: pip install 'multiconcept[ray]' (or drop --ray to run locally)") from e
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            kwargs = {} if address else {"num_cpus": max(num_cpus or os.cpu_count() or 1, threads)}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                         configure_logging=False, **kwargs)
            except (ConnectionError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"could not start or reach Ray (RAY_ADDRESS={address or 'unset'}): {first}: "
                                f"check the address, or unset RAY_ADDRESS for a local Ray") from e
        cpus = ray.cluster_resources().get("CPU", 0)
        require(cpus >= threads, f"the Ray cluster has {cpus:g} CPUs, fewer than --threads {threads}: lower --threads")
        self.threads = threads

    def map(self, fn: Callable, jobs: list) -> Iterator[tuple[object, dict]]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.threads, max_retries=0)(fn)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                for ref in pending:
                    ray.cancel(ref)
                cause = getattr(e, "cause", None)
                if isinstance(cause, UserError):
                    raise UserError(str(cause)) from e
                raise
            yield job, result

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(use_ray: bool, threads: int, ray_cpus: int | None = None):
    return RayExecutor(threads, ray_cpus) if use_ray else LocalExecutor()


# ---------------------------------------------------------------- sources

TOYWORLD_SOURCE = "toyworld:"


def resolve_source(spec: str | Path, out: Path) -> Source:
    """A source folder, or 'toyworld:CONCEPT_A+CONCEPT_B[@SEED]': that ToyWorld
    scene rendered into OUT/sources/ (the same scene for the same seed)."""
    spec = str(spec)
    if not spec.startswith(TOYWORLD_SOURCE):
        return load_source(spec)
    from ..toyworld import PERSONAL_CONCEPTS

    body, _, seed = spec[len(TOYWORLD_SOURCE):].partition("@")
    names = body.split("+")
    require(len(names) == 2 and all(n in PERSONAL_CONCEPTS for n in names) and names[0] != names[1],
            f"source {spec!r} must be toyworld:A+B[@SEED] with two different concepts from "
            f"{', '.join(sorted(PERSONAL_CONCEPTS))}")
    try:
        seed_value = int(seed or 0)
    except ValueError as e:
        raise UserError(f"source {spec!r}: the seed after @ must be an integer") from e
    folder = out / "sources" / f"{names[0]}+{names[1]}@{seed_value}"
    if not (folder / "concepts.json").is_file():
        from .evaluate import write_toyworld_source

        write_toyworld_source(names[0], names[1], folder, seed=seed_value)
    return load_source(folder)


# ---------------------------------------------------------------- planning

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
            learn_part = {"source": _file_digest([src.image, *(c.mask for c in src.concepts)]),
                          "concepts": src.to_dict(), "method": method, "base": settings.base,
                          "fingerprint": base_fingerprint, "steps": settings.steps, "params": settings.params,
                          "train_seed": settings.train_seed}
            gen_part = {"prompts": [p.text for p in prompts], "seeds": settings.seeds,
                        "sampling": asdict(settings.sampling), "learn": _digest(learn_part)}
            score_part = {"generate": _digest(gen_part), "clip": settings.clip, "dino": settings.dino,
                          "scale": settings.scale, "text_prefix": settings.text_prefix}
            digests = {"learn": _digest(learn_part), "generate": _digest(gen_part), "score": _digest(score_part)}
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


# ---------------------------------------------------------------- the workflow

def benchmark(sources: Sequence[str | Path], settings: BenchmarkSettings, out: str | Path, *, use_ray: bool = False,
              ray_cpus: int | None = None, progress: bool = True, report: bool = True) -> dict:
    from ..methods import get_method
    from ..metrics import check_scale
    from ..models import load_base

    out = Path(out)
    require(bool(settings.methods), "no method given: pass --methods textual-inversion,custom-diffusion")
    require(len(set(settings.methods)) == len(settings.methods), f"--methods {','.join(settings.methods)} repeats a method")
    for m in settings.methods:
        get_method(m)
    check_scale(settings.scale)
    require(bool(sources), "no source given: pass --source FOLDER (image.png, one mask per concept, concepts.json)")
    require(settings.threads >= 1, f"--threads must be at least 1, got {settings.threads}")
    loaded_sources = [resolve_source(s, out) for s in sources]
    for src in loaded_sources:
        load_protocol(settings.protocol, src.world)  # unknown protocol: fail before any work
    _cached_scorers(settings.clip, settings.dino, settings.device)  # a missing --clip fails before any work
    fingerprint = load_base(settings.base, device=settings.device).fingerprint
    cells = plan_cells(loaded_sources, settings, out, fingerprint)
    stages = stage_jobs(cells, settings)

    timings: dict[str, dict] = {}
    executor = make_executor(use_ray, settings.threads, ray_cpus)
    try:
        with _progress(progress) as bar:
            for stage, jobs in stages.items():
                todo = [j for j in jobs if not j.done()]
                task = bar.add_task(stage, total=len(jobs), completed=len(jobs) - len(todo)) if bar else None
                t0 = time.perf_counter()
                for _, result in executor.map(run_job, todo):
                    if bar:
                        bar.advance(task)
                timings[stage] = {"jobs": len(jobs), "ran": len(todo), "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        executor.close()
    _PIPELINE.clear()  # the driver keeps no pipeline once the jobs are done
    results = collect_results(cells, settings, fingerprint, loaded_sources)
    _SCORERS.clear()
    text = json.dumps(results, indent=1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    run = {"executor": executor.name, "stages": timings}
    atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))
    if report:
        from .benchmark_report import write_report

        write_report(out, results, cells, run)
    return {**results, "run": run}


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())


# ---------------------------------------------------------------- results

ALIGNMENT_ROWS = (  # (results key, per-image metric, what it is)
    ("image_alignment", "clip_i", "CLIP-I"),
    ("image_alignment_per_subject", "clip_i_subject_mean", "CLIP-I to each subject's crop, mean (multi-subject)"),
    ("text_alignment", "clip_t", "CLIP-T (raw cosine)"),
    ("dino", "dino", "DINO"),
    ("leakage", "leakage_clip_i", "leakage: CLIP-I to the other concept"),
    ("leakage_dino", "leakage_dino", "leakage: DINO to the other concept"),
    ("toyworld_colour_leak", "toyworld_colour_leak", "ToyWorld leakage: share with the other concept's colours"),
    ("toyworld_object_leak", "toyworld_object_leak", "ToyWorld leakage: share with the other concept's object"),
    ("toyworld_present", "toyworld_present", "ToyWorld: share showing the prompted concepts' colours"),
)


def column_names(source: Source) -> dict[str, str]:
    """Per-source kinds → positional columns, so sources with other tokens line up."""
    names = {COMBINED: "combined"}
    names.update({c.token: f"concept {i + 1}" for i, c in enumerate(source.concepts)})
    return names


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def collect_results(cells: list[tuple[Cell, dict]], settings: BenchmarkSettings, fingerprint: str,
                    sources: list[Source]) -> dict:
    from ..metrics import SCALES

    out_cells = []
    for cell, digests in cells:
        scores = json.loads(cell.scores.read_text())
        names = column_names(cell.source)
        summary = {names.get(k, k): v for k, v in scores["summary"].items() if k != "columns"}
        out_cells.append({"source": cell.source.name, "method": cell.method, "protocol_file": cell.protocol_file,
                          "tokens": cell.source.tokens, "summary": summary, "prompts": scores["prompts"]})
    columns = []
    for c in out_cells:
        for k in c["summary"]:
            if k not in columns and k not in ("mean", "none"):
                columns.append(k)
    columns = sorted(columns, key=lambda k: (k != "combined", k)) + ["mean"]
    if settings.scale != "raw":
        rows = ALIGNMENT_ROWS[:3] + ((f"text_alignment_{settings.scale}", f"clip_t_{settings.scale}",
                                      f"CLIP-T, {SCALES[settings.scale][0]}"),) + ALIGNMENT_ROWS[3:]
    else:
        rows = ALIGNMENT_ROWS
    table: dict = {}
    for method in settings.methods:
        mine = [c for c in out_cells if c["method"] == method]
        entry = {}
        for key, metric, label in rows:
            vals = {col: _mean(c["summary"].get(col, {}).get(metric) for c in mine) for col in columns}
            if any(v is not None for v in vals.values()):
                entry[key] = vals
        table[method] = entry
    return {
        "version": RESULTS_VERSION,
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("threads", "device")},
                     "base_fingerprint": fingerprint},
        "models": models_block(_cached_scorers(settings.clip, settings.dino, settings.device), settings.scale,
                               settings.text_prefix),
        "sources": [{"name": s.name, **s.to_dict()} for s in sources],
        "columns": columns,
        "rows": {key: label for key, _, label in rows},
        "table": table,
        "cells": out_cells,
    }
