"""`multiconcept toyworld build`: train ToyWorld's base pipeline and its two CLIPs (evaluator, encoder);
`multiconcept toyworld ship-model`: put a trained tuning-free model beside them, in fp16."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import CompileOpt, number, out

app = typer.Typer(no_args_is_help=True, help="The embedded synthetic world: build its models.")
DEFAULT_WORK = Path.home() / ".cache" / "multiconcept" / "toyworld-build"


@app.command("build")
def build_cmd(
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="where base/, evaluator/, encoder/, quality.json go "
                                          "(default: inside the package, where `--base toyworld` finds them)"),
    work: Path = typer.Option(DEFAULT_WORK, help="checkpoints, caches and build.log; a re-run resumes from here"),
    seed: int = number(0, help="the whole build is seeded"),
    steps: Optional[int] = number(None, help="UNet training steps (default 12000)"),
    text_encoder: str = typer.Option("evaluator-tuned", help="evaluator-tuned (the encoder CLIP's text tower, trained "
                                     "with the UNet) | evaluator (that tower, frozen) | scratch (random init, trained)"),
    prediction_type: str = typer.Option("v_prediction", help="what the UNet predicts: v_prediction | epsilon"),
    noise_schedule: str = typer.Option("scaled_linear_zero_snr", help="training betas: scaled_linear_zero_snr "
                                       "(needs v_prediction) | scaled_linear | linear"),
    snr_gamma: Optional[float] = number(None, help="Min-SNR-γ loss weighting, e.g. 5 (default off)"),
    noise_offset: float = number(0.0, help="offset noise std, e.g. 0.1 for epsilon-prediction (0: off)"),
    timestep_sampling: str = typer.Option("mixed", help="training timesteps: uniform | logit_normal "
                                          "(t/T = sigmoid(N(mean, std))) | mixed (half of each)"),
    timestep_mean: float = number(1.0, help="logit-normal mean"),
    timestep_std: float = number(1.0, help="logit-normal std"),
    easy_share: float = number(0.0, help="share of each batch from single-subject scenes, fully captioned"),
    caption_colour_p: float = number(0.75, help="share of subjects whose body colour the base's captions say "
                                           "(below 1, 'a robot' is in distribution too)"),
    threads: int = number(2, help="torch CPU threads"),
    max_unet_hours: Optional[float] = number(None, help="stop UNet training after this long"),
    smoke: bool = typer.Option(False, help="tiny step counts: prove every stage in a few minutes"),
    resume: bool = typer.Option(True, help="continue from WORK's checkpoints (--no-resume starts over)"),
    compile: str = CompileOpt,
):
    """Build ToyWorld from nothing (seeded, resumable, about 2.5 h on 2 cores)."""
    from ..models import TOYWORLD_DIR  # here, not at the top: torch loads on first use, not for --help
    from ..workflows.toyworld_build import BuildConfig, build

    extra = {"threads": threads, "text_encoder": text_encoder, "prediction_type": prediction_type,
             "noise_schedule": noise_schedule, "snr_gamma": snr_gamma, "noise_offset": noise_offset,
             "timestep_sampling": timestep_sampling, "timestep_mean": timestep_mean, "timestep_std": timestep_std,
             "easy_share": easy_share, "caption_colour_p": caption_colour_p,
             "max_unet_hours": max_unet_hours, "compile": compile}
    if steps is not None:
        extra["unet_steps"] = steps
    cfg = BuildConfig.smoke(**extra) if smoke else BuildConfig(**extra)
    output = output or TOYWORLD_DIR
    report = build(output, work, seed=seed, resume=resume, progress=True, config=cfg)
    single, ev = report["single_object"], report["evaluator"]
    out.print(f"ToyWorld built in {output}: prompted kind {single['class_present']:.2f}, body colour "
              f"{single['colour_present']:.2f} (goal 0.80 each), evaluator top-1 retrieval "
              f"{ev['top1_caption_retrieval_full']:.2f}; details in {output / 'quality.json'}")


@app.command("ship-model")
def ship_model_cmd(
    folder: Path = typer.Argument(..., help="a finished FastComposer or Subject-Diffusion model folder (train-encoder)"),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="default: inside the package, where `compose` "
                                          "without --model finds it"),
):
    """Ship a tuning-free model trained on ToyWorld: fp16, trained parts only, into the package's assets."""
    from ..models import TOYWORLD_DIR
    from ..workflows.toyworld_build.ship import ship_tuning_free

    shipped = ship_tuning_free(folder, output or TOYWORLD_DIR)
    size = sum(p.stat().st_size for p in shipped.iterdir())
    out.print(f"shipped {shipped} ({size / 1e6:.1f} MB)")
