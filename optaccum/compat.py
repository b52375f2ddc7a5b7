"""For migration: `optax.MultiSteps`' interface and state on optaccum's core."""

from optaccum._multisteps import MultiSteps as MultiSteps
from optaccum._multisteps import MultiStepsState as MultiStepsState

__all__ = ["MultiSteps", "MultiStepsState"]
