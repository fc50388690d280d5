"""Time to the first image of a new subject: the tuning-free methods against the fine-tuning baselines run
by their full protocols, measured on ToyWorld and counted in UNet passes.

    .venv/bin/python benchmarks/first_image_protocols.py                      # ToyWorld, 2 threads
    .venv/bin/python benchmarks/first_image_protocols.py --base tiny --quick  # proves it runs

FastComposer's "300–2,500× faster" is against fine-tuning as its baselines run: with the regularisation
images they generate first. Each protocol below runs as `multiconcept` processes, one subject (a ToyWorld
personal concept, one reference render and its mask), wall seconds from process start to the PNG and peak
memory (each process's ru_maxrss):
- FastComposer: `compose` with ToyWorld's shipped model, 50 steps (two UNet passes per step).
- Subject-Diffusion: `compose` with ToyWorld's shipped model, 50 steps (three passes per step:
  its three-branch guidance).
- Custom Diffusion, no regularisation: its paper's training (250 steps × batch 2 × 4 accumulation), then
  one image.
- Custom Diffusion, full protocol: first 200 regularisation images drawn by the base from the class prompt
  (diffusers' train_custom_diffusion.py --with_prior_preservation --num_class_images 200; the paper
  retrieves 200 real LAION images instead, which is not possible offline), 50 steps each, then the same.
- DreamBooth-LoRA, prior preservation: 100 class images (diffusers' train_dreambooth_lora.py default),
  50 steps each, then 500 training steps (its example), then one image.
UNet passes count one image through the UNet once; a training image costs ≈ 3 (forward and backward);
classifier-free guidance doubles a sampling step. The counts are the protocols', so their ratios hold at
SD 1.5 geometry too (the UNet dominates each; the image encoders and the VAE are left out). Diffusers'
prior preservation trains on an instance and a class image per step; ours samples either (`reg_fraction`
0.5), so the measured times are below the counted ratio for the fine-tuning rows.

Prints a markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from fastcomposer_toyworld import reference  # noqa: E402  (one reference render of a personal concept, and its mask)

STEPS = 50
TRAIN_PASSES = 3  # forward + backward ≈ 3 forward passes


def run(cmd: list[str], threads: int) -> dict:
    """One process: wall seconds and its own peak memory."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return {"seconds": time.time() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


def protocols(a) -> dict[str, dict]:
    """name → UNet passes (the protocol as its paper / diffusers script runs it) and the commands that run it here."""
    cli = str(Path(sys.executable).parent / "multiconcept")
    steps = 2 if a.quick else STEPS
    cd_steps, lora_steps = (2, 2) if a.quick else (250, 500)
    cd_reg, lora_reg = (2, 2) if a.quick else (200, 100)

    def tuned(method: str, train_steps: int, images_per_step: int, reg: int, out: Path) -> dict:
        bundle = out / "bundle.safetensors"
        learn = [cli, "learn", "-m", method, "-c", f"<new1>={a.noun}", "-i", a.image, "--mask", f"<new1>={a.mask}",
                 "-o", str(bundle), "--base", a.base, "--steps", str(train_steps), "--no-progress"]
        if reg:
            learn += ["--reg-generate", str(reg), "--reg-steps", str(steps)]
        generate = [cli, "generate", f"a <new1> {a.noun} on a gray background", "-b", str(bundle), "--base", a.base,
                    "-n", "1", "--steps", str(steps), "-o", str(out / "png")]
        passes = reg * steps * 2 + train_steps * images_per_step * TRAIN_PASSES + steps * 2
        return {"passes": passes, "commands": [learn, generate]}

    def composed(model: Path, passes_per_step: int, out: Path) -> dict:
        cmd = [cli, "compose", f"a {a.noun} <img> on a gray background", "-s", f"{a.image}:{a.mask}", "--model",
               str(model), "--steps", str(steps), "--out", str(out)]
        return {"passes": steps * passes_per_step, "commands": [cmd]}

    work = a.work
    out = {}
    if (a.fastcomposer / "fastcomposer.json").is_file():
        out["FastComposer"] = composed(a.fastcomposer, 2, work / "fc")
    if (a.subject_diffusion / "subject_diffusion.json").is_file():
        out["Subject-Diffusion"] = composed(a.subject_diffusion, 3, work / "sd")
    # Custom Diffusion's paper batch: 2 images × 4 accumulated micro-batches per step
    out["Custom Diffusion, no regularisation"] = tuned("custom-diffusion", cd_steps, 8, 0, work / "cd")
    out["Custom Diffusion + 200 generated regularisation images"] = tuned("custom-diffusion", cd_steps, 8, cd_reg,
                                                                          work / "cd-reg")
    # diffusers' DreamBooth: batch 1, an instance and a class image per step with prior preservation
    out["DreamBooth-LoRA + prior preservation (100 class images)"] = tuned("lora", lora_steps, 2, lora_reg, work / "lora")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="toyworld", help="toyworld (the real run) or tiny (proves the script runs)")
    from multiconcept.workflows.compose import SHIPPED

    ap.add_argument("--fastcomposer", type=Path, default=SHIPPED["fastcomposer"], help="default: ToyWorld's shipped model")
    ap.add_argument("--subject-diffusion", type=Path, default=SHIPPED["subject-diffusion"],
                    help="default: ToyWorld's shipped model")
    ap.add_argument("--concept", default="robot_d")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "first_image_protocols")
    ap.add_argument("--quick", action="store_true", help="2 steps and 2 regularisation images everywhere: a smoke run")
    a = ap.parse_args()
    a.work = Path(tempfile.mkdtemp(prefix="first-image-"))
    img, mask, noun = reference(a.concept, a.work / "ref")
    a.image, a.mask, a.noun = str(img), str(mask), noun
    results = {"base": a.base, "threads": a.threads, "concept": a.concept, "protocols": {}}
    for name, p in protocols(a).items():
        print(f"{name} ...", flush=True)
        runs = [run(cmd, a.threads) for cmd in p["commands"]]
        results["protocols"][name] = {"unet_passes": p["passes"], "seconds": sum(r["seconds"] for r in runs),
                                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(r: dict) -> str:
    rows = r["protocols"]
    ref = rows.get("FastComposer") or next(iter(rows.values()))
    name = "FastComposer" if "FastComposer" in rows else next(iter(rows))
    lines = [f"| protocol ({r['base']}, {r['threads']} threads) | seconds to first image | × {name} | UNet passes | "
             f"× {name} | peak MB |", "|---|---|---|---|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {v['seconds']:.1f} | {v['seconds'] / ref['seconds']:.1f} | {v['unet_passes']:,} | "
                     f"{v['unet_passes'] / ref['unet_passes']:.0f} | {v['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
