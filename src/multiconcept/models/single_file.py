"""Single-file checkpoints as a base (`--base FILE.safetensors`): SD 1.x, SD 2.x and SDXL as AUTOMATIC1111,
ComfyUI and kohya's sd-scripts hold them, FLUX.1 and SD3 / 3.5 as Black Forest Labs, Stability and ComfyUI ship
them, and FLUX.2 [klein]'s transformer as BFL ships it, loaded by diffusers' `from_single_file`.

What the file is comes from its safetensors header alone, before any tensor is read: the length-prefixed
JSON naming every tensor's dtype, shape and byte range (a file shorter than its last range is truncated).
The family comes from the text encoders' keys (the original layouts: export/original_layout.py):
``cond_stage_model.transformer.`` is SD 1.x's CLIP, ``cond_stage_model.model.`` SD 2.x's OpenCLIP,
``conditioner.embedders.1.model.`` SDXL's second encoder; or from the transformer's: ``joint_blocks.`` SD3,
``double_blocks.`` FLUX, FLUX.2 when it has ``single_stream_modulation``. diffusers then takes the configs from `config`
(a diffusers folder or hub id: `--base-config`) or, without one, from the hub repository it picks for the
file (which needs the network or its cache). Nothing is ever unpickled: `.ckpt`, `.pt`, `.pth` and `.bin`
files, and pickles renamed `.safetensors`, are refused before they are opened as anything but bytes.

The flow transformers (flow_layout.py has their names): a FLUX.1 or SD3 file goes through the pipeline's
`from_single_file` (with `--base-config` supplying the parts the file lacks; BFL's FLUX.1 file is the transformer
alone, and then the pipeline's `from_pretrained` gives the rest), except FLUX.1's transformer, which is read here,
one tensor at a time, with flow_layout's map: diffusers 0.42's FLUX.1 reader
splits a single-stream block's fused `linear1` at FLUX.1's own widths (3072, MLP 4x) only, and a test checks this
map against that reader at those widths. Flux2KleinPipeline has no `from_single_file` in diffusers 0.42; its
transformer has (`Flux2Transformer2DModel.from_single_file`, BFL's FLUX.2 names), so a FLUX.2 [klein] file is the
transformer and `--base-config` (a klein pipeline) gives the rest.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, gist, is_dir, is_file, require
from .flow_layout import FILE_PARTS, TRANSFORMER_PREFIX, VAE_PREFIXES, read_transformer

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
FAMILIES = {  # a text encoder key prefix -> the architecture (models.ARCHITECTURES) it belongs to
    "conditioner.embedders.1.model.": "sdxl",
    "cond_stage_model.model.": "sd2",
    "cond_stage_model.transformer.": "sd1",
}
PIPELINE_OF = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
               "flux1": "FluxPipeline", "flux2": "Flux2KleinPipeline", "sd3": "StableDiffusion3Pipeline"}
NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux1": "FLUX.1", "flux2": "FLUX.2", "sd3": "SD3"}
# where an SD 1.x / 2.x / SDXL file keeps the parts besides its UNet (the flow transformers': flow_layout.FILE_PARTS)
SD_PARTS = {"text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
            "text_encoder_2": ("conditioner.embedders.1.",), "vae": ("first_stage_model.",)}
# the hub repositories diffusers takes FLUX.1's configs from when no --base-config is given (by the guidance input)
FLUX1_CONFIGS = {True: "black-forest-labs/FLUX.1-dev", False: "black-forest-labs/FLUX.1-schnell"}
# FLUX.1 transformers whose image input also takes a mask or a control image (diffusers: flux-fill, flux-depth)
FLUX1_NOT_TEXT_TO_IMAGE = {384: "Fill (inpainting)", 128: "Depth / Canny (control)"}
HEADER_LIMIT = 100 * 2 ** 20  # safetensors' own cap on the JSON header
CONVERT = ("download the model's .safetensors version, or convert this file once, somewhere you trust it "
           "(torch.load(f, weights_only=True), then safetensors.torch.save_file), and pass that")


@dataclass(frozen=True)
class SingleFile:
    """A single-file checkpoint and, optionally, the diffusers configs that fit it (`--base-config`)."""

    path: Path
    config: str | None = None

    def __str__(self) -> str:
        return str(self.path)


def is_checkpoint_path(name) -> bool:
    """Whether a --base names a file by its suffix (.safetensors, or a pickle format refused when loaded)."""
    if isinstance(name, SingleFile):
        return True
    return isinstance(name, str) and Path(name).suffix.lower() in (SUFFIX, *PICKLE_SUFFIXES) and not is_dir(name)


def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """({tensor name: {dtype, shape, data_offsets}}, metadata) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        not_safetensors = f"{path} is not a safetensors file (its first bytes are no safetensors header): pass a " \
                          f"single-file SD 1.x, SD 2.x, SDXL, FLUX.1, FLUX.2 [klein] or SD3 checkpoint (.safetensors), " \
                          "or a diffusers folder"
        # safetensors: an 8-byte length, then the JSON header's "{"; PyTorch's formats: a zip, or a raw pickle
        if head[8:9] != b"{" and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
            raise UserError(f"{path} is a PyTorch pickle (zip or pickle bytes), not safetensors, whatever its name says; "
                            f"multiconcept never unpickles a file (loading one can run any code inside it): {CONVERT}")
        require(len(head) == 9 and head[8:9] == b"{", not_safetensors)
        (n,) = struct.unpack("<Q", head[:8])
        require(0 < n <= HEADER_LIMIT, not_safetensors)
        require(8 + n <= size, f"{path} is truncated ({size:,} bytes, but its header alone claims {8 + n:,}): "
                               "download it again")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(not_safetensors) from e
    require(isinstance(header, dict), not_safetensors)
    meta = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise UserError(not_safetensors) from e
    require(8 + n + end <= size, f"{path} is truncated ({size:,} bytes of the {8 + n + end:,} its header describes): "
                                 "download it again")
    return header, meta


def checkpoint_family(path: Path, header: dict, meta: dict) -> str | None:
    """"sd1", "sd2" or "sdxl" from the text encoders' keys, "flux1", "flux2" or "sd3" from the transformer's; None when
    the file holds a UNet but no text encoder to tell; a UserError naming what the file is when it is none of these."""
    keys = set(header)
    require("multiconcept" not in meta, f"{path} is a multiconcept bundle, not a base checkpoint: pass it with -b, "
                                        "and the checkpoint it was learned on as --base")
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or ".lora." in k for k in keys):
        raise UserError(f"{path} is a LoRA, not a checkpoint: add it with `generate --lora {path}`, "
                        "and pass the checkpoint it was made for as --base")
    if keys & {"emb_params", "string_to_param", "clip_l", "clip_g"} or (keys and len(keys) <= 2 and UNET_IN not in keys):
        raise UserError(f"{path} is a textual-inversion embedding, not a checkpoint: add it with "
                        f"`generate --embedding {path}`, and pass a checkpoint as --base")
    if UNET_IN not in keys:
        flow = flow_family(path, header)
        if flow is not None:
            return flow
        if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
            raise UserError(f"{path} holds one diffusers model (its keys are diffusers' names), not a whole checkpoint: "
                            "pass the diffusers pipeline folder it belongs to, or a single-file checkpoint")
        raise UserError(f"{path} is not a Stable Diffusion, FLUX or SD3 checkpoint (it has no {UNET_IN}, "
                        "double_blocks or joint_blocks): pass a single-file SD 1.x, SD 2.x, SDXL, FLUX.1, FLUX.2 [klein] "
                        "or SD3 checkpoint, or a diffusers folder")
    channels = header[UNET_IN].get("shape", [0, 0])[1]
    require(channels == 4, f"{path}'s UNet takes {channels} input channels (an inpainting or instruct-pix2pix model), "
                           "not a text-to-image model's 4: pass a text-to-image checkpoint")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise UserError(f"{path} is an SDXL refiner (one OpenCLIP encoder, no CLIP ViT-L), which learns no concepts: "
                        "pass an SDXL base checkpoint")
    return next((arch for prefix, arch in FAMILIES.items() if any(k.startswith(prefix) for k in keys)), None)


def flow_family(path: Path, header: dict) -> str | None:
    """"flux1", "flux2" or "sd3" from a transformer's original names (flow_layout.py); None for no flow transformer."""
    names = {k.removeprefix(TRANSFORMER_PREFIX) for k in header}
    if any(k.startswith("joint_blocks.") for k in names):
        return "sd3"
    if not any(k.startswith("double_blocks.") for k in names):
        return None
    if "single_stream_modulation.lin.weight" in names:  # FLUX.2 modulates every block from shared projections
        return "flux2"
    width = (header.get(TRANSFORMER_PREFIX + "img_in.weight") or header.get("img_in.weight") or {}).get("shape", [0, 0])[1]
    require(width not in FLUX1_NOT_TEXT_TO_IMAGE,
            f"{path} is a FLUX.1 {FLUX1_NOT_TEXT_TO_IMAGE.get(width)} model (its image input takes {width} channels), "
            "not text-to-image: pass a FLUX.1 [dev] or [schnell] checkpoint")
    return "flux1"


def pipeline_for(src: SingleFile, family: str | None):
    """The diffusers pipeline class for the file: its family's, checked against --base-config's when that is a folder."""
    import diffusers

    from . import pipeline_class

    config_class = None
    if src.config is not None:
        looks_local = is_dir(src.config) or Path(src.config).exists() or src.config.startswith((".", "/", "~"))
        if looks_local:
            require(is_dir(src.config) and is_file(Path(src.config) / "model_index.json"),
                    f"--base-config {src.config} is not a diffusers pipeline folder (no model_index.json): pass the "
                    "folder (save_pretrained) or hub id of a pipeline of the checkpoint's family")
            config_class = pipeline_class(src.config).__name__
    if family is None:
        require(config_class is not None,
                f"{src.path} holds a UNet but no text encoder by which its family (SD 1.x, SD 2.x or SDXL) can be told: "
                "pass --base-config DIR, a diffusers pipeline folder of the same family (it also supplies the text "
                "encoders and VAE the file lacks)")
        return getattr(diffusers, config_class)
    require(family != "flux2" or src.config is not None,
            f"{src.path} is a FLUX.2 transformer: pass --base-config DIR_OR_HUB_ID, the FLUX.2 [klein] pipeline it belongs "
            "to (diffusers 0.42 loads klein's transformer from a single file, its text encoder and VAE from the pipeline; "
            "the file alone cannot tell klein from FLUX.2 [dev])")
    want = PIPELINE_OF[family]
    require(config_class in (None, want),
            f"{src.path} is {_a(NAMES[family])} checkpoint but --base-config {src.config} holds a {config_class}: "
            f"pass the configs of {_a(NAMES[family])} pipeline ({want})")
    return getattr(diffusers, want)


def _a(name: str) -> str:
    return ("an " if name.startswith("S") else "a ") + name  # "an SD 1.x", "a FLUX.1"


def parts_from_config(src: SingleFile, family: str | None, header: dict, dtype: torch.dtype) -> dict:
    """{component: model} for the text encoders and VAE a file lacks, from the --base-config folder. diffusers'
    from_single_file would look for them there under diffusers' own weight file names only, which a folder's
    transformers models (model.safetensors) do not use; the family was told from the text encoders, so a file
    without them comes here only with a folder."""
    import diffusers
    import transformers

    if family in FILE_PARTS:
        prefixes = {c: VAE_PREFIXES if c == "vae" else (p,) for c, p in FILE_PARTS[family].items()}
    else:
        prefixes = SD_PARTS
    has = {c: any(k.startswith(p) for k in header) for c, p in prefixes.items()}
    if all(has.values()) or src.config is None or not is_dir(src.config):
        return {}
    index = json.loads((Path(src.config) / "model_index.json").read_text())
    parts = {}
    for name, present in has.items():
        library, class_name = (index.get(name) or [None, None])[:2]
        if not present and library in ("diffusers", "transformers"):
            model_class = getattr(diffusers if library == "diffusers" else transformers, class_name)
            parts[name] = model_class.from_pretrained(src.config, subfolder=name, dtype=dtype)
    return parts


class _Tensors:
    """The tensors of an open safetensors file by name, each read when asked (a transformer's, not the whole file)."""

    def __init__(self, f):
        self.f, self.names = f, set(f.keys())

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, name):
        return self.f.get_tensor(name)


def flux1_transformer(src: SingleFile, header: dict, dtype: torch.dtype):
    """FLUX.1's transformer from the file, read with flow_layout's map into a model of --base-config's config (or the
    hub's [dev] / [schnell] config, by the file's guidance input): see the module's docstring for why not diffusers'."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    guided = any(k.removeprefix(TRANSFORMER_PREFIX).startswith("guidance_in.") for k in header)
    config = FluxTransformer2DModel.load_config(src.config or FLUX1_CONFIGS[guided], subfolder="transformer")
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    with safe_open(str(src.path), framework="pt") as f:
        state = read_transformer("flux1", model, _Tensors(f), src.path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def flux2_transformer(src: SingleFile, header: dict, dtype: torch.dtype):
    """FLUX.2's transformer by diffusers' own reader, given the file's transformer tensors (its converter expects them
    without ComfyUI's ``model.diffusion_model.`` prefix)."""
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    prefix = TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX) for k in header) else ""
    with safe_open(str(src.path), framework="pt") as f:
        state = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return Flux2Transformer2DModel.from_single_file(state, config=src.config, subfolder="transformer", dtype=dtype)


def _same_width_clips(path: Path, header: dict) -> None:
    # diffusers tells SD3's CLIP-L from its CLIP-G in a file by their widths (768 and 1280 in SD3); equal widths
    # would load the first into both
    widths = [header.get(f"text_encoders.{c}.transformer.text_model.embeddings.position_embedding.weight",
                         {}).get("shape", [0, None])[1] for c in ("clip_l", "clip_g")]
    require(None in widths or widths[0] != widths[1],
            f"{path}'s CLIP-L and CLIP-G are both {widths[0]} wide, so diffusers' reader cannot tell them apart: pass a "
            "file without its text encoders, with --base-config naming the pipeline whose encoders it uses")


def _load(src: SingleFile, family: str | None, cls, header: dict, dtype: torch.dtype):
    if family == "flux2":
        transformer = flux2_transformer(src, header, dtype)
        return cls.from_pretrained(src.config, transformer=transformer, dtype=dtype)
    if family == "flux1":
        transformer = flux1_transformer(src, header, dtype)
        if src.config is not None and not any(k.startswith((*VAE_PREFIXES, "text_encoders.")) for k in header):
            # BFL's file is the transformer alone: the rest comes from the pipeline, and the file is not read twice
            # (from_single_file would load all of it again to find nothing else there)
            return cls.from_pretrained(src.config, transformer=transformer, dtype=dtype)
    extra = parts_from_config(src, family, header, dtype)
    if family == "flux1":
        extra["transformer"] = transformer
    elif family == "sd3":
        _same_width_clips(src.path, header)
    elif cls.__name__ == "StableDiffusionPipeline":  # SD loads without its safety checker
        extra.update(safety_checker=None, requires_safety_checker=False)
    return cls.from_single_file(str(src.path), config=src.config, dtype=dtype, **extra)


def load_single_file(src: SingleFile, dtype: torch.dtype):
    """The pipeline in a single-file checkpoint, every weight loaded (see the module's docstring)."""
    path = src.path
    suffix = path.suffix.lower()
    require(suffix not in PICKLE_SUFFIXES,
            f"{path} is a pickle checkpoint ({suffix}); multiconcept never unpickles a file (loading one can run any "
            f"code inside it): {CONVERT}")
    require(suffix == SUFFIX, f"{path} is not a .safetensors file: pass a single-file checkpoint (.safetensors)")
    # diffusers picks its reader by the exact suffix: any other spelling would reach torch.load
    require(path.suffix == SUFFIX, f"{path} ends in {path.suffix}: rename it to end in {SUFFIX} (lower case)")
    require(is_file(path), f"base {path} does not exist: check the path")
    header, meta = read_safetensors_header(path)
    family = checkpoint_family(path, header, meta)
    cls = pipeline_for(src, family)
    try:
        pipe = _load(src, family, cls, header, dtype)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's file and configs: whatever diffusers raises means "does not fit"
        why = gist(e)
        if src.config is None:
            raise UserError(f"could not load {path} as {_a(NAMES[family])} checkpoint with the configs diffusers picks "
                            f"for it from the hub ({why}): offline, or the file has unusual shapes; pass --base-config "
                            f"DIR_OR_HUB_ID, a diffusers pipeline of the same model") from e
        raise UserError(f"{path} does not fit the configs of --base-config {src.config} ({why}): pass the diffusers "
                        f"pipeline this checkpoint was made from, or one of the same shapes") from e
    for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, part, None)
        if part.startswith("text_encoder") and model is not None:
            # diffusers loads a file's T5 into an empty model by name: transformers 5 ties its encoder's token table
            # to `shared` only when told again (from_pretrained does), and the file stores the table once
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta] if model is not None else []
        require(not missing, f"{path} lacks {len(missing)} of the {part}'s weights (e.g. {missing[0] if missing else ''}): "
                             "it is incomplete, or --base-config describes another model")
    return pipe
