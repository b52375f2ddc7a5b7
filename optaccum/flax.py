"""Flax adapters: linen `TrainState`, `nnx.Optimizer`, and BatchNorm statistics per window.

Importing this module does not import Flax; each function does when called.
"""

from optaccum._batch_norm import BatchStatsWindow as BatchStatsWindow
from optaccum._batch_norm import merge_batch_stats as merge_batch_stats
from optaccum._flax import apply_nnx_gradients as apply_nnx_gradients
from optaccum._flax import apply_train_state_gradients as apply_train_state_gradients
from optaccum._flax import flax_gradient_step as gradient_step

__all__ = [
  "BatchStatsWindow",
  "apply_nnx_gradients",
  "apply_train_state_gradients",
  "gradient_step",
  "merge_batch_stats",
]
