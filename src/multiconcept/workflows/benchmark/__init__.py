"""benchmark: methods × protocol × source images → results.json + report.html.

For every (source, method) *cell*: learn the source's concepts with the
method, generate the protocol's prompts with fixed seeds, score them
(workflows.scoring). Work is split into jobs — learn one cell, draw one
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

import json
import time
from pathlib import Path
from typing import Sequence

from ...bundle import atomic_write
from ...errors import require
from ...protocols import load_protocol
from .executors import make_executor
from .jobs import cached_scorers, clear_caches, run_job
from .plan import plan_cells, resolve_source, stage_jobs
from .results import collect_results
from .settings import BenchmarkSettings, parse_seeds, seed_runs

__all__ = ["BenchmarkSettings", "benchmark", "parse_seeds", "seed_runs"]


def benchmark(sources: Sequence[str | Path], settings: BenchmarkSettings, out: str | Path, *, use_ray: bool = False,
              ray_cpus: int | None = None, progress: bool = True, report: bool = True) -> dict:
    from ...methods import get_method
    from ...metrics import check_scale
    from ...models import load_base

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
    cached_scorers(settings.clip, settings.dino, settings.device)  # a missing --clip fails before any work
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
    results = collect_results(cells, settings, fingerprint, loaded_sources)
    clear_caches()  # the driver keeps no pipeline or scorer once the results are in
    text = json.dumps(results, indent=1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    run = {"executor": executor.name, "stages": timings}
    atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))
    if report:
        from .report import write_report

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
