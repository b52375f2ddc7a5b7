"""optaccum: gradient accumulation for JAX, built on Optax."""

from optaccum._accumulate import AccumulateState as AccumulateState
from optaccum._accumulate import accumulate as accumulate
from optaccum._accumulate import flush as flush
from optaccum._apply import apply_gradients as apply_gradients
from optaccum._apply import apply_gradients_to_state as apply_gradients_to_state
from optaccum._inspect import accumulation_state as accumulation_state
from optaccum._inspect import gradient_step as gradient_step
from optaccum._inspect import has_updated as has_updated
from optaccum._multisteps import MultiSteps as MultiSteps
from optaccum._multisteps import MultiStepsState as MultiStepsState
from optaccum._scaling import scale_learning_rate as scale_learning_rate
from optaccum._skip import SkipPolicy as SkipPolicy
from optaccum._skip import skip_large_updates as skip_large_updates
from optaccum._skip import skip_not_finite as skip_not_finite

__version__ = "0.1.0"

__all__ = [
  "AccumulateState",
  "MultiSteps",
  "MultiStepsState",
  "SkipPolicy",
  "accumulate",
  "accumulation_state",
  "apply_gradients",
  "apply_gradients_to_state",
  "flush",
  "gradient_step",
  "has_updated",
  "scale_learning_rate",
  "skip_large_updates",
  "skip_not_finite",
]
