"""Build ToyWorld's models from nothing (spec/toyworld.md).

    python -m multiconcept.toyworld.build --out OUT --work WORK [--steps 12000] [--seed 0]
    python -m multiconcept.toyworld.build --out /tmp/tw --work /tmp/tw-work --smoke   # ~2 min check

Stages, each resumable (re-run the same command; a killed run continues from
its last checkpoint, written every few minutes as safetensors + metadata):
  1. tokenizer  byte-level BPE in CLIP format on the world's captions + common English
  2. vae        AutoencoderKL, 4x down (16x16x4 latents), trained on every appearance,
                personal concepts included; latents are then normalised per channel
                inside the VAE's 1x1 quant convs, so scaling_factor is 1
  3. evaluator  a small transformers CLIPModel trained contrastively on renders + captions
  4. pool       base-training scenes (no personal concepts) encoded once to latents
  5. unet       CLIPTextModel (from the evaluator's text tower) + UNet2DConditionModel
                trained jointly, v-prediction on zero-terminal-SNR betas
  6. ship       OUT/base (StableDiffusionPipeline, fp16), OUT/evaluator (CLIPModel +
                processor), OUT/quality.json, OUT/samples.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np

# Shared CPUs: OpenMP's default spin-waiting burned 3x the CPU time of useful
# work when other processes competed for the 2 cores (VAE step 23.7 s vs 7.2 s
# wall, measured under load 6). Must be set before torch loads its runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ..losses import diffusion_target, min_snr_weights
from .check import check
from .render import (
    BACKGROUNDS,
    BASE_LAYOUTS,
    CLASS_NOUNS,
    COLOURS,
    PERSONAL_CONCEPTS,
    Appearance,
    ObjectSpec,
    SceneObject,
    base_training_scene,
    describe,
    render_scene,
    world_scene,
)


@dataclass
class BuildConfig:
    seed: int = 0
    # tokenizer
    bpe_vocab_size: int = 1600  # learned tokens incl. the byte alphabet; 256 end-of-word bytes are added after
    # The text context. SD's 77 left 64 padding tokens after a ToyWorld caption, and the
    # base UNet's near-uniform cross-attention read mostly them (fourth run: 59-90% of
    # each layer's mass on padding, 0.3-2.8% on the class noun). Captions are at most 32
    # tokens with BOS/EOS (median 17, 3,000 sampled); code reads tokenizer.model_max_length.
    max_length: int = 32
    # VAE (spec: 0.95 M params reach PSNR ≈ 27.6 in ~12 min)
    world_pool: int = 20000  # renders of every appearance, for the VAE and the evaluator
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6  # as in SD's autoencoder: the posterior stays near-deterministic
    # Objects cover ~10% of pixels. With plain L1 the VAE spent 931 steps on backgrounds
    # and drew every object as a brown blob (19.3 dB); MSE with object pixels weighted
    # 5x (and lr 2e-3) reached the same PSNR in ~130 steps, in colour.
    vae_object_weight: float = 4.0  # extra loss weight on object pixels
    vae_max_minutes: float | None = 30.0
    # evaluator CLIP
    evaluator_steps: int = 2000
    evaluator_batch: int = 64
    evaluator_lr: float = 5e-4
    evaluator_max_minutes: float | None = 12.0
    # text encoder + UNet (spec: batch 16, AdamW 3e-4 with warm-up, clip 1.0, 10% caption dropout)
    base_pool: int = 24000  # each scene is seen ~8x in 12k steps; captions are re-drawn every time
    # "evaluator": the base's text encoder is the evaluator's text tower, frozen (as SD
    # uses a pretrained CLIP text encoder). "scratch": trained jointly with the UNet
    # from random init (the first build's way): at step ~5k its hidden states for "a red
    # circle" and "a blue circle" differed by 0.9 (norm 11) at the colour word, against
    # 9.7 for the evaluator's tower, and the UNet barely followed prompts.
    # "evaluator-tuned": starts from the evaluator's tower and trains with the UNet. The
    # frozen tower's states barely tell classes apart outside the noun (red -> blue moves
    # the padding states by 11.3, circle -> star by 5.2; content tokens' mean pairwise
    # cosine 0.83), and with it the fourth run drew colour and background right but every
    # class as one blob. (Fifth run, this setting with the 32-token context: class 0.19 at
    # step 1,000, 0.06 at 2,000 — no better; README, How the ToyWorld recipe was found.)
    text_encoder: str = "evaluator-tuned"
    # What the UNet predicts. Linear betas leave a terminal SNR of ~4e-5, and with
    # epsilon-prediction the loss at high noise (where background, colour and class
    # are decided) is nearly zero: at step ~3.9k of the first frozen-encoder run the
    # conditional and unconditional eps errors were equal at t = 800 and its x0
    # estimates there were worse than predicting zeros. v-prediction (Salimans & Ho;
    # what Lin et al. pair with near-zero terminal SNR) makes high-noise steps predict
    # the image instead. Sampling then uses "trailing" timesteps, starting at t = 999.
    prediction_type: str = "v_prediction"
    # The noise schedule. "linear" (DDPM's betas 1e-4..0.02) puts 45% of training
    # timesteps at SNR < 0.05; with v-prediction the third run learned colour and
    # background by step 1,000 (0.94 / 0.94) but drew every class as the same blob
    # (class 0.06 at step 4,000; the text tower's states for "circle" vs "star" differ
    # by 10 at the noun, so the signal was there). "scaled_linear_zero_snr" is SD's
    # scaled-linear betas rescaled to zero terminal SNR (Lin et al., with v-prediction
    # and trailing timesteps): 28% of timesteps below SNR 0.05, 58% in 0.05..5 (linear: 42%).
    # It did not bring shapes by itself (fourth run: class 0.00 at step 4,000; cross-attention
    # nearly uniform, mostly on padding tokens; README, How the ToyWorld recipe was found).
    noise_schedule: str = "scaled_linear_zero_snr"
    # Min-SNR-γ loss weighting (Hang et al.; diffusers' --snr_gamma): None = plain MSE on the target.
    snr_gamma: float | None = None
    # Offset noise (kohya's / diffusers' --noise_offset): a per-sample, per-channel constant of this
    # std added to the training noise, so an epsilon-model can move an image's mean colour
    # (backgrounds) away from the mean of its starting noise. 0 = off.
    noise_offset: float = 0.0
    # Where training timesteps are drawn. "uniform" (DDPM). "logit_normal": t/T = sigmoid(N(mean,
    # std)) (SD3's sampling), to spend more steps where the class decides the shape: on the fourth
    # run's weights, SDEdit from clean latents kept every shape from t = 499 and almost none from
    # t = 832, and the class word never steered it (README, How the ToyWorld recipe was found). "mixed": half the
    # draws uniform, half logit-normal, so the highest-noise steps (where the background colour is
    # set: logit-normal(1, 1) alone left tinted backgrounds on the trivial set) keep their share.
    # Default: mixed, logit-normal(1, 1) (the seventh run, with the fixed layout: class 0.62 at step
    # 2,000 where every uniform run had stayed at chance).
    timestep_sampling: str = "mixed"
    timestep_mean: float = 1.0
    timestep_std: float = 1.0
    # Share of each batch drawn from the pool's single-object scenes, captioned in full (size,
    # position, background): a curriculum for class -> shape, which the same recipe learns on
    # large centred single objects in ~1,600 steps (class 0.93) but not in the full world by 5,000.
    easy_share: float = 0.0
    # The base's training layouts (render.BASE_LAYOUTS). "free" (runs one to six): any of five
    # positions, two sizes, 1-3 objects; class stayed at chance by 4,000-5,000 steps. "fixed": one
    # large object in the center or two on the left and right, which is what the held-out prompts
    # ask for (single objects without a position; pairs "on the left ... on the right").
    base_layout: str = "fixed"
    # Share of objects whose colour the base's training captions say. Always (1.0, runs one to
    # seven) left "a star on a black background" out of distribution: the seventh run's base drew
    # dark noise for it, and personalisation prompts ("a <s1> star") and class prompts have no
    # colour. Below 1 the colour is left out of the other objects' phrases.
    caption_colour_p: float = 0.75
    unet_steps: int = 12000
    unet_batch: int = 16
    unet_lr: float = 3e-4
    warmup: int = 500
    caption_dropout: float = 0.1
    ema_decay: float = 0.995  # spec: raw beat EMA 0.999 early; both are kept, the better one ships
    max_unet_hours: float | None = None
    # The max_* caps bound a stage's training time: the cosine schedule runs on
    # max(step fraction, time fraction), so a capped stage still anneals fully and
    # its report says how many steps it got. Uncapped, the build is deterministic.
    # evaluation and shipping
    eval_seeds: int = 2  # images per single-object prompt
    sample_steps: int = 30
    guidance: float = 4.0  # spec: 3–5 best at this size, 7.5 oversaturates
    monitor_every: int = 2000  # steps between quick checker scores during UNet training
    checkpoint_minutes: float = 5.0
    threads: int = 2

    @classmethod
    def smoke(cls, **kw) -> "BuildConfig":
        """Every stage and code path with tiny step counts: about two minutes on 2 cores."""
        return cls(**dict(world_pool=512, vae_steps=30, vae_batch=16, evaluator_steps=20, evaluator_batch=32,
                          base_pool=512, unet_steps=40, warmup=10, eval_seeds=1, sample_steps=4,
                          monitor_every=20, checkpoint_minutes=0.1) | kw)


# Values of fields that did not exist when an older work dir was started.
_LEGACY_VALUES = {"text_encoder": "scratch", "prediction_type": "epsilon", "noise_schedule": "linear",
                  # settings added later, at the values that reproduce the older runs
                  "snr_gamma": None, "timestep_sampling": "uniform", "timestep_mean": 0.5, "timestep_std": 1.2,
                  "easy_share": 0.0, "noise_offset": 0.0, "base_layout": "free",
                  "caption_colour_p": 1.0}
# Fields that may change between runs on one work dir without invalidating it.
_RUNTIME_FIELDS = {"unet_steps", "max_unet_hours", "vae_max_minutes", "evaluator_max_minutes", "monitor_every", "checkpoint_minutes", "threads",
                   "eval_seeds", "sample_steps", "guidance"}

# Prompt vocabulary beyond the world, so "a photo of <tok> star on the beach"
# tokenizes into whole words (DreamBench-style templates, evaluation.md).
COMMON_WORDS = """
a an the of on in at to with and or for from by as is are be this that it its one two three
photo picture image painting drawing sketch render rendering illustration close up view shot
good nice cool small big large tiny huge little old new bright dark light red orange yellow green
cyan blue purple pink white black gray grey beige brown gold silver colorful shiny wooden metal
beach jungle snow city mountain forest desert river lake ocean sea water sky cloud clouds sun moon
street road cobblestone floor table chair bed room kitchen house home garden park field grass tree
trees flower flowers fabric carpet wall window door background foreground top bottom left right
center middle side front back near next behind under over above below inside outside floating
wearing hat santa chef outfit police firefighter rainbow scarf sunglasses purple red pink sitting
standing lying dog cat bear toy teddy backpack bowl can candle clock boot sneaker vase cup glass
robot duck monster teapot berry cartoon style pixel art oil watercolor pencil graphic design logo
sticker pattern shape shapes object objects thing things thing person people man woman boy girl
friend together alone pair group many several some another other same different both each every
made paper plastic stone brick sand snowy rainy sunny night day morning evening autumn spring
winter summer eiffel tower bridge building buildings car boat train bike plane sidewalk shop
store market street sign fence pool bath towel book books shelf lamp plant pot box basket bag
""".split()

PROMPT_TEMPLATES = [
    "a photo of a {} on the beach", "a {} in the jungle", "a {} in the snow", "a {} on a cobblestone street",
    "a {} with a city in the background", "a {} with a mountain in the background", "a {} on top of pink fabric",
    "a {} on top of a wooden floor", "a {} floating on top of water", "a red {}", "a shiny {}", "a {} and a {}",
    "a photo of a {} and a {}", "a close up photo of a {}", "a painting of a {}", "a {} wearing a santa hat",
]


# ---------------------------------------------------------------- helpers

class Log:
    def __init__(self, path: Path, echo: bool):
        self.path, self.echo, self.t0 = path, echo, time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{(time.time() - self.t0) / 60:6.1f}m] {msg}"
        if self.echo:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _lr(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine down to 10% of the peak at progress 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Checkpoint:
    """Modules, AdamW state and loop metadata in one safetensors file, written
    atomically, so a kill at any moment leaves the previous checkpoint intact."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, modules: dict, optimizer: torch.optim.Optimizer, meta: dict) -> None:
        tensors = {f"{name}.{k}": v.detach().clone().contiguous()
                   for name, m in modules.items() for k, v in
                   (m.state_dict() if isinstance(m, torch.nn.Module) else m).items()}
        for pid, state in optimizer.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"optimizer.{pid}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
        os.replace(tmp, self.path)

    def load(self, modules: dict, optimizer: torch.optim.Optimizer) -> dict | None:
        if not self.path.exists():
            return None
        with safe_open(str(self.path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name, m in modules.items():
            part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if isinstance(m, torch.nn.Module):
                m.load_state_dict(part)
            else:
                for k in m:
                    m[k].copy_(part[k])
        state = optimizer.state_dict()
        state["state"] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, pid, key = k.split(".", 2)
                state["state"].setdefault(int(pid), {})[key] = v
        optimizer.load_state_dict(state)
        return meta


class Every:
    """True once every `minutes` of wall time (always, if minutes <= 0)."""

    def __init__(self, minutes: float):
        self.seconds, self.last = minutes * 60, time.time()

    def __call__(self) -> bool:
        if time.time() - self.last >= self.seconds:
            self.last = time.time()
            return True
        return False


def run_loop(name: str, *, steps: int, max_minutes: float | None, peak_lr: float, warmup: int,
             modules: dict, optimizer: torch.optim.Optimizer, ckpt_path: Path, train_step, log: Log,
             checkpoint_minutes: float, after_step=None, state: dict | None = None) -> dict:
    """The shared resumable loop: `train_step(step) -> loss` does one optimiser
    step; `after_step(step, state)` may add to `state`, which is checkpointed."""
    ckpt = Checkpoint(ckpt_path)
    state = state or {}
    loaded = ckpt.load(modules, optimizer)
    if loaded:
        state.update(loaded)
        log(f"{name}: resumed at step {state['step']} ({state['train_seconds'] / 60:.1f} min trained)")
    state.setdefault("step", 0)
    state.setdefault("train_seconds", 0.0)
    step, seconds0, t0, step0 = state["step"], state["train_seconds"], time.time(), state["step"]
    budget = max_minutes * 60 if max_minutes else None
    due, losses = Every(checkpoint_minutes), []

    def progress() -> float:
        spent = seconds0 + time.time() - t0
        return max(step / steps, spent / budget if budget else 0.0)

    while progress() < 1:
        lr = _lr(step, progress(), peak_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses.append(train_step(step))
        step += 1
        state["step"], state["train_seconds"] = step, seconds0 + time.time() - t0
        if after_step:
            after_step(step, state)
        if step % 100 == 0:
            per_step = (time.time() - t0) / (step - step0)
            left = (steps - step) * per_step
            if budget:
                left = min(left, budget - state["train_seconds"])
            log(f"{name} step {step}/{steps} loss {np.mean(losses[-100:]):.4f} {per_step:.2f} s/step "
                f"lr {lr:.2e} ~{left / 60:.0f} min left")
        if due() or progress() >= 1:
            ckpt.save(modules, optimizer, state)
    if step < steps:
        log(f"{name}: time cap of {max_minutes:.0f} min reached at step {step} of {steps}")
    return {"steps": step, "planned_steps": steps, "stopped_by_time_cap": step < steps,
            "train_minutes": round(state["train_seconds"] / 60, 1),
            "final_loss_100": float(np.mean(losses[-100:])) if losses else None}


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the SD / CLIP-here convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _objects_from_dicts(objs: list[dict]) -> list[SceneObject]:
    return [SceneObject(o["noun"], Appearance(o["colour"], o["pattern"], o["second_colour"]),
                        o["size"], o["position"], tuple(o["box"]), None, o["concept"]) for o in objs]


def _render_pool(n: int, rng_key: list[int], sampler, masks: bool = False):
    """n scenes as uint8 images plus JSON metadata (what captions need), and with
    masks=True the union of each scene's object masks."""
    rng = np.random.default_rng(rng_key)
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    foreground = np.zeros((n, 64, 64), dtype=bool) if masks else None
    meta = []
    for i in range(n):
        s = sampler(rng)
        images[i] = s.image
        if masks:
            for o in s.objects:
                foreground[i] |= o.mask
        meta.append({"background": s.background, "objects": [o.to_dict() for o in s.objects]})
    return (images, meta, foreground) if masks else (images, meta)


# ---------------------------------------------------------------- 1. tokenizer

def train_tokenizer(cfg: BuildConfig, folder: Path, log: Log):
    """Byte-level BPE with CLIP's normaliser, pre-tokeniser and `</w>` word ends,
    so transformers' CLIPTokenizer loads it from vocab.json + merges.txt."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    rng = np.random.default_rng([cfg.seed, 1])
    corpus = []
    for _ in range(3000):
        s = world_scene(rng)
        corpus += [s.caption, describe(s.objects, s.background)]
    corpus += [f"a {c.description()}" for c in PERSONAL_CONCEPTS.values()]
    corpus += [" ".join(COMMON_WORDS)] * 3 + [t.replace("{}", n) for t in PROMPT_TEMPLATES for n in CLASS_NOUNS]

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=cfg.bpe_vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    # CLIP's layout: bytes, bytes at a word end, merged tokens, then the two specials.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=cfg.max_length)
    tok.save_pretrained(tmp)
    _replace_dir(tmp, folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    probe = "a photo of a small red striped star on the beach"
    log(f"tokenizer: {len(tok)} tokens; {probe!r} -> {tok.tokenize(probe)}")
    return tok


# ---------------------------------------------------------------- 2. VAE

def make_vae():
    from diffusers import AutoencoderKL

    # Three blocks = two 2x downsamplings: 64x64x3 -> 16x16x4, the spec's 0.95 M-param layout.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=64)


@torch.no_grad()
def _latent_stats(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.cat([vae.encode(_to_pixels(images[i:i + 256])).latent_dist.mean
                       for i in range(0, len(images), 256)])
    return means.mean((0, 2, 3)), means.std((0, 2, 3))


@torch.no_grad()
def normalise_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make latents zero-mean, unit-std per channel by folding the affine map into
    the 1x1 quant convs (encoder side) and its inverse into post_quant_conv; the
    VAE's input->output function is unchanged and the pipeline needs no extra code."""
    c = mean.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= std.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * torch.log(std)  # log-variance of z' = (z - m) / s
    p.bias += (p.weight[:, :, 0, 0] @ mean)
    p.weight *= std.view(1, c, 1, 1)


def train_vae(cfg: BuildConfig, work: Path, pool: np.ndarray, foreground: np.ndarray, log: Log):
    torch.manual_seed(cfg.seed)
    vae = make_vae()
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def train_step(step: int) -> float:
        rng = np.random.default_rng([cfg.seed, 20, step])
        idx = rng.integers(len(pool), size=cfg.vae_batch)
        x = _to_pixels(pool[idx])
        weight = 1 + cfg.vae_object_weight * torch.from_numpy(foreground[idx]).float()[:, None]
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = (weight * (rec - x) ** 2).mean() / weight.mean() + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    info = run_loop("vae", steps=cfg.vae_steps, max_minutes=cfg.vae_max_minutes, peak_lr=cfg.vae_lr,
                    warmup=min(100, cfg.vae_steps // 10 + 1), modules={"vae": vae}, optimizer=opt,
                    ckpt_path=work / "ckpt_vae.safetensors", train_step=train_step, log=log,
                    checkpoint_minutes=cfg.checkpoint_minutes)
    return vae.eval(), info


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray) -> float:
    x = _to_pixels(images)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean((1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def vae_stage(cfg: BuildConfig, work: Path, log: Log):
    from diffusers import AutoencoderKL

    folder = work / "vae"
    if (folder / "config.json").exists():
        return AutoencoderKL.from_pretrained(folder).eval()
    images, _, foreground = _world_pool(cfg, log)
    vae, train_info = train_vae(cfg, work, images, foreground, log)
    held_out, _ = _render_pool(256, [cfg.seed, 21], world_scene)
    psnr_raw = vae_psnr(vae, held_out)
    mean, std = _latent_stats(vae, images[:2048])
    log(f"vae: PSNR {psnr_raw:.2f} dB on held-out renders; latent channel means {mean.tolist()} stds {std.tolist()}")
    overall_std = float(torch.sqrt((std ** 2 + (mean - mean.mean()) ** 2).mean()))
    normalise_latents(vae, mean, std)
    vae.register_to_config(scaling_factor=1.0)  # latents are unit-std per channel now
    psnr = vae_psnr(vae, held_out)
    m2, s2 = _latent_stats(vae, images[:2048])
    assert abs(psnr - psnr_raw) < 0.05 and (s2 - 1).abs().max() < 0.05, "latent normalisation changed the VAE"
    tmp = folder.with_name("vae.tmp")
    vae.save_pretrained(tmp, safe_serialization=True)
    with torch.no_grad():  # top row renders, bottom row reconstructions, for a human look
        rec = vae.decode(vae.encode(_to_pixels(held_out[:8])).latent_dist.mean).sample.clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    _grid(np.concatenate([held_out[:8], rec])).save(tmp / "reconstructions.png")
    _write_json(tmp / "metrics.json", {"psnr_db": psnr, "raw_latent_std": overall_std,
                                       "raw_channel_mean": mean.tolist(), "raw_channel_std": std.tolist(),
                                       "scaling_factor": 1.0, "training": train_info})
    _replace_dir(tmp, folder)
    return vae


_WORLD_POOL_CACHE: dict = {}


def _world_pool(cfg: BuildConfig, log: Log):
    key = (cfg.seed, cfg.world_pool)
    if key not in _WORLD_POOL_CACHE:
        t = time.time()
        _WORLD_POOL_CACHE.clear()
        _WORLD_POOL_CACHE[key] = _render_pool(cfg.world_pool, [cfg.seed, 2], world_scene, masks=True)
        log(f"world pool: {cfg.world_pool} renders in {time.time() - t:.0f} s")
    return _WORLD_POOL_CACHE[key]


# ---------------------------------------------------------------- 3. evaluator

def make_evaluator(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=tokenizer.model_max_length, **ids),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=128)
    return CLIPModel(config)


def _augment_like_generations(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur and noise on a third of the batch each, so generated (softer, noisier)
    images land near their renders in feature space."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = torch.from_numpy(rng.random(len(x)) < 0.33).view(-1, 1, 1, 1)
    x = torch.where(pick, blurred, x)
    noisy = torch.from_numpy(rng.random(len(x)) < 0.33).view(-1, 1, 1, 1)
    return x + noisy * torch.from_numpy(rng.normal(0, 0.06, x.shape).astype(np.float32))


def _evaluator_captions(meta: list[dict], rng: np.random.Generator) -> list[str]:
    """Full captions half the time (retrieval is measured on those), short ones otherwise."""
    return [describe(_objects_from_dicts(m["objects"]), m["background"], None if rng.random() < 0.5 else rng)
            for m in meta]


def train_evaluator(cfg: BuildConfig, work: Path, tokenizer, log: Log):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = work / "evaluator"
    if (folder / "config.json").exists():
        return CLIPModel.from_pretrained(folder).eval()
    images, meta, _ = _world_pool(cfg, log)
    torch.manual_seed(cfg.seed + 3)
    model = make_evaluator(tokenizer)
    log(f"evaluator: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.evaluator_lr, weight_decay=0.1)
    model.train()

    def train_step(step: int) -> float:
        rng = np.random.default_rng([cfg.seed, 30, step])
        idx = rng.integers(len(images), size=cfg.evaluator_batch)
        pixels = _augment_like_generations(_to_pixels(images[idx]), rng)
        # Padding to the longest caption, not to 77: with CLIP's causal mask the pooled
        # (end-of-text) feature never sees the padding, so this is exact and ~3x cheaper.
        ids = tokenizer(_evaluator_captions([meta[i] for i in idx], rng), padding=True,
                        truncation=True, return_tensors="pt").input_ids
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    info = run_loop("evaluator", steps=cfg.evaluator_steps, max_minutes=cfg.evaluator_max_minutes,
                    peak_lr=cfg.evaluator_lr, warmup=min(100, cfg.evaluator_steps // 10 + 1), modules={"clip": model},
                    optimizer=opt, ckpt_path=work / "ckpt_evaluator.safetensors", train_step=train_step, log=log,
                    checkpoint_minutes=cfg.checkpoint_minutes)
    model.eval()
    tmp = folder.with_name("evaluator.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    # Same [-1, 1] normalisation as training; 64 px in, so resize and crop are identities.
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_resize=True, do_center_crop=True), tokenizer=tokenizer)
    processor.save_pretrained(tmp)
    _write_json(tmp / "training.json", info)
    _replace_dir(tmp, folder)
    return CLIPModel.from_pretrained(folder).eval()


@torch.no_grad()
def image_features(model, images: np.ndarray) -> torch.Tensor:
    out = [model.get_image_features(pixel_values=_to_pixels(images[i:i + 256])) for i in range(0, len(images), 256)]
    return torch.cat([o if torch.is_tensor(o) else o.pooler_output for o in out])


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").input_ids
    out = [model.get_text_features(input_ids=ids[i:i + 256]) for i in range(0, len(ids), 256)]
    return torch.cat([o if torch.is_tensor(o) else o.pooler_output for o in out])


def retrieval_top1(model, tokenizer, images: np.ndarray, captions: list[str]) -> float:
    """Share of images whose highest-scoring caption (among all given) is their own;
    a duplicate caption string counts as right."""
    img = F.normalize(image_features(model, images), dim=-1)
    txt = F.normalize(text_features(model, tokenizer, captions), dim=-1)
    best = (img @ txt.T).argmax(1).tolist()
    return float(np.mean([captions[b] == captions[i] for i, b in enumerate(best)]))


# ---------------------------------------------------------------- 4. latent pool

def latent_pool(cfg: BuildConfig, work: Path, vae, log: Log):
    path, meta_path = work / "base_pool.safetensors", work / "base_pool.json"
    if path.exists() and meta_path.exists():
        with safe_open(str(path), "pt") as f:
            mean, std = f.get_tensor("mean"), f.get_tensor("std")
        if len(mean) == cfg.base_pool:
            return mean, std, json.loads(meta_path.read_text())
    t = time.time()
    images, meta = _render_pool(cfg.base_pool, [cfg.seed, 4], partial(base_training_scene, layout=cfg.base_layout))
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            d = vae.encode(_to_pixels(images[i:i + 256])).latent_dist
            means.append(d.mean.half().contiguous())
            stds.append(d.std.half().contiguous())
    mean, std = torch.cat(means), torch.cat(stds)
    save_file({"mean": mean, "std": std}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    _write_json(meta_path, meta)
    log(f"latent pool: {len(mean)} base scenes encoded in {time.time() - t:.0f} s "
        f"(posterior std mean {std.float().mean():.3f})")
    return mean, std, meta


# ---------------------------------------------------------------- 5. text encoder + UNet

def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def make_unet(cross_attention_dim: int = 128):
    from diffusers import UNet2DConditionModel

    # The spec's 5.9 M layout: cross-attention at 16x16 and 8x8 (where methods read maps).
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32)


NOISE_SCHEDULES = {
    # DDPM's linear betas (made for 32 px images): terminal SNR 4e-5, so a 16x16 latent's
    # mean colour does not leak through the last step (SD's scaled_linear leaves 7% of it)
    "linear": dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    # SD 1.x's own betas (terminal SNR 0.0047: ~7% of the mean colour leaks through t = T)
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    # SD's betas rescaled to zero terminal SNR: no leak at all, more steps at mid SNR
    "scaled_linear_zero_snr": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   rescale_betas_zero_snr=True),
}


def make_schedulers(prediction_type: str = BuildConfig.prediction_type,
                    noise_schedule: str = BuildConfig.noise_schedule):
    from diffusers import DDIMScheduler, DDPMScheduler

    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise_schedule {noise_schedule!r}; choose from {sorted(NOISE_SCHEDULES)}")
    if NOISE_SCHEDULES[noise_schedule].get("rescale_betas_zero_snr") and prediction_type != "v_prediction":
        raise ValueError(f"noise_schedule {noise_schedule!r} has zero terminal SNR, where only v_prediction is defined")
    common = dict(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False,
                  **NOISE_SCHEDULES[noise_schedule])
    # (trailing spacing ignores steps_offset; 1 keeps diffusers' outdated-config warning away)
    spacing = dict(timestep_spacing="trailing") if prediction_type == "v_prediction" else {}
    return DDPMScheduler(**common), DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, **spacing)


def make_pipeline(vae, text_encoder, tokenizer, unet, cfg: BuildConfig):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_schedulers(cfg.prediction_type, cfg.noise_schedule)[1], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ema_update(ema: dict, modules: dict, decay: float) -> None:
    with torch.no_grad():
        for name, m in modules.items():
            for k, v in m.named_parameters():
                ema[f"{name}.{k}"].lerp_(v.detach(), 1 - decay)


TEXT_ENCODERS = ("evaluator-tuned", "evaluator", "scratch")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mixed")


def batch_indices(cfg: BuildConfig, pool_size: int, singles: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[bool]]:
    """Pool indices for one UNet batch, and which of them are curriculum ("easy") picks."""
    if not cfg.easy_share:
        return rng.integers(pool_size, size=cfg.unet_batch), [False] * cfg.unet_batch
    n_easy = int(round(cfg.unet_batch * cfg.easy_share))
    idx = np.concatenate([rng.choice(singles, n_easy), rng.integers(pool_size, size=cfg.unet_batch - n_easy)])
    return idx, [True] * n_easy + [False] * (cfg.unet_batch - n_easy)


def training_noise(cfg: BuildConfig, shape, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def sample_timesteps(cfg: BuildConfig, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    u = torch.sigmoid(torch.randn(n, generator=generator) * cfg.timestep_std + cfg.timestep_mean)
    t = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    if cfg.timestep_sampling == "mixed":
        uniform = torch.randint(0, num_train_timesteps, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < 0.5, uniform, t)
    return t


def train_unet(cfg: BuildConfig, work: Path, tokenizer, vae, log: Log):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    final = work / "unet_final"
    if (final / "raw" / "unet" / "config.json").exists():
        out = {}
        for kind in ("raw", "ema"):
            out[kind] = (CLIPTextModel.from_pretrained(final / kind / "text_encoder").eval(),
                         UNet2DConditionModel.from_pretrained(final / kind / "unet").eval())
        return out, json.loads((final / "train.json").read_text())
    mean, std, meta = latent_pool(cfg, work, vae, log)
    torch.manual_seed(cfg.seed + 5)
    text_encoder, unet = make_text_encoder(tokenizer), make_unet(128)
    if cfg.text_encoder.startswith("evaluator"):  # "evaluator" (frozen) or "evaluator-tuned"
        from transformers import CLIPModel

        text_encoder.load_state_dict(CLIPModel.from_pretrained(work / "evaluator", dtype=torch.float32).text_model.state_dict())
    if cfg.text_encoder == "evaluator":
        text_encoder.requires_grad_(False).eval()
        modules = {"unet": unet}  # what trains (and is checkpointed / averaged)
    else:
        modules = {"text_encoder": text_encoder, "unet": unet}
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M")
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.named_parameters()}
    ddpm, _ = make_schedulers(cfg.prediction_type, cfg.noise_schedule)
    alphas = ddpm.alphas_cumprod
    for m in modules.values():
        m.train()

    singles = np.array([i for i, m in enumerate(meta) if len(m["objects"]) == 1])
    if cfg.easy_share and not len(singles):
        raise ValueError("easy_share needs single-object scenes in the base pool; it has none (raise base_pool)")

    def train_step(step: int) -> float:
        rng = np.random.default_rng([cfg.seed, 50, step])
        idx, easy = batch_indices(cfg, len(mean), singles, rng)
        captions = ["" if rng.random() < cfg.caption_dropout else
                    describe(_objects_from_dicts(meta[i]["objects"]), meta[i]["background"], None if e else rng,
                             colour_p=cfg.caption_colour_p)
                    for i, e in zip(idx, easy)]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        # Posterior means, not samples: the tiny KL weight still let one VAE channel
        # collapse to the prior (measured posterior std per normalised channel
        # [0.26, 0.39, 4.96, 0.16]), so sampling made a quarter of every latent pure
        # noise of variance ~25 that held the UNet's loss at a floor of ~0.25.
        latents = mean[idx].float()
        noise = training_noise(cfg, latents.shape, g)
        t = sample_timesteps(cfg, len(idx), ddpm.config.num_train_timesteps, g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        target = diffusion_target(ddpm, latents, noise, t)
        err = F.mse_loss(unet(noisy, t, text_encoder(ids)[0]).sample, target, reduction="none").mean((1, 2, 3))
        loss = (err * min_snr_weights(ddpm, t, cfg.snr_gamma)).mean() if cfg.snr_gamma else err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, modules, cfg.ema_decay)
        return loss.item()

    loop_state = {"monitor": []}  # checker scores during training, checkpointed with the loop

    def after_step(step: int, state: dict) -> None:
        if step % cfg.monitor_every == 0:
            scores = quick_score(make_pipeline(vae, text_encoder, tokenizer, unet, cfg), cfg, n=16)
            state["monitor"].append({"step": step, **scores})
            log(f"unet step {step}: checker on {scores['n']} prompts: class {scores['class_present']:.2f} "
                f"colour {scores['colour_present']:.2f} both {scores['match']:.2f} background {scores['background']:.2f}")
            for m in modules.values():
                m.train()

    info = run_loop("unet", steps=cfg.unet_steps,
                    max_minutes=cfg.max_unet_hours * 60 if cfg.max_unet_hours else None,
                    peak_lr=cfg.unet_lr, warmup=cfg.warmup, modules={**modules, "ema": ema}, optimizer=opt,
                    ckpt_path=work / "ckpt_unet.safetensors", train_step=train_step, log=log,
                    checkpoint_minutes=cfg.checkpoint_minutes, after_step=after_step, state=loop_state)
    averaged = {name: copy.deepcopy(m) for name, m in modules.items()}
    with torch.no_grad():
        for name, m in averaged.items():
            for k, v in m.named_parameters():
                v.copy_(ema[f"{name}.{k}"])
    ema_te, ema_unet = averaged.get("text_encoder", text_encoder), averaged["unet"]
    tmp = final.with_name("unet_final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for kind, (te, un) in {"raw": (text_encoder, unet), "ema": (ema_te, ema_unet)}.items():
        te.save_pretrained(tmp / kind / "text_encoder", safe_serialization=True)
        un.save_pretrained(tmp / kind / "unet", safe_serialization=True)
    _write_json(tmp / "train.json", info | {"monitor": loop_state["monitor"]})
    _replace_dir(tmp, final)
    return {"raw": (text_encoder.eval(), unet.eval()), "ema": (ema_te.eval(), ema_unet.eval())}, info


# ---------------------------------------------------------------- 6. evaluation and shipping

def single_object_prompts(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(prompt, noun, colour, background), cycling through every class x colour."""
    rng = np.random.default_rng(seed)
    combos = [(noun, colour) for noun in CLASS_NOUNS for colour in COLOURS]
    order = rng.permutation(len(combos))
    out = []
    for i in range(n):
        noun, colour = combos[order[i % len(combos)]]
        bg = str(rng.choice(list(BACKGROUNDS)))
        out.append((f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {noun} on a {bg} background", noun, colour, bg))
    return out


def two_object_prompts(n: int, seed: int) -> list[tuple[str, tuple, tuple, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        n1, n2 = rng.choice(CLASS_NOUNS, 2, replace=False)
        c1, c2 = rng.choice(list(COLOURS), 2, replace=False)
        bg = str(rng.choice(list(BACKGROUNDS)))
        a1, a2 = ("an" if c[0] in "aeiou" else "a" for c in (c1, c2))
        out.append((f"{a1} {c1} {n1} on the left and {a2} {c2} {n2} on the right on a {bg} background",
                    (str(n1), str(c1)), (str(n2), str(c2)), bg))
    return out


def colourless_score(pipe, cfg: BuildConfig, seeds: int = 2) -> dict:
    """Class prompts without a colour ("a star on a gray background", every class x
    background x seed): personalisation's class prompts look like this."""
    prompts = [(f"a {noun} on a {bg} background", noun) for noun in CLASS_NOUNS for bg in BACKGROUNDS
               for _ in range(seeds)]
    images = generate(pipe, [p for p, _ in prompts], cfg, seed=70_000)
    found = [check(img, noun, None) for img, (_, noun) in zip(images, prompts)]
    return {"prompts": len(prompts), "class_present": float(np.mean([r["class_present"] for r in found])),
            "largest_object_is_class": float(np.mean([r["largest_is_class"] for r in found]))}


@torch.no_grad()
def generate(pipe, prompts: list[str], cfg: BuildConfig, seed: int, batch: int = 32) -> np.ndarray:
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                   generator=gens, output_type="np").images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def quick_score(pipe, cfg: BuildConfig, n: int) -> dict:
    """Checker scores on n held-out single-object prompts (seeded, so comparable across steps)."""
    prompts = single_object_prompts(n, seed=cfg.seed + 777)
    images = generate(pipe, [p[0] for p in prompts], cfg, seed=10_000)
    results = []
    for img, (_, noun, colour, bg) in zip(images, prompts):
        r = check(img, noun, colour)
        results.append(r | {"bg_ok": r["background"] == bg})
    keys = ("class_present", "largest_is_class", "colour_present", "match")
    return {"n": n, **{k: float(np.mean([r[k] for r in results])) for k in keys},
            "background": float(np.mean([r["bg_ok"] for r in results]))}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2-Wasserstein distance between Gaussians fitted to two feature sets (FID's formula)."""
    a, b = a.double().numpy(), b.double().numpy()
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sqrt_ca = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca)
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def _grid(images: np.ndarray, cols: int = 8, scale: int = 2) -> Image.Image:
    rows = math.ceil(len(images) / cols)
    canvas = np.full((rows * 66, cols * 66, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * 66 + 1: r * 66 + 65, c * 66 + 1: c * 66 + 65] = img
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


def _render_like(noun: str, colour: str, bg: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render_scene([ObjectSpec(noun, Appearance(colour), str(rng.choice(["small", "large"])), "center")],
                        bg, "plain", rng).image


def quality_report(cfg: BuildConfig, out: Path, evaluator, tokenizer, log: Log) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    singles = single_object_prompts(len(CLASS_NOUNS) * len(COLOURS) * cfg.eval_seeds, seed=cfg.seed + 1001)
    pairs = two_object_prompts(24 * cfg.eval_seeds, seed=cfg.seed + 1002)
    gen_single = generate(pipe, [p[0] for p in singles], cfg, seed=50_000)
    gen_pair = generate(pipe, [p[0] for p in pairs], cfg, seed=60_000)
    gen_seconds = time.time() - t
    single = [check(img, noun, colour) for img, (_, noun, colour, _) in zip(gen_single, singles)]
    pair = [(check(img, *a), check(img, *b)) for img, (_, a, b, _) in zip(gen_pair, pairs)]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731

    held_out, held_meta = _render_pool(200, [cfg.seed, 1003], world_scene)
    full = [describe(_objects_from_dicts(m["objects"]), m["background"]) for m in held_meta]
    # class and appearance words only: what a prompt without layout words says
    short = [" and ".join(o.phrase(size=False, position=False) for o in _objects_from_dicts(m["objects"]))
             for m in held_meta]
    base_renders = np.stack([_render_like(noun, colour, bg, i) for i, (_, noun, colour, bg) in enumerate(singles)])
    fd = frechet_distance(image_features(evaluator, gen_single), image_features(evaluator, base_renders))
    fd_floor = frechet_distance(image_features(evaluator, base_renders),
                                image_features(evaluator, np.stack([_render_like(n, c, b, 10_000 + i)
                                                                    for i, (_, n, c, b) in enumerate(singles)])))
    report = {
        "sampling": {"scheduler": "DDIMScheduler", "steps": cfg.sample_steps, "guidance": cfg.guidance,
                     "seeds": "50000+i single, 60000+i pairs"},
        "single_object": {"prompts": len(singles), "class_present": mean([r["class_present"] for r in single]),
                          "largest_object_is_class": mean([r["largest_is_class"] for r in single]),
                          "objects_detected_per_image": mean([len(r["detections"]) for r in single]),
                          "colour_present": mean([r["colour_present"] for r in single]),
                          "class_and_colour_same_object": mean([r["match"] for r in single]),
                          "background": mean([r["background"] == p[3] for r, p in zip(single, singles)])},
        "two_object": {"prompts": len(pairs),
                       "both_classes_present": mean([a["class_present"] and b["class_present"] for a, b in pair]),
                       "both_colours_present": mean([a["colour_present"] and b["colour_present"] for a, b in pair]),
                       "both_bound": mean([a["match"] and b["match"] for a, b in pair])},
        "no_colour_in_prompt": colourless_score(pipe, cfg, cfg.eval_seeds),
        "evaluator": {"top1_caption_retrieval_full": retrieval_top1(evaluator, tokenizer, held_out, full),
                      "top1_caption_retrieval_short": retrieval_top1(evaluator, tokenizer, held_out, short),
                      "retrieval_candidates": len(full),
                      "frechet_generated_vs_rendered": fd,
                      "frechet_rendered_vs_rendered": fd_floor,
                      "frechet_samples": len(singles)},
        "seconds_per_image": gen_seconds / (len(singles) + len(pairs)),
    }
    _grid(np.concatenate([gen_single[:48], gen_pair[:16]])).save(out / "samples.png")
    _write_json(out / "samples.json", [p[0] for p in singles[:48]] + [p[0] for p in pairs[:16]])
    return report


def _add_vocab_files(folder: Path, tokenizer_dir: Path) -> None:
    """SD-style tokenizer folders also carry vocab.json + merges.txt (tokenizer.json alone
    loads too), so CLIPTokenizer(vocab_file, merges_file) works on the shipped folder."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)


def ship(cfg: BuildConfig, out: Path, work: Path, tokenizer, vae, trained: dict, log: Log) -> tuple[str, dict]:
    """Pick raw or EMA weights by checker score, write OUT/base in fp16 and OUT/evaluator."""
    scores = {kind: quick_score(make_pipeline(vae, te, tokenizer, un, cfg), cfg, n=len(CLASS_NOUNS) * len(COLOURS))
              for kind, (te, un) in trained.items()}
    choice = max(scores, key=lambda k: (scores[k]["match"], k == "raw"))
    log(f"ship: raw {scores['raw']} / ema {scores['ema']} -> shipping {choice}")
    te, un = trained[choice]
    pipe = make_pipeline(copy.deepcopy(vae).half(), copy.deepcopy(te).half(), tokenizer, copy.deepcopy(un).half(), cfg)
    tmp = out / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    _add_vocab_files(tmp / "tokenizer", work / "tokenizer")
    _replace_dir(tmp, out / "base")
    ship_evaluator(out, work)
    return choice, scores


def ship_evaluator(out: Path, work: Path) -> Path:
    """OUT/evaluator: the trained CLIPModel in fp16 (loaders upcast to fp32), its
    tokenizer (+ vocab.json/merges.txt) and image recipe. The evaluator is final
    once its stage ends, so it can ship before the base does."""
    from transformers import CLIPModel

    src, tmp = work / "evaluator", out / "evaluator.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    CLIPModel.from_pretrained(src, dtype=torch.float32).half().save_pretrained(tmp, safe_serialization=True)
    _add_vocab_files(tmp, work / "tokenizer")
    _replace_dir(tmp, out / "evaluator")
    return out / "evaluator"


# ---------------------------------------------------------------- entry point

def _check_state(work: Path, cfg: BuildConfig, resume: bool) -> None:
    state_path = work / "state.json"
    if state_path.exists() and resume:
        old = _LEGACY_VALUES | json.loads(state_path.read_text())["config"]
        diff = {f.name: (old.get(f.name), getattr(cfg, f.name)) for f in fields(cfg)
                if f.name not in _RUNTIME_FIELDS and old.get(f.name) != getattr(cfg, f.name)}
        if diff:
            raise ValueError(f"{work} holds a build with other settings {diff}; "
                             f"pass resume=False (--no-resume) or another work dir")
    if not resume:
        for name in ("tokenizer", "vae", "evaluator", "unet_final", "ckpt_vae.safetensors",
                     "ckpt_evaluator.safetensors", "ckpt_unet.safetensors", "base_pool.safetensors",
                     "base_pool.json", "state.json"):
            p = work / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    _write_json(state_path, {"config": asdict(cfg)})


def validate(cfg: BuildConfig) -> None:
    """Refuse a bad configuration with a one-line ValueError, before any work."""
    if cfg.text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"unknown text_encoder {cfg.text_encoder!r}; choose from {TEXT_ENCODERS}")
    make_schedulers(cfg.prediction_type, cfg.noise_schedule)  # refuses a bad pair before any work
    if cfg.timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}; choose from {TIMESTEP_SAMPLINGS}")
    if not cfg.timestep_std > 0:
        raise ValueError(f"timestep_std must be positive, got {cfg.timestep_std}")
    if not 0 < cfg.caption_colour_p <= 1:
        raise ValueError(f"caption_colour_p must be within (0, 1], got {cfg.caption_colour_p}")
    if cfg.base_layout not in BASE_LAYOUTS:
        raise ValueError(f"unknown base_layout {cfg.base_layout!r}; choose from {BASE_LAYOUTS}")
    if not 0 <= cfg.easy_share <= 1:
        raise ValueError(f"easy_share must be within [0, 1], got {cfg.easy_share}")
    if not 0 <= cfg.noise_offset < 1:
        raise ValueError(f"noise_offset must be within [0, 1), got {cfg.noise_offset}")


def build(out_dir: str | Path, work_dir: str | Path, seed: int = 0, steps: int | None = None,
          resume: bool = True, progress: bool = True, config: BuildConfig | None = None) -> dict:
    """Build (or resume building) ToyWorld into out_dir; returns the quality report.

    steps: UNet + text-encoder training steps (default config.unet_steps = 12000).
    config: every other knob; BuildConfig.smoke() runs all stages in ~2 minutes.
    """
    from transformers import CLIPTokenizer

    cfg = replace(config or BuildConfig(), seed=seed)
    if steps is not None:
        cfg = replace(cfg, unet_steps=steps)
    validate(cfg)
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    # Without this, weights and activations drifting into denormal floats made
    # CPU steps 4-8x slower (measured on the VAE: 0.9 s -> 3.5-6 s per step).
    torch.set_flush_denormal(True)
    log = Log(work / "build.log", progress)
    _check_state(work, cfg, resume)
    log(f"build: out={out} work={work} config={asdict(cfg)}")
    timings, t = {}, time.time()

    tok_dir = work / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir) if (tok_dir / "tokenizer_config.json").exists() \
        else train_tokenizer(cfg, tok_dir, log)
    timings["tokenizer"], t = time.time() - t, time.time()
    vae = vae_stage(cfg, work, log)
    timings["vae"], t = time.time() - t, time.time()
    evaluator = train_evaluator(cfg, work, tokenizer, log)
    timings["evaluator"], t = time.time() - t, time.time()
    _WORLD_POOL_CACHE.clear()
    trained, train_info = train_unet(cfg, work, tokenizer, vae, log)
    timings["unet"], t = time.time() - t, time.time()
    choice, ship_scores = ship(cfg, out, work, tokenizer, vae, trained, log)
    report = quality_report(cfg, out, evaluator, tokenizer, log)
    timings["ship_and_evaluate"] = time.time() - t
    size_mb = sum(f.stat().st_size for f in (out / "base").rglob("*.safetensors")) / 2**20
    report |= {"shipped_weights": choice, "raw_vs_ema_quick_scores": ship_scores,
               "base_weights_mb": round(size_mb, 2), "unet_training": train_info,
               "vae": json.loads((work / "vae" / "metrics.json").read_text()),
               "stage_seconds_this_run": {k: round(v, 1) for k, v in timings.items()},
               "config": asdict(cfg)}
    _write_json(out / "quality.json", report)
    log(f"build: done -> {out}; single-object class {report['single_object']['class_present']:.2f} "
        f"colour {report['single_object']['colour_present']:.2f}; evaluator retrieval "
        f"{report['evaluator']['top1_caption_retrieval_full']:.2f}; base weights {size_mb:.1f} MB")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m multiconcept.toyworld.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="where base/, evaluator/, quality.json, samples.png go")
    ap.add_argument("--work", required=True, help="checkpoints, caches and build.log (resumable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="UNet training steps (default 12000)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--max-unet-hours", type=float, default=None, help="stop UNet training after this long")
    ap.add_argument("--text-encoder", choices=TEXT_ENCODERS, default=BuildConfig.text_encoder,
                    help="the base's text encoder: the evaluator's text tower trained with the UNet (default), "
                         "frozen, or trained from scratch")
    ap.add_argument("--prediction-type", choices=("v_prediction", "epsilon"), default=BuildConfig.prediction_type,
                    help="what the UNet predicts (default v_prediction)")
    ap.add_argument("--noise-schedule", choices=sorted(NOISE_SCHEDULES), default=BuildConfig.noise_schedule,
                    help="training betas (default scaled_linear_zero_snr, which needs v_prediction)")
    ap.add_argument("--snr-gamma", type=float, default=BuildConfig.snr_gamma,
                    help="Min-SNR-γ loss weighting, e.g. 5 (default off)")
    ap.add_argument("--noise-offset", type=float, default=BuildConfig.noise_offset,
                    help="offset noise std, e.g. 0.1 for epsilon-prediction (default 0: off)")
    ap.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLINGS, default=BuildConfig.timestep_sampling,
                    help="training timesteps: uniform, logit_normal (t/T = sigmoid(N(mean, std))) "
                         "or mixed (half of each; default)")
    ap.add_argument("--timestep-mean", type=float, default=BuildConfig.timestep_mean,
                    help="logit-normal mean (default 1.0)")
    ap.add_argument("--timestep-std", type=float, default=BuildConfig.timestep_std,
                    help="logit-normal std (default 1.0)")
    ap.add_argument("--easy-share", type=float, default=BuildConfig.easy_share,
                    help="share of each batch from single-object scenes with full captions (default 0)")
    ap.add_argument("--base-layout", choices=BASE_LAYOUTS, default=BuildConfig.base_layout,
                    help="base training scenes: fixed (default: one centred object or a left/right pair) "
                         "or free (five positions, two sizes, 1-3 objects)")
    ap.add_argument("--caption-colour-p", type=float, default=BuildConfig.caption_colour_p,
                    help="share of objects whose colour the base's captions say (default 0.75)")
    ap.add_argument("--monitor-every", type=int, default=None, help="UNet steps between checker scores (default 2000)")
    ap.add_argument("--smoke", action="store_true", help="tiny step counts: prove every stage in ~2 min")
    ap.add_argument("--no-resume", action="store_true", help="discard this work dir's checkpoints")
    ap.add_argument("--quiet", action="store_true", help="log to WORK/build.log only")
    args = ap.parse_args(argv)
    settings = dict(threads=args.threads, max_unet_hours=args.max_unet_hours, text_encoder=args.text_encoder,
                    prediction_type=args.prediction_type, noise_schedule=args.noise_schedule, snr_gamma=args.snr_gamma,
                    noise_offset=args.noise_offset,
                    timestep_sampling=args.timestep_sampling, timestep_mean=args.timestep_mean,
                    timestep_std=args.timestep_std, easy_share=args.easy_share, base_layout=args.base_layout,
                    caption_colour_p=args.caption_colour_p)
    if args.monitor_every:
        settings["monitor_every"] = args.monitor_every
    cfg = (BuildConfig.smoke if args.smoke else BuildConfig)(**settings)
    try:
        validate(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    build(args.out, args.work, seed=args.seed, steps=args.steps, resume=not args.no_resume,
          progress=not args.quiet, config=cfg)


if __name__ == "__main__":
    main()
