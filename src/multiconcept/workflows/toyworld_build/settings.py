"""The build's settings: every knob, its validation, and the rule for resuming a work folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ...errors import UserError
from ...models.compiled import COMPILE_MODES
from .common import write_json

# One world. The field stays, with its one value, because every stage's checkpoint digest (stage_digest)
# and a work dir's state.json hold the whole config: a build started as world "creatures" resumes.
WORLD_NAMES = ("creatures",)
# The base's layouts are the world's fixed ones (toyworld.scenes.BASE_LAYOUTS); the field stays for the
# same reason as `world`. "free" (any place and size) kept the recipe from learning shapes
# (docs/toyworld.md, How the recipe was found) and lives in the tuning-free data only.
BASE_LAYOUT_NAMES = ("fixed",)


@dataclass
class BuildConfig:
    seed: int = 0
    world: str = "creatures"  # WORLD_NAMES
    # tokenizer
    bpe_vocab_size: int = 1600  # learned tokens incl. the byte alphabet; 256 end-of-word bytes are added after
    # The text context. SD's 77 left 64 padding tokens after a ToyWorld caption, and the
    # base UNet's near-uniform cross-attention read mostly them (fourth run: 59-90% of
    # each layer's mass on padding, 0.3-2.8% on the class noun). Captions are at most 32
    # tokens with BOS/EOS (median 17, 3,000 sampled); code reads tokenizer.model_max_length.
    max_length: int = 32
    # VAE (0.95 M params; PSNR 26.4 dB on held-out renders, docs/toyworld.md)
    world_pool: int = 20000  # renders of every appearance, for the VAE and the evaluator
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6  # as in SD's autoencoder: the posterior stays near-deterministic
    # Objects cover ~10% of pixels. With plain L1 the VAE spent 931 steps on backgrounds
    # and drew every object as a brown blob (19.3 dB); MSE with object pixels weighted
    # 5x (and lr 2e-3) reached the same PSNR in ~130 steps, in colour.
    vae_object_weight: float = 4.0  # extra loss weight on object pixels
    vae_max_minutes: float | None = 60.0
    # evaluator CLIP
    evaluator_steps: int = 2000
    evaluator_batch: int = 64
    evaluator_lr: float = 5e-4
    evaluator_max_minutes: float | None = 12.0
    # text encoder + UNet (batch 16, AdamW 3e-4 with warm-up, clip 1.0, 10% caption dropout)
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
    # step 1,000, 0.06 at 2,000 — no better; docs/toyworld.md, How the recipe was found.)
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
    # nearly uniform, mostly on padding tokens; docs/toyworld.md, How the recipe was found).
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
    # t = 832, and the class word never steered it (docs/toyworld.md, How the recipe was found). "mixed": half the
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
    base_layout: str = "fixed"  # BASE_LAYOUT_NAMES
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
    ema_decay: float = 0.995  # raw and EMA weights are both kept; the better on the checker ships
    max_unet_hours: float | None = None
    # The max_* caps bound a stage's training time: the cosine schedule runs on
    # max(step fraction, time fraction), so a capped stage still anneals fully and
    # its report says how many steps it got. Uncapped, the build is deterministic.
    # evaluation and shipping
    eval_seeds: int = 2  # images per single-object prompt
    sample_steps: int = 30
    guidance: float = 4.0  # the quality report's and the evidence's guidance (docs/toyworld.md)
    monitor_every: int = 2000  # steps between quick checker scores during UNet training
    checkpoint_minutes: float = 5.0
    threads: int = 2
    compile: str = "off"  # on: the UNet stage's UNet compiled (models/compiled.py); a runtime field, as threads

    def __post_init__(self):
        validate(self)

    @classmethod
    def smoke(cls, **kw) -> "BuildConfig":
        """Every stage and code path with tiny step counts: about two minutes on 2 cores."""
        return cls(**dict(world_pool=512, vae_steps=30, vae_batch=16, evaluator_steps=20, evaluator_batch=32,
                          base_pool=512, unet_steps=40, warmup=10, eval_seeds=1, sample_steps=4,
                          monitor_every=20, checkpoint_minutes=0.1) | kw)

    @classmethod
    def quick(cls, **kw) -> "BuildConfig":
        """Every stage end to end in under a minute on 2 cores (the test suite's proof that the build runs)."""
        return cls(**dict(world_pool=64, vae_steps=2, vae_batch=4, evaluator_steps=2, evaluator_batch=8,
                          base_pool=64, unet_steps=3, unet_batch=4, warmup=1, eval_seeds=1, sample_steps=2,
                          monitor_every=2, checkpoint_minutes=0.1) | kw)


# Values of fields that did not exist when an older work dir was started.


_RUNTIME_FIELDS = {"unet_steps", "max_unet_hours", "vae_max_minutes", "evaluator_max_minutes", "monitor_every",
                   "checkpoint_minutes", "threads", "eval_seeds", "sample_steps", "guidance", "compile"}

# Prompt vocabulary beyond the world, so "a photo of <tok> star on the beach"
# tokenizes into whole words (DreamBooth's DreamBench prompt templates).


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


TEXT_ENCODERS = ("evaluator-tuned", "evaluator", "scratch")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mixed")


def check_state(work: Path, cfg: BuildConfig, resume: bool) -> None:
    state_path = work / "state.json"
    if state_path.exists() and resume:
        old = json.loads(state_path.read_text())["config"]
        diff = {f.name: (old.get(f.name), getattr(cfg, f.name)) for f in fields(cfg)
                if f.name not in _RUNTIME_FIELDS and old.get(f.name) != getattr(cfg, f.name)}
        if diff:
            raise UserError(f"{work} holds a build with other settings {diff}: "
                            f"pass --no-resume (resume=False) or another --work folder")
    if not resume:
        for name in ("tokenizer", "vae", "evaluator", "encoder", "unet_final", *CHECKPOINTS.values(), "base_pool.safetensors",
                     "base_pool.json", "state.json"):
            p = work / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    write_json(state_path, {"config": asdict(cfg)})


OPTION_NAMES = {"unet_steps": "steps"}  # settings whose `toyworld build` option has another name


def validate(cfg: BuildConfig) -> None:
    """Every setting checked once, before any work: one line naming it (and its
    `multiconcept toyworld build` option) and what it may be."""
    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            flag = "--" + OPTION_NAMES.get(name, name).replace("_", "-")
            raise UserError(f"{name} ({flag}) {rule}, got {getattr(cfg, name)!r}")

    def choose(name: str, options) -> None:
        need(getattr(cfg, name) in options, name, f"must be one of {', '.join(options)}")

    for name in ("unet_steps", "vae_steps", "evaluator_steps", "threads", "unet_batch", "vae_batch", "evaluator_batch"):
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    choose("world", WORLD_NAMES)
    choose("compile", COMPILE_MODES)
    choose("text_encoder", TEXT_ENCODERS)
    choose("prediction_type", ("v_prediction", "epsilon"))
    choose("noise_schedule", sorted(NOISE_SCHEDULES))
    need(cfg.prediction_type == "v_prediction" or not NOISE_SCHEDULES[cfg.noise_schedule].get("rescale_betas_zero_snr"),
         "noise_schedule", "has zero terminal SNR, where only v_prediction is defined: "
                           "use it with --prediction-type v_prediction")
    choose("timestep_sampling", TIMESTEP_SAMPLINGS)
    choose("base_layout", BASE_LAYOUT_NAMES)
    need(cfg.snr_gamma is None or cfg.snr_gamma > 0, "snr_gamma", "must be positive")
    need(cfg.timestep_std > 0, "timestep_std", "must be positive")
    need(0 < cfg.caption_colour_p <= 1, "caption_colour_p", "must be within (0, 1]")
    need(0 <= cfg.easy_share <= 1, "easy_share", "must be within [0, 1]")
    need(0 <= cfg.noise_offset < 1, "noise_offset", "must be within [0, 1)")
    need(cfg.max_unet_hours is None or cfg.max_unet_hours > 0, "max_unet_hours", "must be positive")


CHECKPOINTS = {"vae": "ckpt_vae.safetensors", "evaluator": "ckpt_evaluator.safetensors",
               "encoder": "ckpt_encoder.safetensors", "unet": "ckpt_unet.safetensors"}


def clip_names(cfg: BuildConfig) -> tuple[str, ...]:
    """The CLIPs a build trains, by one recipe: the evaluator (CLIP-I/T; no method uses it) and the encoder,
    whose text tower starts the base's text encoder and whose image tower the tuning-free methods start from."""
    return ("evaluator", "encoder")


def stage_digest(cfg: BuildConfig, stage: str) -> str:
    """What a stage's checkpoint must have been made with to be resumed."""
    fixed = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps({"stage": stage, "config": fixed}, sort_keys=True).encode()).hexdigest()[:16]
