"""Training: the one loop (loop.py), its checkpoint format (checkpoint.py) and optimisers (optim.py)."""

from .checkpoint import discard_checkpoint, remove_stale_temps
from .loop import LoopSettings, Outcome, Progress, TrainingDiverged, make_accelerator, run, step_seed
from .optim import OPTIMIZERS, adamw, make_optimizer
from .processes import main_process_value, wrapper_syncs_gradients

__all__ = ["OPTIMIZERS", "LoopSettings", "adamw", "Outcome", "Progress", "TrainingDiverged", "discard_checkpoint",
           "main_process_value", "make_accelerator", "make_optimizer", "remove_stale_temps", "run", "step_seed",
           "wrapper_syncs_gradients"]
