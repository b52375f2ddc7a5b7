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

import dataclasses
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaccum import _validation

MODES = ("nearest", "stochastic")


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


def _key_from(where: str, value: Any) -> jax.Array:
  """A single typed PRNG key from a typed key, a raw uint32[2] key or an int seed."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    return jax.random.key(int(value))
  if isinstance(value, (jax.Array, np.ndarray)) and jnp.shape(value) == ():
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      return jnp.asarray(value)
  if isinstance(value, (jax.Array, np.ndarray)) and value.dtype == np.uint32:
    if value.shape == (2,):  # a raw key from `jax.random.PRNGKey`
      return jax.random.wrap_key_data(jnp.asarray(value))
  raise TypeError(
    f"`{where}(rounding_key=...)` must be a single jax.random.key or an int seed, "
    f"got rounding_key={value!r}."
  )


@dataclasses.dataclass(frozen=True)
class Rounding:
  """How each micro-step's sum is rounded into the accumulator.

  Attributes:
    mode: `"nearest"` or `"stochastic"`.
    key_data: with `"stochastic"`, the bits of the initial key (plain ints, so
      that the core stays hashable).
    key_impl: the name of that key's PRNG implementation.
  """

  mode: str = "nearest"
  key_data: tuple[int, ...] = ()
  key_impl: Any = None

  def init_key(self) -> Any:
    """The key kept in the state: its raw uint32 data, or () when nearest."""
    if self.mode == "nearest":
      return ()
    return jnp.asarray(self.key_data, jnp.uint32)

  def split_key(
    self, key_data: Any, accumulator: Any, axis_name: Hashable | None
  ) -> tuple[Any, Any]:
    """The state's next key, and a seed (two uint32 words) per leaf of `accumulator`.

    When rounding to nearest, the key stays () and every seed is None.
    """
    if self.mode == "nearest":
      return key_data, jax.tree.map(lambda _: None, accumulator)
    key, step_key = jax.random.split(jax.random.wrap_key_data(key_data, impl=self.key_impl))
    if axis_name is not None:
      # Replicas hold the same key; each must draw its own bits, or their
      # rounding errors would add up instead of averaging out.
      step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
    leaves, treedef = jax.tree.flatten(accumulator)
    seeds = jax.random.bits(step_key, (len(leaves), 2), jnp.uint32)
    return jax.random.key_data(key), jax.tree.unflatten(treedef, list(seeds))

  def add(self, accumulator: jax.Array, increment: jax.Array, seed: Any) -> jax.Array:
    """`accumulator + increment`, rounded into the accumulator's dtype."""
    if self.mode == "nearest":
      return accumulator + increment.astype(accumulator.dtype)
    # One rounding, of the sum formed exactly enough in float32.
    total = accumulator.astype(jnp.float32) + increment.astype(jnp.float32)
    return stochastic_round(total, seed)


def make_rounding(where: str, mode: Any, key: Any, accumulator_dtype: Any) -> Rounding:
  """Validates `accumulate`'s rounding arguments and builds the rounding."""
  _validation.check_choice(where, "rounding", mode, MODES)
  if mode == "nearest":
    if key is not None:
      raise ValueError(
        f"`{where}(rounding_key=...)` is used only with rounding='stochastic', "
        f"got rounding={mode!r} and a key."
      )
    return Rounding()
  if accumulator_dtype is None or jnp.dtype(accumulator_dtype) != jnp.bfloat16:
    name = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype).name
    raise ValueError(
      f"`{where}(rounding='stochastic')` rounds into bfloat16 only: pass "
      f"accumulator_dtype=jnp.bfloat16, got accumulator_dtype={name}."
    )
  if key is None:
    raise ValueError(
      f"`{where}(rounding='stochastic')` needs `rounding_key=`: a jax.random.key or an "
      "int seed, from which the rounding is reproducible."
    )
  key = _key_from(where, key)
  data = np.asarray(jax.random.key_data(key), np.uint32)
  return Rounding(
    mode=mode,
    key_data=tuple(int(word) for word in data.ravel()),
    key_impl=jax.random.key_impl(key),
  )
