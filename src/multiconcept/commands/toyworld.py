"""`multiconcept toyworld build`: train ToyWorld's base pipeline and evaluator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli import out, toyworld_app, number
from ..errors import require
from ..models import TOYWORLD_DIR

DEFAULT_WORK = Path.home() / ".cache" / "multiconcept" / "toyworld-build"


@toyworld_app.command("build")
def build_cmd(
    output: Path = typer.Option(TOYWORLD_DIR, "--out", "-o", help="where base/, evaluator/, quality.json go "
                                "(default: inside the package, where `--base toyworld` finds them)"),
    work: Path = typer.Option(DEFAULT_WORK, help="checkpoints, caches and build.log; a re-run resumes from here"),
    seed: int = number(0, help="the whole build is seeded", minimum=0),
    steps: Optional[int] = number(None, help="UNet training steps (default 12000)", minimum=1),
    text_encoder: str = typer.Option("evaluator-tuned", help="evaluator-tuned (the evaluator's text tower, trained with "
                                     "the UNet) | evaluator (that tower, frozen) | scratch (random init, trained)"),
    prediction_type: str = typer.Option("v_prediction", help="what the UNet predicts: v_prediction | epsilon"),
    noise_schedule: str = typer.Option("scaled_linear_zero_snr", help="training betas: scaled_linear_zero_snr "
                                       "(needs v_prediction) | scaled_linear | linear"),
    snr_gamma: Optional[float] = number(None, help="Min-SNR-γ loss weighting, e.g. 5 (default off)", above=0),
    noise_offset: float = number(0.0, help="offset noise std, e.g. 0.1 for epsilon-prediction (0: off)", minimum=0),
    timestep_sampling: str = typer.Option("mixed", help="training timesteps: uniform | logit_normal "
                                          "(t/T = sigmoid(N(mean, std))) | mixed (half of each)"),
    timestep_mean: float = number(1.0, help="logit-normal mean"),
    timestep_std: float = number(1.0, help="logit-normal std", above=0),
    easy_share: float = number(0.0, help="share of each batch from single-object scenes, fully captioned", minimum=0),
    base_layout: str = typer.Option("fixed", help="base training scenes: fixed (one centred object or a "
                                    "left/right pair) | free (five positions, two sizes, 1-3 objects)"),
    caption_colour_p: float = number(0.75, help="share of objects whose colour the base's captions say "
                                           "(below 1, 'a star' is in distribution too)", minimum=0),
    threads: int = number(2, help="torch CPU threads", minimum=1),
    max_unet_hours: Optional[float] = number(None, help="stop UNet training after this long", above=0),
    smoke: bool = typer.Option(False, help="tiny step counts: prove every stage in a few minutes"),
    resume: bool = typer.Option(True, help="continue from WORK's checkpoints (--no-resume starts over)"),
):
    """Build ToyWorld from nothing (seeded, resumable, ~3 h on 2 cores)."""
    from ..toyworld.build import NOISE_SCHEDULES, TEXT_ENCODERS, TIMESTEP_SAMPLINGS, BuildConfig, build

    require(steps is None or steps >= 1, f"--steps must be at least 1, got {steps}")
    require(threads >= 1, f"--threads must be at least 1, got {threads}")
    require(text_encoder in TEXT_ENCODERS, f"--text-encoder {text_encoder!r}: choose one of {', '.join(TEXT_ENCODERS)}")
    require(prediction_type in ("v_prediction", "epsilon"),
            f"--prediction-type {prediction_type!r}: choose v_prediction or epsilon")
    require(noise_schedule in NOISE_SCHEDULES,
            f"--noise-schedule {noise_schedule!r}: choose one of {', '.join(sorted(NOISE_SCHEDULES))}")
    require(prediction_type == "v_prediction" or "zero_snr" not in noise_schedule,
            f"--noise-schedule {noise_schedule} has zero terminal SNR: use it with --prediction-type v_prediction")
    require(snr_gamma is None or snr_gamma > 0, f"--snr-gamma must be positive, got {snr_gamma}")
    require(timestep_sampling in TIMESTEP_SAMPLINGS,
            f"--timestep-sampling {timestep_sampling!r}: choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    require(0 <= noise_offset < 1, f"--noise-offset must be within [0, 1), got {noise_offset}")
    require(timestep_std > 0, f"--timestep-std must be positive, got {timestep_std}")
    require(0 <= easy_share <= 1, f"--easy-share must be within 0..1, got {easy_share}")
    require(base_layout in ("fixed", "free"), f"--base-layout {base_layout!r}: choose fixed or free")
    require(0 < caption_colour_p <= 1, f"--caption-colour-p must be within (0, 1], got {caption_colour_p}")
    extra = {"threads": threads, "text_encoder": text_encoder, "prediction_type": prediction_type,
             "noise_schedule": noise_schedule, "snr_gamma": snr_gamma, "noise_offset": noise_offset,
             "timestep_sampling": timestep_sampling, "timestep_mean": timestep_mean, "timestep_std": timestep_std, "easy_share": easy_share,
             "base_layout": base_layout, "caption_colour_p": caption_colour_p}
    if max_unet_hours is not None:
        require(max_unet_hours > 0, f"--max-unet-hours must be positive, got {max_unet_hours}")
        extra["max_unet_hours"] = max_unet_hours
    cfg = BuildConfig.smoke(**extra) if smoke else BuildConfig(**extra)
    report = build(output, work, seed=seed, steps=steps, resume=resume, progress=True, config=cfg)
    single, ev = report["single_object"], report["evaluator"]
    out.print(f"ToyWorld built in {output}: prompted class present {single['class_present']:.2f} (goal 0.80), "
              f"colour {single['colour_present']:.2f} (goal 0.70), evaluator top-1 retrieval "
              f"{ev['top1_caption_retrieval_full']:.2f} (goal 0.90); details in {output / 'quality.json'}")
