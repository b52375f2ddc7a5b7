"""Test-wide settings: strict dtype promotion, so promotion bugs surface."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
