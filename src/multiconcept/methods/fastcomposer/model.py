"""The FastComposer model: conditioning, and its folder of safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...bundle import atomic_write
from ...errors import UserError, require
from ...models import Base, SingleFile, load_base
from ...models.fingerprint import same_weights
from ...models.flow import refuse_flow_base
from .config import CONFIG_FILE, MARKER, MODEL_FORMAT, MODEL_VERSION, FastComposerConfig, jsonable
from .encoder import FusionMLP, SubjectImageEncoder, fuse_subjects
from .markers import SubjectPrompt


class FastComposer(nn.Module):
    """Image encoder + fusion MLP on a base pipeline (whose UNet it may train)."""

    def __init__(self, base: Base, encoder: SubjectImageEncoder, fusion: FusionMLP | None = None):
        super().__init__()
        self.base = base
        self.encoder = encoder
        d = base.text_encoder.config.hidden_size
        require(base.unet.config.cross_attention_dim == d,
                f"the UNet reads {base.unet.config.cross_attention_dim}-d text but the text encoder writes {d}-d: "
                "not a usable base")
        self.fusion = (fusion if fusion is not None else FusionMLP(d, encoder.embed_dim)).to(base.device)

    @property
    def tokenizer(self):
        return self.base.tokenizer

    # -- conditioning

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Frozen text encoder: ``batch 77`` → ``batch 77 d``."""
        te = self.base.text_encoder
        return te(ids.to(self.base.device))[0].float()

    def condition(self, prompts: list[SubjectPrompt], crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-only, subject-augmented) embeddings ``batch 77 d``.

        crops[i] holds sample i's subject crops ``n_i 3 S S`` in marker order."""
        require(len(prompts) == len(crops), "one crop stack per prompt")
        ids = torch.stack([p.padded_ids(self.tokenizer) for p in prompts])
        text = self.encode_text(ids)
        where = [(i, pos) for i, p in enumerate(prompts) for pos in p.positions]
        for p, c in zip(prompts, crops):
            require(len(p.positions) == len(c), f"{len(p.positions)} marker(s) but {len(c)} crop(s) for {p.prompt!r}")
        if not where:
            return text, text
        embeds = self.encoder(torch.cat([c for c in crops if len(c)]).to(self.base.device))
        return text, fuse_subjects(self.fusion, text, embeds, where)

    # -- training

    def set_trainable(self, cfg: FastComposerConfig) -> dict[str, nn.Parameter]:
        """Freeze everything, unfreeze what `cfg` trains; return those by name."""
        for part in (self.base.unet, self.base.text_encoder, self.base.vae, self.encoder, self.fusion):
            part.requires_grad_(False)
        if cfg.train_unet:
            self.base.unet.requires_grad_(True)
        if cfg.train_fusion:
            self.fusion.requires_grad_(True)
        n = len(self.encoder.layers) if cfg.vision_layers < 0 else min(cfg.vision_layers, len(self.encoder.layers))
        for layer in list(self.encoder.layers)[len(self.encoder.layers) - n:]:
            layer.requires_grad_(True)
        return {name: p for name, p in self.named_parts() if p.requires_grad}

    def named_parts(self):
        yield from ((f"unet.{k}", p) for k, p in self.base.unet.named_parameters())
        yield from ((f"image_encoder.{k}", p) for k, p in self.encoder.vision.named_parameters())
        yield from ((f"fusion.{k}", p) for k, p in self.fusion.named_parameters())

    def named_trainables(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parts() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_trainables().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainables()
        missing = sorted(set(params) - set(state))
        if missing:
            raise UserError(f"the checkpoint lacks {len(missing)} trained tensor(s), e.g. {missing[0]}: "
                            "it was made with other settings; delete it to start over")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    # -- files

    def save(self, out: str | Path, meta: dict, unet: bool = True) -> Path:
        """Write the model folder; the JSON goes last, so its presence means complete."""
        out = Path(out)
        enc = self.encoder
        save_model_folder(
            out,
            fusion=self.fusion.state_dict(),
            image_encoder=enc.vision.state_dict(),
            unet=self.base.unet.state_dict() if unet else None,
            config={
                "base_name": self.base.name, "base_fingerprint": self.base.fingerprint, "base_weights": self.base.weights,
                "text_dim": self.fusion.text_dim, "image_dim": self.fusion.image_dim,
                "vision_config": enc.vision.config.to_dict(),
                "image_mean": enc.mean.flatten().tolist(), "image_std": enc.std.flatten().tolist(),
                **meta,
            },
        )
        return out

    @classmethod
    def load(cls, folder: str | Path, base: Base | str | SingleFile | None = None, device: str = "auto",
             dtype: str = "fp32") -> "FastComposer":
        """A model folder on its base; the base's fingerprint must match the recorded one."""
        folder = Path(folder)
        config = read_model_config(folder, CONFIG_FILE, MODEL_FORMAT, MODEL_VERSION, "a FastComposer",
                                   "`multiconcept train-encoder` or `multiconcept convert-fastcomposer`")
        base = base_for(folder, config, base, device, dtype)
        encoder = saved_image_encoder(folder, config).to(base.device, base.unet.dtype)
        fusion = FusionMLP(config["text_dim"], config["image_dim"])
        load_state_checked(fusion, read_tensors(folder / "fusion.safetensors"), "fusion MLP", folder)
        if (folder / "unet.safetensors").is_file():
            load_state_checked(base.unet, read_tensors(folder / "unet.safetensors"), "UNet", folder)
        model = cls(base, encoder, fusion.to(base.device))
        model.config = config
        return model.eval()


def read_model_config(folder: Path, name: str, fmt: str, version: int, what: str, written_by: str) -> dict:
    """A tuning-free model folder's JSON, checked for its format and version."""
    path = folder / name
    require(path.is_file(), f"{folder} is not {what} model folder (no {name}): pass a folder written by {written_by}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is damaged ({e}): re-run training or conversion") from e
    require(config.get("format") == fmt and config.get("version") == version,
            f"{path} is format {config.get('format')} v{config.get('version')}; this multiconcept reads "
            f"{fmt} v{version}: re-convert, re-train or upgrade")
    return config


def base_for(folder: Path, config: dict, base: Base | str | SingleFile | None, device: str, dtype: str) -> Base:
    """The base a model folder names (or the one given), checked against its recorded fingerprint."""
    what = "compose (FastComposer, Subject-Diffusion)"
    refuse_flow_base(base, what)
    if not isinstance(base, Base):
        base = load_base(base if base is not None else config["base_name"], device=device, dtype=dtype)
    refuse_flow_base(base, what)
    want = config.get("base_fingerprint")
    require(want is None or want == base.fingerprint,
            f"model {folder} was trained on base {config['base_name']!r} (fingerprint {want}) but the loaded base is "
            f"{base.name!r} ({base.fingerprint}): pass --base {config['base_name']}")
    require(same_weights(config.get("base_weights") or {}, base.weights),
            f"model {folder} was trained on base {config['base_name']!r}, whose weights differ from those of the loaded "
            f"base {base.name!r} (same configs and statistics, other weights): pass --base {config['base_name']}")
    return base


def saved_image_encoder(folder: Path, config: dict) -> SubjectImageEncoder:
    """The folder's image_encoder.safetensors as the vision config and pixel statistics in `config` say."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**_vision_kwargs(config["vision_config"])))
    load_state_checked(vision, read_tensors(folder / "image_encoder.safetensors"), "image encoder", folder)
    return SubjectImageEncoder(vision.eval(), config["image_mean"], config["image_std"])


def _vision_kwargs(d: dict) -> dict:
    skip = {"transformers_version", "model_type", "architectures", "torch_dtype", "dtype"}
    return {k: v for k, v in d.items() if k not in skip and not k.startswith("_")}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    require(path.is_file(), f"{path} is missing: the model folder is incomplete; re-run training or conversion")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}): re-run training or conversion") from e


def load_state_checked(module: nn.Module, state: dict, what: str, where: Path,
                       fix: str = "pass the base it was made for with --base") -> None:
    """Copy `state` into `module` if every name and shape fits, else one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = [f"missing e.g. {missing[0]}" if missing else "", f"unexpected e.g. {extra[0]}" if extra else "",
                f"shape {tuple(state[bad[0]].shape)} instead of {tuple(own[bad[0]].shape)} for {bad[0]}" if bad else ""]
    require(not (missing or extra or bad),
            f"the {what} weights in {where} do not fit ({'; '.join(p for p in problems if p)}): {fix}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def save_model_folder(out: Path, fusion: dict, image_encoder: dict, unet: dict | None, config: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, tensors: dict) -> None:
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(out / name, lambda tmp: save_file(cpu, tmp))

    put("fusion.safetensors", fusion)
    put("image_encoder.safetensors", image_encoder)
    if unet is not None:
        put("unet.safetensors", unet)
    elif (out / "unet.safetensors").exists():
        (out / "unet.safetensors").unlink()
    body = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "marker": MARKER, **config}
    text = json.dumps(body, indent=1, sort_keys=True, default=jsonable)
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
