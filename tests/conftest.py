"""Test-wide settings."""

import jax

# Strict promotion makes every implicit dtype promotion an error, so a missing
# cast in optaccum surfaces in the tests rather than as a silent upcast.
jax.config.update("jax_numpy_dtype_promotion", "strict")
