"""Speed, side by side (issue 36): our learning step against diffusers' own Custom Diffusion script, eager and
compiled; sampling against the plain StableDiffusionPipeline; the ToyWorld build's UNet step and FastComposer's
training step before and after; compile seconds, cold and warm.

    # the peer, in its own venv (never the project's): torch 2.13.0 CPU from the Makefile's wheel folder,
    # torchvision 0.28 --no-deps with its _meta_registrations.py emptied, diffusers / transformers at the lock's
    # versions, and diffusers' examples/custom_diffusion/train_custom_diffusion.py beside it (not in this repo)
    python3 -m venv PEER && PEER/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl
    PEER/bin/pip install --no-deps torchvision==0.28.0 && : > PEER/lib/python3.11/site-packages/torchvision/_meta_registrations.py
    PEER/bin/pip install diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0
    .venv/bin/python benchmarks/bench_speed.py --peer-python PEER/bin/python --peer-script train_custom_diffusion.py \
        --parts train --train-variants eager --reps 7 --json benchmarks/results/speed-train-eager.json
    .venv/bin/python benchmarks/bench_speed.py --peer-python ... --peer-script ... --parts train --peers peer0 \
        --train-variants eager,compiled --reps 7 --json benchmarks/results/speed-train-peer0.json
    .venv/bin/python benchmarks/bench_speed.py --parts sampling,compile,strategy --json ...
    .venv/bin/python benchmarks/bench_speed.py --parts compile --compile-commands demo --json ...
    .venv/bin/python benchmarks/bench_speed.py --parts build,fastcomposer --before 5050326 --json ...
    .venv/bin/python benchmarks/bench_speed.py --parts build,fastcomposer --before none --json ...   # one tree

Every figure is a median over interleaved repetitions (each repetition runs every variant once, in an order
shuffled per repetition, so drift on the machine falls on all of them). A step's time is the difference of two
runs of N1 and N2 steps over N2 - N1: process start, loading, compiling and saving cancel.

- train: Custom Diffusion on the same base folder (ToyWorld's), 8 images of one concept, batch 4, 64 px, no
  augmentation, 2 threads; ours = `multiconcept learn` (its latents encoded once, text of captions without the
  token cached, fused AdamW), the peer = the unchanged script. Compiled: ours `--compile on`; the peer through
  a launcher (written here) that runs the unchanged script with UNet2DConditionModel.from_pretrained returning
  a UNet whose repeated blocks are compiled, the same blocks ours compiles (its `--dynamo_backend inductor`
  would compile only what accelerate.prepare gets: the attention processors' container and the text encoder).
- sampling: seconds per image of `generate` (eager and --compile on) / the plain pipeline's call, same model,
  DDIM, steps, guidance, batch.
- build / fastcomposer: this tree against `--before REV` (exported with git archive), each step in its own
  process on the same inputs; "after, compiled" adds --compile on. `--before none` times this tree eager
  against compiled only: a revision with another world cannot run this tree's build or base.
- strategy: ToyWorld's UNet eager, its repeated blocks compiled, or all of it, for a Custom Diffusion step and
  for sampling, each in a fresh process with an empty inductor cache (models/compiled.py's choice).
- compile: a learn / generate / `multiconcept demo` run with an empty inductor cache (cold), the same again
  (warm), and eager; the differences are the compile seconds (the demo's eager run is its time as users run it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# one of ToyWorld's pilot concepts (robot_a: its parts no word names), disjoint from the evidence's
CONCEPT, KIND = "robot_a", "robot"
PROMPT = f"a <new1> {KIND}"
SCENE_PROMPT = "a robot and a bird on a gray background"

PEER_LAUNCHER = '''
"""Run diffusers' train_custom_diffusion.py unchanged, its UNet's repeated blocks compiled."""
import runpy, sys
from diffusers import UNet2DConditionModel
load = UNet2DConditionModel.from_pretrained
def compiled(*args, **kwargs):
    unet = load(*args, **kwargs)
    unet.compile_repeated_blocks()
    return unet
UNet2DConditionModel.from_pretrained = compiled
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''

BUILD_STEP = '''
import json, sys, time, shutil
from pathlib import Path
import torch
from transformers import CLIPTokenizer
import multiconcept
from multiconcept.workflows.toyworld_build.common import Log
from multiconcept.workflows.toyworld_build.settings import BuildConfig
from multiconcept.workflows.toyworld_build.unet import train_unet
from multiconcept.workflows.toyworld_build.vae import vae_stage
work, steps, compiled = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "on"
torch.set_num_threads(2); torch.set_flush_denormal(True)
extra = {"compile": "on"} if compiled else {}
cfg = BuildConfig.quick(unet_batch=16, unet_steps=steps, monitor_every=10**6, checkpoint_minutes=600.0, **extra)
for p in ("unet_final", "ckpt_unet.safetensors"):
    shutil.rmtree(work / p) if (work / p).is_dir() else (work / p).unlink(missing_ok=True)
log = Log(work / "bench.log", False)
tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
vae = vae_stage(cfg, work, log)
t = time.perf_counter()
train_unet(cfg, work, tokenizer, vae, log)
print(json.dumps({"seconds": time.perf_counter() - t, "code": multiconcept.__file__}))
'''

FASTCOMPOSER_STEP = '''
import json, sys, time, tempfile
import torch
import multiconcept
from multiconcept.methods.fastcomposer import FastComposerConfig
from multiconcept.workflows.train_encoder import train_encoder
steps, compiled = int(sys.argv[1]), sys.argv[2] == "on"
torch.set_num_threads(2)
extra = {"compile": "on"} if compiled else {}
cfg = FastComposerConfig(steps=steps, batch_size=16, lr=1e-4, checkpoint_every=0, aug_grayscale_p=0.0, **extra)
t = time.perf_counter()
train_encoder("toyworld", tempfile.mkdtemp(prefix="mc-fc-"), base="toyworld", cfg=cfg, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "code": multiconcept.__file__}))
'''


STRATEGY = '''
import json, statistics, sys, time, torch
from diffusers import StableDiffusionPipeline
from multiconcept.models import TOYWORLD_DIR
torch.set_num_threads(2)
task, scope = sys.argv[1], sys.argv[2]
pipe = StableDiffusionPipeline.from_pretrained(TOYWORLD_DIR / "base", safety_checker=None, requires_safety_checker=False,
                                               dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
unet = pipe.unet
if task == "train":  # a Custom Diffusion step: attn2 K/V train, batch 4, 16x16 latents, ToyWorld's 32-token text
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 32, 128, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    def once():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(unet(z, t, c).sample, z).backward()
        opt.step()
    n, per = 30, 1
else:  # 50 DDIM steps, guidance 6, batch 4
    prompt = sys.argv[3]
    def once():
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        with torch.no_grad():
            pipe([prompt] * 4, num_inference_steps=50, guidance_scale=6.0, generator=gens)
    n, per = 4, 4
if scope == "blocks":
    unet.compile_repeated_blocks()
elif scope == "model":
    unet.compile()
t0 = time.perf_counter(); once(); first = time.perf_counter() - t0
once()
times = []
for _ in range(n):
    t0 = time.perf_counter(); once(); times.append((time.perf_counter() - t0) / per)
print(json.dumps({"first_s": first, "median_s": statistics.median(times)}))
'''


def run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    """Wall seconds of one process; its output is kept only when it fails."""
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(map(str, cmd[:4]))} ... failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def run_json(cmd: list[str], env: dict) -> dict:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(map(str, cmd[:4]))} ... failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def threads_env(**more) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in more.items()})
    return env


def base_folder() -> Path:
    from multiconcept.models import TOYWORLD_DIR

    return TOYWORLD_DIR / "base"


def training_images(work: Path) -> Path:
    """8 renders of one ToyWorld concept, nothing else in the folder (the peer reads every file as an image)."""
    from multiconcept.toyworld import write_concept_folder

    images = work / "images"
    if not images.is_dir():
        refs = work / "refs"
        pairs = write_concept_folder(CONCEPT, refs, n=8, seed=0)
        images.mkdir(parents=True)
        for img, _mask in pairs:
            shutil.copy(img, images / img.name)
    return images


def variants_train(args, work: Path, images: Path) -> dict[str, callable]:
    """name -> f(steps) -> wall seconds of one process training that many steps."""
    base = base_folder()
    launcher = work / "peer_compiled.py"
    launcher.write_text(PEER_LAUNCHER)

    def ours(compile_mode: str):
        def f(steps: int) -> float:
            return run([sys.executable, "-m", "multiconcept", "learn", "-m", "custom-diffusion", "-c", f"<new1>={KIND}",
                        "-i", f"<new1>={images}", "--base", str(base), "--steps", str(steps), "--batch-size", "4",
                        "--grad-accum", "1", "--param", "augment=false", "--param", "checkpoint_every=0",
                        "--no-progress",
                        "--compile", compile_mode, "-o", str(work / "ours.safetensors"), "--overwrite"],
                       env=threads_env())
        return f

    def peer(compiled: bool, workers: int | None = None):
        def f(steps: int) -> float:
            out = work / "peer-out"
            shutil.rmtree(out, ignore_errors=True)
            script = [str(args.peer_script)]
            cmd = [str(args.peer_python), *([str(launcher)] if compiled else []), *script,
                   "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(images),
                   "--instance_prompt", PROMPT, "--modifier_token", "<new1>", "--initializer_token", KIND,
                   "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", str(steps), "--noaug",
                   "--checkpointing_steps", "1000000", "--output_dir", str(out), "--seed", "0",
                   *(["--dataloader_num_workers", str(workers)] if workers is not None else [])]
            return run(cmd, env=threads_env(), cwd=work)
        return f

    # the peer as it ships starts 2 DataLoader workers (its --dataloader_num_workers default) for every epoch,
    # here every 2 steps, on a machine of 2 cores; "peer0" is the same script with --dataloader_num_workers 0
    every = {"ours eager": ours("off"), "peer eager": peer(False), "peer0 eager": peer(False, 0),
             "ours compiled": ours("on"), "peer compiled": peer(True), "peer0 compiled": peer(True, 0)}
    return {k: f for k, f in every.items() if k.split()[0] == "ours" or k.split()[0] in args.peers.split(",")
            if k.split()[1] in args.train_variants.split(",")}


def interleaved(variants: dict, n1: int, n2: int, reps: int, label: str) -> dict:
    """Per-step seconds of each variant per repetition (N1/N2 differencing), in a shuffled order each time."""
    for name, f in variants.items():  # warm-up: caches (files, inductor) as every timed run finds them
        f(n1)
    per: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps):
        order = list(variants)
        random.Random(rep).shuffle(order)
        for name in order:
            a, b = variants[name](n1), variants[name](n2)
            per[name].append((b - a) / (n2 - n1))
        print(f"{label} rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in per.items()),
              flush=True)
    return per


def ratios(per: dict, num: str, den: str) -> dict:
    r = [a / b for a, b in zip(per[num], per[den])]
    return {"ratio_median": statistics.median(r), "ratios": r, f"{num} ms": [x * 1e3 for x in per[num]],
            f"{den} ms": [x * 1e3 for x in per[den]]}


def part_train(args, work: Path) -> dict:
    images = training_images(work)
    per = interleaved(variants_train(args, work, images), args.n1, args.n2, args.reps, "train")
    out = {"per_step_s": per, "steps": [args.n1, args.n2]}
    for name, (num, den) in {"eager ours/peer": ("ours eager", "peer eager"),
                             "eager ours/peer0": ("ours eager", "peer0 eager"),
                             "compiled ours/peer": ("ours compiled", "peer compiled"),
                             "compiled ours/peer0": ("ours compiled", "peer0 compiled"),
                             "ours compiled/eager": ("ours compiled", "ours eager")}.items():
        if num in per and den in per:
            out[name] = ratios(per, num, den)
    return out


def part_sampling(args, work: Path) -> dict:
    """In this process (2 threads): seconds per image, ours (eager, compiled) against the plain pipeline."""
    import torch
    from diffusers import StableDiffusionPipeline

    from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

    torch.set_num_threads(2)
    base, steps, guidance, n = base_folder(), args.sample_steps, 6.0, 4
    prompt = SCENE_PROMPT
    plain_pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False,
                                                         dtype=torch.float32)  # as load_base: the files are fp16
    plain_pipe.set_progress_bar_config(disable=True)
    loaded = load_with_bundles(str(base), [])
    out = work / "samples"

    def plain():
        gens = [torch.Generator().manual_seed(s) for s in range(n)]
        with torch.no_grad():
            plain_pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens)

    def ours(mode):
        return lambda: generate(prompt, loaded, n, 0, out, SampleSettings(steps=steps, guidance=guidance, batch_size=n,
                                                                          scheduler="ddim", compile=mode))

    variants = {"plain": plain, "ours eager": ours("off"), "ours compiled": ours("on")}
    for f in variants.values():
        f()
    per: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps):
        order = list(variants)
        random.Random(rep).shuffle(order)
        for name in order:
            t = time.perf_counter()
            variants[name]()
            per[name].append((time.perf_counter() - t) / n)
        print(f"sampling rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s/image" for k, v in per.items()), flush=True)
    return {"s_per_image": per, "ours eager/plain": ratios(per, "ours eager", "plain"),
            "ours compiled/plain": ratios(per, "ours compiled", "plain"), "steps": steps, "guidance": guidance,
            "batch": n}


def before_tree(rev: str, work: Path) -> Path:
    """The `rev` version of src/ (git archive), for the before side."""
    tree = work / f"before-{rev}"
    if not (tree / "src").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree / "src"


def build_work(work: Path) -> Path:
    """A quick build's work folder (tokenizer, VAE, evaluator, latent pool) at the build's UNet batch of 16."""
    bw = work / "build-work"
    if not (bw / "vae").is_dir():
        code = ("import sys, torch; from multiconcept.workflows.toyworld_build import BuildConfig, build; "
                "build(sys.argv[1] + '/out', sys.argv[1] + '/bw', progress=False, "
                "config=BuildConfig.quick(unet_batch=16))")
        run([sys.executable, "-c", code, str(work)], env=threads_env())
        shutil.move(str(work / "bw"), str(bw))
    return bw


def part_before_after(args, work: Path, which: str) -> dict:
    after_src = ROOT / "src"
    if which == "build":
        bw = build_work(work)
        snippet, n1, n2 = BUILD_STEP, args.build_n1, args.build_n2

        def cmd(steps, mode):
            return [sys.executable, "-c", snippet, str(bw), str(steps), mode]
    else:
        snippet, n1, n2 = FASTCOMPOSER_STEP, args.fc_n1, args.fc_n2

        def cmd(steps, mode):
            return [sys.executable, "-c", snippet, str(steps), mode]

    def variant(src: Path, mode: str):
        def f(steps: int) -> float:
            got = run_json(cmd(steps, mode), threads_env(PYTHONPATH=src))
            assert got["code"].startswith(str(src)), got["code"]  # the tree asked for, not the installed one
            return got["seconds"]
        return f

    variants = {"after eager": variant(after_src, "off"), "after compiled": variant(after_src, "on")}
    if args.before != "none":
        variants["before"] = variant(before_tree(args.before, work), "off")
    per = interleaved(variants, n1, n2, args.reps, which)
    out = {"per_step_s": per, "after compiled/after eager": ratios(per, "after compiled", "after eager"),
           "steps": [n1, n2], "before": args.before}
    if "before" in per:
        out.update({"after/before": ratios(per, "after eager", "before"),
                    "after compiled/before": ratios(per, "after compiled", "before")})
    return out


def part_compile(args, work: Path) -> dict:
    """Compile seconds of learn and generate: cold (empty inductor cache), warm (the same cache), minus eager."""
    images = training_images(work)
    base = base_folder()
    learn = lambda mode: [sys.executable, "-m", "multiconcept", "learn", "-m", "custom-diffusion", "-c", f"<new1>={KIND}",
                          "-i", f"<new1>={images}", "--base", str(base), "--steps", "10", "--batch-size", "4",
                          "--grad-accum", "1", "--param", "augment=false", "--no-progress", "--compile", mode, "-o",
                          str(work / "c.safetensors"), "--overwrite"]
    gen = lambda mode: [sys.executable, "-m", "multiconcept", "generate", f"a {KIND} on a gray background", "--base",
                        str(base), "-n", "4", "--steps", "20", "-o", str(work / "c-out"), "--overwrite", "--compile", mode]
    demo = lambda mode: [sys.executable, "-m", "multiconcept", "demo", "--out", str(work / "demo-out"), "--compile", mode]
    out = {}
    for name, make, n in (("learn", learn, 3), ("generate", gen, 3), ("demo", demo, 1)):
        if name not in args.compile_commands.split(","):
            continue
        cache = Path(tempfile.mkdtemp(prefix="mc-inductor-"))
        env = threads_env(TORCHINDUCTOR_CACHE_DIR=cache)
        eager = statistics.median(run(make("off"), env) for _ in range(n))
        cold = run(make("on"), env)
        warm = statistics.median(run(make("on"), env) for _ in range(n))
        out[name] = {"eager_s": eager, "cold_s": cold, "warm_s": warm, "compile_cold_s": cold - eager,
                     "compile_warm_s": warm - eager}
        print(f"compile {name}: eager {eager:.1f} s, cold {cold:.1f} s (+{cold - eager:.1f}), warm {warm:.1f} s "
              f"(+{warm - eager:.1f})", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    return out


def part_strategy(args, work: Path) -> dict:
    """What to compile: ToyWorld's UNet eager, its repeated blocks, or whole, for a training step and for sampling;
    each in a fresh process with an empty inductor cache, so `first_s` holds the cold compile."""
    out: dict = {}
    for rep in range(args.strategy_reps):
        for task in ("train", "sample"):
            for scope in ("eager", "blocks", "model"):
                cache = Path(tempfile.mkdtemp(prefix="mc-inductor-"))
                got = run_json([sys.executable, "-c", STRATEGY, task, scope, SCENE_PROMPT],
                               threads_env(TORCHINDUCTOR_CACHE_DIR=cache))
                shutil.rmtree(cache, ignore_errors=True)
                out.setdefault(task, {}).setdefault(scope, []).append(got)
                print(f"strategy {task} {scope}: first {got['first_s']:.1f} s, then {got['median_s'] * 1e3:.1f} ms "
                      f"per {'step' if task == 'train' else 'image'}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="train,sampling,build,fastcomposer,compile")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--peer-python", type=Path, help="the peer venv's python")
    ap.add_argument("--peer-script", type=Path, help="diffusers' examples/custom_diffusion/train_custom_diffusion.py")
    ap.add_argument("--train-variants", default="eager,compiled", help="eager, compiled or both: each pair "
                    "(ours, the peer) is interleaved with the other variants asked for")
    ap.add_argument("--peers", default="peer", help="peer (the script's defaults: 2 loader workers), peer0 (0 "
                    "workers) or both")
    ap.add_argument("--n1", type=int, default=10)
    ap.add_argument("--n2", type=int, default=210)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--before", default="5050326", help="the revision the build and FastComposer steps are "
                    "compared to; 'none': this tree eager against compiled only (a revision whose world "
                    "differs from this tree's cannot run its build or its base)")
    ap.add_argument("--build-n1", type=int, default=5)
    ap.add_argument("--build-n2", type=int, default=45)
    ap.add_argument("--fc-n1", type=int, default=3)
    ap.add_argument("--fc-n2", type=int, default=23)
    ap.add_argument("--compile-commands", default="learn,generate,demo", help="the commands --parts compile times")
    ap.add_argument("--strategy-reps", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mc-speed")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    parts = args.parts.split(",")
    if "train" in parts and not (args.peer_python and args.peer_script):
        ap.error("--parts train needs --peer-python and --peer-script")
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"threads": 2, "reps": args.reps, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for part in parts:
        t = time.time()
        if part == "train":
            results[part] = part_train(args, args.work)
        elif part == "sampling":
            results[part] = part_sampling(args, args.work)
        elif part in ("build", "fastcomposer"):
            results[part] = part_before_after(args, args.work, part)
        elif part == "compile":
            results[part] = part_compile(args, args.work)
        elif part == "strategy":
            results[part] = part_strategy(args, args.work)
        else:
            ap.error(f"unknown part {part!r}")
        results[part]["wall_s"] = time.time() - t
        for k, v in results[part].items():
            if isinstance(v, dict) and "ratio_median" in v:
                print(f"{part}: {k} = {v['ratio_median']:.3f} (median of {len(v['ratios'])}: "
                      f"{', '.join(f'{r:.3f}' for r in v['ratios'])})", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
