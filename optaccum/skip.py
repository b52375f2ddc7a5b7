"""Skipping what should not reach the optimizer: micro-batches, and windows that spike.

The policies (`not_finite`, `large_updates`, any `Policy`) decide per micro-batch
which ones never enter the window: pass one as `optaccum.accumulate(..., skip=...)`
(or `optaccum.compat.MultiSteps(..., should_skip_update_fn=...)`). `spikes` wraps
the inner optimizer and skips a whole window's step when its gradient norm or loss
spikes above its recent history.
"""

from optaccum._skip import SkipPolicy as Policy
from optaccum._skip import skip_large_updates as large_updates
from optaccum._skip import skip_not_finite as not_finite
from optaccum._spikes import SpikeState as SpikeState
from optaccum._spikes import spikes as spikes

__all__ = ["Policy", "SpikeState", "large_updates", "not_finite", "spikes"]
