"""Foundation benchmark: training-step overhead, sampling throughput, memory.

    .venv/bin/python benchmarks/bench_foundation.py [--base tiny|toyworld|PATH] [--steps 20]

Prints, all measured in this one run (machines are noisy, so only ratios
against a reference measured here mean anything):
- per-method learn time per optimiser step and peak RSS (each method in its
  own subprocess so peaks do not mix);
- our Custom Diffusion training step / a bare UNet forward+backward on the
  same batch (goal <= 1.15x);
- DisenDiff step / Custom Diffusion step on the same data (goal <= 1.2x);
- our `generate` throughput / a plain StableDiffusionPipeline call with the
  same model and settings (goal >= 0.97x).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def scene_dir() -> Path:
    from multiconcept.toyworld import write_two_concept_folder

    d = Path(tempfile.mkdtemp(prefix="mc-bench-"))
    write_two_concept_folder("robot_a", "bird_b", d, seed=0)
    return d


def make_trainer(base_name: str, method: str, d: Path, batch: int):
    from multiconcept.data import build_concept_set
    from multiconcept.methods import get_method
    from multiconcept.methods.finetune import Trainer
    from multiconcept.models import load_base
    from multiconcept.prompts import Concept

    base = load_base(base_name)
    data = build_concept_set([Concept("<s1>", "robot"), Concept("<s2>", "bird")], [str(d / "image.png")],
                             [f"<s1>={d / 'robot_a_mask.png'}", f"<s2>={d / 'bird_b_mask.png'}"])
    cls = get_method(method)
    cfg = cls.Config(grad_accum=1, batch_size=batch, augment=False)
    m = cls(base, data, cfg)
    groups = m.setup()
    opt = torch.optim.AdamW(groups, lr=1e-5)
    return base, m, Trainer(m, base, data, cfg), opt


def our_step(tr, opt, step):
    opt.zero_grad(set_to_none=True)
    loss, _ = tr.loss(tr.batch(step, 0), torch.Generator().manual_seed(step))
    loss.backward()
    opt.step()


def timed(fn, n: int) -> float:
    fn(-1)  # warm-up
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def method_worker(base_name, method, d, batch, n, q):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _, _, tr, opt = make_trainer(base_name, method, d, batch)
    s = timed(lambda i: our_step(tr, opt, i), n)
    q.put({"method": method, "s_per_step": s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def per_method(base_name, d, batch, n):
    ctx = mp.get_context("spawn")
    rows = []
    for method in ("textual-inversion", "custom-diffusion", "disendiff", "lora"):
        q = ctx.Queue()
        p = ctx.Process(target=method_worker, args=(base_name, method, d, batch, n, q))
        p.start()
        rows.append(q.get())
        p.join()
    return rows


def overhead_vs_bare_unet(base_name, d, batch, n):
    """Interleaved: our CD step vs UNet fwd+bwd on the same latents/encodings and trainables."""
    base, m, tr, opt = make_trainer(base_name, "custom-diffusion", d, batch)
    b = tr.batch(0, 0)
    g = torch.Generator().manual_seed(0)
    z = tr.latents(b, g)
    t = torch.randint(0, 1000, (z.shape[0],), generator=g)
    noise = torch.randn(z.shape, generator=g)
    zt = tr.scheduler.add_noise(z, noise, t)
    with torch.no_grad():
        cond = tr.encode_prompts(b["prompts"])

    def bare(_):
        pred = base.unet(zt, t, cond.hidden).sample
        torch.nn.functional.mse_loss(pred, noise).backward()

    ours, ref = [], []
    for i in range(n):
        ours.append(timed(lambda k: our_step(tr, opt, k), 1))
        ref.append(timed(bare, 1))
    return statistics.median(ours), statistics.median(ref)


def disendiff_vs_cd(base_name, d, batch, n):
    _, _, tr_cd, opt_cd = make_trainer(base_name, "custom-diffusion", d, batch)
    _, m_dd, tr_dd, opt_dd = make_trainer(base_name, "disendiff", d, batch)
    cd, dd = [], []
    for i in range(n):
        cd.append(timed(lambda k: our_step(tr_cd, opt_cd, k), 1))
        dd.append(timed(lambda k: our_step(tr_dd, opt_dd, k), 1))
    return statistics.median(dd), statistics.median(cd)


def sampling_throughput(base_name, n_images, steps):
    from multiconcept.models import load_base
    from multiconcept.workflows.generate import Loaded, SampleSettings, generate

    base = load_base(base_name)
    loaded = Loaded(base)
    prompt = "a red robot on the left and a blue bird on the right on a gray background"
    settings = SampleSettings(steps=steps, guidance=5.0, batch_size=n_images)
    out = Path(tempfile.mkdtemp(prefix="mc-bench-gen-"))
    pipe = base.pipe

    def plain(_):
        gens = [torch.Generator().manual_seed(s) for s in range(n_images)]
        with torch.no_grad():
            pipe([prompt] * n_images, num_inference_steps=steps, guidance_scale=5.0, generator=gens)

    def ours(_):
        generate(prompt, loaded, n_images, 0, out, settings)

    o, p = [], []
    for i in range(3):
        o.append(timed(ours, 1))
        p.append(timed(plain, 1))
    return n_images / statistics.median(o), n_images / statistics.median(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    d = scene_dir()
    print(f"# foundation benchmark on base={args.base}, torch threads={torch.get_num_threads()}")
    rows = per_method(args.base, d, args.batch, args.steps)
    print("| method | s / step (batch %d) | peak RSS (MB) |\n|---|---|---|" % args.batch)
    for r in rows:
        print(f"| {r['method']} | {r['s_per_step']:.3f} | {r['peak_rss_mb']:.0f} |")
    ours, bare = overhead_vs_bare_unet(args.base, d, args.batch, args.steps)
    dd, cd = disendiff_vs_cd(args.base, d, args.batch, args.steps)
    ours_ips, plain_ips = sampling_throughput(args.base, 4, 20)
    res = {
        "train_step_over_bare_unet": ours / bare, "ours_s": ours, "bare_s": bare,
        "disendiff_over_custom_diffusion": dd / cd,
        "sampling_ours_over_plain": ours_ips / plain_ips, "ours_images_per_s": ours_ips, "plain_images_per_s": plain_ips,
        "per_method": rows,
    }
    print(f"training step / bare UNet fwd+bwd: {ours:.3f}s / {bare:.3f}s = {ours / bare:.2f}x (goal <= 1.15x)")
    print(f"DisenDiff step / Custom Diffusion step: {dd:.3f}s / {cd:.3f}s = {dd / cd:.2f}x (goal <= 1.2x)")
    print(f"sampling throughput ours / plain pipeline: {ours_ips:.2f} / {plain_ips:.2f} img/s = "
          f"{ours_ips / plain_ips:.3f}x (goal >= 0.97x)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
