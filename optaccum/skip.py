"""Per-micro-batch skip policies: which micro-batches never enter the window.

Pass one as `optaccum.accumulate(..., skip=...)` (or
`optaccum.compat.MultiSteps(..., should_skip_update_fn=...)`).
"""

from optaccum._skip import SkipPolicy as Policy
from optaccum._skip import skip_large_updates as large_updates
from optaccum._skip import skip_not_finite as not_finite

__all__ = ["Policy", "large_updates", "not_finite"]
