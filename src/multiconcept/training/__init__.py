"""Training: the one loop (loop.py) and its checkpoint format (checkpoint.py)."""

from .checkpoint import discard_checkpoint, remove_stale_temps
from .loop import LoopSettings, Outcome, Progress, TrainingDiverged, make_accelerator, run, step_seed

__all__ = ["LoopSettings", "Outcome", "Progress", "TrainingDiverged", "discard_checkpoint", "make_accelerator",
           "remove_stale_temps", "run", "step_seed"]
