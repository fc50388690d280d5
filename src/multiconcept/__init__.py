"""multiconcept: multi-concept personalised text-to-image diffusion.

The Python API (multiconcept.api) is importable from here; it loads torch and
diffusers on first use, so `import multiconcept` stays cheap.
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402

_API = ("Bundle", "ComposeSettings", "Concept", "Progress", "SampleSettings", "SingleFile", "Source", "SubjectComposeSettings",
        "bake", "compose", "evaluate", "generate", "learn", "load_bundle")
__all__ = ["UserError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'multiconcept' has no attribute {name!r}")
