"""Rounding the accumulator into bfloat16: to nearest, or stochastically.

A bfloat16 accumulator takes half the memory of a float32 one but keeps 8
significant bits. Rounded to nearest, a micro-batch gradient smaller than half
a unit in the last place of the running sum is dropped whole (swamping), and
the loss is a bias, not noise: a window of one large and many small gradients
loses the small ones every time. Stochastic rounding rounds up with probability
equal to the distance to the lower neighbour, so every rounding is exact in
expectation and the window's sum is unbiased however long the window.

The random bits come from a counter-based integer hash (lowbias32) of each
element's index, scrambled per leaf and per micro-step by two words that
`jax.random` draws from a key kept in the state, so a run is reproducible from
its key. On CPU, drawing threefry bits for every element makes a bare
stochastically rounded `acc + g` 18x slower than the hashed bits, which cost no
more than a float32 `acc + g` (benchmarks/accumulator_cost.py; numbers in
docs/precision_and_statistics.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _lowbias32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash with near-ideal avalanche (Wellons, 2018)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _element_index(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major flat index, modulo 2^32, built per dimension.

  Per-dimension iotas keep the index partitionable under sharding and never
  need an iota longer than one dimension; a leaf of more than 2^32 elements
  reuses indices, which correlates the rounding of elements 2^32 apart but
  leaves each one unbiased.
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dimension in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, dimension)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= shape[dimension]
  return index


def round_with_noise(x: jax.Array, noise: jax.Array) -> jax.Array:
  """Rounds float32 `x` to bfloat16 after adding `noise` (uint32 below 2^16) to its low bits.

  A bfloat16 is a float32 with its low 16 bits cut off. Adding a uniform random
  16-bit integer to those bits and cutting them off carries into the kept bits
  with probability (low bits) / 2^16: exactly the distance from `x` to its lower
  bfloat16 neighbour in units of their gap. Working on the magnitude bits, it is
  symmetric in sign; finite values beyond the largest bfloat16 may round to inf,
  as rounding to nearest does. Infinities and NaNs pass through.
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  # A finite float32 has bits <= 0xFF7FFFFF, so adding < 2^16 cannot wrap.
  rounded = ((bits + noise) >> 16).astype(jnp.uint16)
  rounded = jax.lax.bitcast_convert_type(rounded, jnp.bfloat16)
  # NaN payloads in the low bits could carry into inf; keep non-finite values as they are.
  return jnp.where(jnp.isfinite(x), rounded, x.astype(jnp.bfloat16))


def stochastic_round(x: jax.Array, seed: jax.Array) -> jax.Array:
  """Rounds float32 `x` to bfloat16, up with probability its distance to the lower neighbour.

  Args:
    x: a float32 array.
    seed: two uint32 words; equal seeds give equal roundings. The hash input
      is `index * (seed[0] | 1) + seed[1]`: a multiplier as well as an offset,
      since with an offset alone two seeds that differ in low bits would only
      permute the same noise among neighbouring elements.

  Returns:
    A bfloat16 array shaped like `x`.

  References:
    Gupta et al., 2015, "Deep Learning with Limited Numerical Precision".
    Wellons, 2018, "Prospecting for Hash Functions" (lowbias32).
  """
  counter = _element_index(x.shape) * (seed[0] | jnp.uint32(1)) + seed[1]
  return round_with_noise(x, _lowbias32(counter) & jnp.uint32(0xFFFF))
