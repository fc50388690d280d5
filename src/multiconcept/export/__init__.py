"""Export a bundle as files other tools load, with no multiconcept import.

- ``diffusers``: diffusers' own layouts (diffusers.py);
- ``a1111`` / ``comfyui`` / ``kohya``: kohya's layouts, which all three read (tools.py): embeddings,
  LoRA with the bundle's alpha, Custom Diffusion / DisenDiff deltas as a LoRA by truncated SVD (svd.py).
"""

from .diffusers import CD_WEIGHTS, LORA_WEIGHTS, custom_diffusion_state_dict, export_diffusers, load_exported_into
from .files import check_out_dir, token_file, token_name
from .tools import DEFAULT_RANK, TOOLS, ToolExport, export_for_tools

FORMATS = ("diffusers", *TOOLS)

__all__ = ["CD_WEIGHTS", "DEFAULT_RANK", "FORMATS", "LORA_WEIGHTS", "TOOLS", "ToolExport", "check_out_dir",
           "custom_diffusion_state_dict", "export_diffusers", "export_for_tools", "load_exported_into", "token_file",
           "token_name"]
