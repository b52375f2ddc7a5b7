"""optaccum: gradient accumulation for JAX, built on Optax."""

from optaccum._accumulate import accumulate as accumulate
from optaccum._accumulate import flush as flush
from optaccum._accumulator import stochastic_bfloat16 as stochastic_bfloat16
from optaccum._apply import apply_gradients as apply_gradients
from optaccum._batch_norm import BatchStatsWindow as BatchStatsWindow
from optaccum._batch_norm import merge_batch_stats as merge_batch_stats
from optaccum._checkpoint import checkpoint_metadata as checkpoint_metadata
from optaccum._checkpoint import restore_checkpoint as restore_checkpoint
from optaccum._checkpoint import save_checkpoint as save_checkpoint
from optaccum._closure import batch_as_argument as batch_as_argument
from optaccum._data_parallel import data_parallel as data_parallel
from optaccum._evaluation import Evaluation as Evaluation
from optaccum._evaluation import EvaluationRow as EvaluationRow
from optaccum._evaluation import evaluate as evaluate
from optaccum._flax import apply_nnx_gradients as apply_nnx_gradients
from optaccum._flax import apply_train_state_gradients as apply_train_state_gradients
from optaccum._flax import flax_gradient_step as flax_gradient_step
from optaccum._inspect import accumulation_state as accumulation_state
from optaccum._inspect import gradient_step as gradient_step
from optaccum._inspect import has_updated as has_updated
from optaccum._inspect import num_empty_windows as num_empty_windows
from optaccum._inspect import num_skipped as num_skipped
from optaccum._inspect import num_skipped_windows as num_skipped_windows
from optaccum._microbatch import microbatch as microbatch
from optaccum._multisteps import MultiSteps as MultiSteps
from optaccum._multisteps import MultiStepsState as MultiStepsState
from optaccum._per_replica import per_replica as per_replica
from optaccum._planning import Plan as Plan
from optaccum._planning import PlanRow as PlanRow
from optaccum._planning import plan as plan
from optaccum._scaling import scale_learning_rate as scale_learning_rate
from optaccum._skip import SkipPolicy as SkipPolicy
from optaccum._skip import skip_large_updates as skip_large_updates
from optaccum._skip import skip_not_finite as skip_not_finite
from optaccum._state import AccumulateState as AccumulateState
from optaccum._statistics import WindowStatistics as WindowStatistics
from optaccum._statistics import window_statistics as window_statistics

__version__ = "0.1.0"

__all__ = [
  "AccumulateState",
  "BatchStatsWindow",
  "Evaluation",
  "EvaluationRow",
  "MultiSteps",
  "MultiStepsState",
  "Plan",
  "PlanRow",
  "SkipPolicy",
  "WindowStatistics",
  "accumulate",
  "accumulation_state",
  "apply_nnx_gradients",
  "apply_train_state_gradients",
  "batch_as_argument",
  "checkpoint_metadata",
  "data_parallel",
  "evaluate",
  "flax_gradient_step",
  "flush",
  "gradient_step",
  "has_updated",
  "merge_batch_stats",
  "microbatch",
  "num_empty_windows",
  "num_skipped",
  "num_skipped_windows",
  "per_replica",
  "plan",
  "restore_checkpoint",
  "save_checkpoint",
  "scale_learning_rate",
  "skip_large_updates",
  "skip_not_finite",
  "stochastic_bfloat16",
  "window_statistics",
]
