"""optaccum: gradient accumulation for JAX, built on Optax.

The top level holds the core: `accumulate` (the transformation),
`apply_gradients` (its fast path), `microbatch` (accumulation inside one step),
`flush` and `status`. The rest lives in sub-namespaces named after what they
hold: `skip`, `flax`, `parallel`, `checkpoint`, `planning` and `compat`.
"""

from optaccum import checkpoint as checkpoint
from optaccum import compat as compat
from optaccum import flax as flax
from optaccum import parallel as parallel
from optaccum import planning as planning
from optaccum import skip as skip
from optaccum._accumulate import accumulate as accumulate
from optaccum._accumulator import stochastic_bfloat16 as stochastic_bfloat16
from optaccum._apply import apply_gradients as apply_gradients
from optaccum._closure import batch_as_argument as batch_as_argument
from optaccum._flush import flush as flush
from optaccum._inspect import Status as Status
from optaccum._inspect import status as status
from optaccum._microbatch import microbatch as microbatch
from optaccum._state import AccumulateState as AccumulateState
from optaccum._statistics import WindowStatistics as WindowStatistics

__version__ = "0.3.0.dev0"

__all__ = [
  "AccumulateState",
  "Status",
  "WindowStatistics",
  "accumulate",
  "apply_gradients",
  "batch_as_argument",
  "checkpoint",
  "compat",
  "flax",
  "flush",
  "microbatch",
  "parallel",
  "planning",
  "skip",
  "status",
  "stochastic_bfloat16",
]
