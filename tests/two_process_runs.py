"""The runs tests/test_processes.py launches on 2 CPU processes (`accelerate launch ... tests/two_process_runs.py
WORK SHARDS IMAGE`), one after another in the same processes: each is the command line's `main()`, as
`accelerate launch -m multiconcept ...` runs it, except the first part of the resumed run, which stops after
2 steps through the Python API (the command line has no such switch). Not a test module itself."""

import sys
from pathlib import Path

from multiconcept import cli

TINY = ["--base", "tiny", "--no-progress", "--seed", "3"]
ENCODER = ["--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--param", "checkpoint_every=1"]


def runs(work: Path, shards: str, image: str, grad_accum: int) -> dict[str, list[str]]:
    """name -> the command line's arguments; the same runs, one process at --grad-accum 2, two at 1."""
    ga = ["--grad-accum", str(grad_accum)]
    sd = ["--method", "subject-diffusion", "--param", "warmup_steps=0"]
    return {
        "fc-toyworld": ["train-encoder", "--method", "fastcomposer", "--data", "toyworld", *ENCODER, *ga, *TINY],
        "fc-shards": ["train-encoder", "--method", "fastcomposer", "--data", shards, "--sample-log", *ENCODER, *ga,
                      *TINY],
        "sd-toyworld": ["train-encoder", *sd, "--data", "toyworld", *ENCODER, *ga, *TINY],
        "sd-shards": ["train-encoder", *sd, "--data", shards, "--sample-log", "--workers", "1", *ENCODER, *ga, *TINY],
        "cd-learn": ["learn", "-m", "custom-diffusion", "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", image, "--steps", "3",
                     "--lr", "1e-3", *ga, *TINY],
    }


def out_args(work: Path, name: str) -> list[str]:
    return ["-o", str(work / f"{name}.safetensors")] if name.startswith("cd-") else ["--out", str(work / name)]


def main_of(args: list[str]) -> int:
    sys.argv = ["multiconcept", *args]
    try:
        cli.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    from multiconcept.methods.fastcomposer import FastComposerConfig
    from multiconcept.workflows.train_encoder import train_encoder

    work, shards, image = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    for name, args in runs(work, shards, image, grad_accum=1).items():
        code = main_of([*args, *out_args(work, name)])
        if code:
            sys.exit(code)
    # killed after step 2 (the main process wrote the checkpoint), then resumed by both processes
    cfg = FastComposerConfig(steps=3, batch_size=2, lr=1e-3, checkpoint_every=1, seed=3)
    assert train_encoder(shards, work / "fc-resumed", base="tiny", cfg=cfg, progress=False, stop_after=2,
                         sample_log=True) is None
    args = runs(work, shards, image, grad_accum=1)["fc-shards"]
    sys.exit(main_of([*args, "--out", str(work / "fc-resumed"), "--resume"]))
