"""`multiconcept benchmark`: methods x protocol x sources, resumable; results.json + report.html."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import UserError
from .options import (
    BaseOpt,
    ClipOpt,
    DinoOpt,
    PrefixOpt,
    ScaleOpt,
    key_values,
    number,
    out,
)


def benchmark(
    methods: str = typer.Option(..., "--methods", help="comma-separated, e.g. textual-inversion,custom-diffusion"),
    source: List[str] = typer.Option(..., "--source", "-s", help="folder: image.png, one mask per concept and "
                                     "concepts.json (or a ToyWorld scene.json), or toyworld:A+B (or A+B@SEED) to render "
                                     "that ToyWorld pair; repeatable"),
    output: Path = typer.Option(..., "--out", "-o", help="folder for cells, results.json and report.html"),
    protocol: str = typer.Option("two-concept", help="two-concept | dreambench | dreambench-live | multi-subject | a .txt file"),
    base: Optional[str] = BaseOpt,
    steps: Optional[int] = number(None, help="training steps (default: each method's)", minimum=1),
    param: List[str] = typer.Option([], "--param", "-p", help="method setting KEY=VALUE for every method"),
    train_seed: int = number(0, help="training seed", minimum=0),
    images_per_prompt: Optional[int] = number(None, help="images per prompt: seeds 0..K-1 (default 4)", minimum=1),
    seeds: Optional[str] = typer.Option(None, help="image seeds for every prompt, e.g. 0-15 or 0,1,2"),
    sample_steps: int = number(50, help="denoising steps (DisenDiff: DDIM 50)", minimum=1),
    guidance: float = number(6.0, help="classifier-free guidance (DisenDiff: 6)", minimum=0),
    scheduler: str = typer.Option("ddim", help="ddim | pndm | euler | euler-a | dpm | ddpm"),
    batch_size: int = number(4, help="images per sampling batch", minimum=1),
    clip: Optional[str] = ClipOpt,
    dino: Optional[str] = DinoOpt,
    scale: str = ScaleOpt,
    text_prefix: str = PrefixOpt,
    threads: Optional[int] = number(None, help="torch threads per job (default: this process's); fixed so "
                                          "results do not depend on the executor; with --ray, CPUs/threads jobs run at once",
                                    minimum=1),
    ray: bool = typer.Option(False, "--ray", help="run jobs as Ray tasks (RAY_ADDRESS, else a local Ray)"),
    ray_cpus: Optional[int] = number(None, help="CPUs of the local Ray started by --ray", minimum=1),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Learn, generate and score methods × protocol × sources; results.json + report.html.

    A source folder holds one image with several concepts, a mask per concept
    (white = the concept) and concepts.json:
    {"image": "image.png", "world": "photo", "concepts": [{"token": "<c1>", "class": "cat", "mask": "cat_mask.png"},
    {"token": "<c2>", "class": "dog", "mask": "dog_mask.png"}]}.
    Finished work in OUT is reused: run the same command again to resume.
    """
    import torch

    from ..workflows.benchmark import BenchmarkSettings, parse_seeds
    from ..workflows.benchmark import benchmark as run
    from ..workflows.benchmark.report import with_sem

    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    if images_per_prompt is not None and images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be at least 1, got {images_per_prompt}")
    seed_list = parse_seeds(seeds) if seeds else tuple(range(images_per_prompt or 4))
    if seeds and images_per_prompt is not None and images_per_prompt != len(seed_list):
        raise UserError(f"--seeds gives {len(seed_list)} seeds but --images-per-prompt is {images_per_prompt}: "
                        f"give one of the two")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    settings = BenchmarkSettings(
        methods=method_list, protocol=protocol, base=base, steps=steps,
        params=tuple(sorted(key_values(param, "--param").items())), train_seed=train_seed, seeds=seed_list,
        sample_steps=sample_steps, guidance=guidance, scheduler=scheduler, batch_size=batch_size, clip=clip,
        dino=dino, scale=scale, text_prefix=text_prefix, threads=threads or torch.get_num_threads(), device=device)
    result = run(list(source), settings, output, use_ray=ray, ray_cpus=ray_cpus, progress=progress)
    t = Table("method", "metric", *[c.title() for c in result["columns"]], title=f"{protocol}: {len(source)} source(s)")
    for method, entry in result["table"].items():
        for key, vals in entry.items():
            t.add_row(method, key, *[with_sem(vals.get(c), result["sem"][method][key].get(c)) for c in result["columns"]])
    out.print(t)
    out.print(f"wrote {output / 'results.json'} and {output / 'report.html'}")
