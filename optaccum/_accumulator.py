"""The accumulator: its dtype, its rounding, and the arithmetic of a window's sum.

One implementation of "weigh, add, average" for both accumulations: the
cross-step transformation (`accumulate`, `MultiSteps`, `apply_gradients`) and
the in-step scan of `microbatch`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaccum import _replicas, _rounding
from optaccum._types import DTypeLike, PyTree

REDUCTIONS = ("mean", "sum")


def at_least_float32(dtype: DTypeLike) -> Any:
  """`dtype`, widened to float32 if narrower (without promotion, which strict mode forbids).

  Complex dtypes count by their parts: complex64 is kept.
  """
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _dtype_for(leaf_dtype: DTypeLike, requested: DTypeLike) -> Any:
  """The accumulator dtype of a leaf of `leaf_dtype` when `requested` is asked for.

  `requested` sets the precision and the leaf sets the kind, so a complex leaf
  is never summed in a real dtype (which would drop its imaginary part) and a
  real leaf never in a complex one. None widens the leaf's own dtype to at
  least 32 bits: bfloat16 and float16 to float32, float64 and complex dtypes
  kept as they are. Integer leaves (counts) sum as they are.
  """
  leaf_dtype = jnp.dtype(leaf_dtype)
  if not jnp.issubdtype(leaf_dtype, jnp.inexact):
    return leaf_dtype
  is_complex = jnp.issubdtype(leaf_dtype, jnp.complexfloating)
  if requested is None:
    return at_least_float32(leaf_dtype)
  if jnp.issubdtype(requested, jnp.complexfloating):
    return requested if is_complex else jnp.dtype(jnp.finfo(requested).dtype)
  if not is_complex:
    return requested
  # No complex dtype narrower than complex64: bfloat16 and float16 widen to it.
  return jnp.dtype(jnp.complex128 if requested.itemsize == 8 else jnp.complex64)


@dataclasses.dataclass(frozen=True)
class Accumulator:
  """What a window is summed into: a dtype and a rounding.

  Build one with `optaccum.stochastic_bfloat16(key)`, or pass a dtype (or
  None) as `accumulator=`; the fields are plain values, so that an
  accumulation stays hashable.

  Attributes:
    dtype: the precision of the sums; None widens each leaf's dtype to at
      least 32 bits.
    stochastic: whether each sum is rounded stochastically (into bfloat16).
    key_data: with `stochastic`, the bits of the initial key.
    key_impl: the name of that key's PRNG implementation.
  """

  dtype: DTypeLike = None
  stochastic: bool = False
  key_data: tuple[int, ...] = ()
  key_impl: Any = None

  def dtype_for(self, leaf_dtype: DTypeLike) -> Any:
    """The dtype in which a leaf of `leaf_dtype` is summed."""
    return _dtype_for(leaf_dtype, self.dtype)

  def zeros_like(
    self,
    where: str,
    leaf: jax.Array | jax.ShapeDtypeStruct,
    replicas: _replicas.Replicas = _replicas.Replicas(),
  ) -> jax.Array:
    """An empty accumulator for `leaf`, with its shape and sharding (one per replica on a mesh)."""
    dtype = self.dtype_for(jnp.result_type(leaf))
    if self.stochastic and dtype != jnp.bfloat16:
      raise ValueError(
        f"`{where}(accumulator=optaccum.stochastic_bfloat16(...))` rounds into bfloat16 "
        f"only, but a leaf of dtype {jnp.result_type(leaf).name} needs a {dtype.name} "
        "accumulator."
      )
    return replicas.zeros(where, leaf, dtype)

  def init_key(self) -> Any:
    """The key kept in the state: its raw uint32 data, or () when rounding to nearest."""
    return jnp.asarray(self.key_data, jnp.uint32) if self.stochastic else ()

  def split_key(
    self, key_data: jax.Array | tuple[()], tree: PyTree, replicas: _replicas.Replicas
  ) -> tuple[Any, Any]:
    """The state's next key, and a seed (two uint32 words) per leaf of `tree`.

    When rounding to nearest, the key stays () and every seed is None.
    """
    if not self.stochastic:
      return key_data, jax.tree.map(lambda _: None, tree)
    assert isinstance(key_data, jax.Array)
    key, step_key = jax.random.split(jax.random.wrap_key_data(key_data, impl=self.key_impl))
    # Replicas hold the same key; each must draw its own bits, or their
    # rounding errors would add up instead of averaging out.
    step_key = replicas.fold_key(step_key)
    leaves, treedef = jax.tree.flatten(tree)
    seeds = jax.random.bits(step_key, (len(leaves), 2), jnp.uint32)
    return jax.random.key_data(key), jax.tree.unflatten(treedef, list(seeds))

  def add(
    self,
    acc: jax.Array,
    x: jax.Array,
    weight: jax.Array | None = None,
    seed: jax.Array | None = None,
  ) -> jax.Array:
    """`acc + weight * x`, rounded into the accumulator's dtype.

    The weight multiplies in at least float32, so token counts stay exact.
    """
    if weight is not None:
      wide = at_least_float32(acc.dtype)
      x = x.astype(wide) * weight.astype(wide)
    if not self.stochastic:
      return acc + x.astype(acc.dtype)
    # One rounding, of the sum formed exactly enough in float32.
    total = acc.astype(jnp.float32) + x.astype(jnp.float32)
    assert seed is not None, "a stochastic accumulator draws a seed per leaf"
    return _rounding.stochastic_round(total, seed)


def inverse_weight(reduction: str, total_weight: jax.Array) -> jax.Array:
  """What a window's sum is multiplied by: 1 / total weight for a mean, else 1.

  A window of zero weight gets an infinite factor: callers never use it (a
  window of zero weight does not run; `microbatch` gives zeros for it). No
  select for that case here: XLA copies a scalar expression into every fusion
  that reads the gradient, and the compile time of a many-leaf model grows
  with it. A multiply by the reciprocal, not a divide: XLA recomputes a
  multiply in each consumer (Adam's two moments) but materializes a divide, a
  parameter-sized temporary. In float64 when 64-bit types are enabled, so that
  float64 sums keep their precision (k = 3 would lose 3e-8 to a float32
  reciprocal).
  """
  dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  one = jnp.ones((), dtype)
  return one / total_weight.astype(dtype) if reduction == "mean" else one


def finish(acc: jax.Array, inverse: jax.Array, dtype: DTypeLike) -> jax.Array:
  """The window's value of a leaf: `acc * inverse` in at least float32, cast to `dtype`.

  In at least float32: a bfloat16 product would round once more, and to
  nearest, after a stochastically rounded (unbiased) sum.
  """
  wide = at_least_float32(acc.dtype) if jnp.issubdtype(acc.dtype, jnp.inexact) else None
  if wide is None:  # integer sums (counts) are never averaged
    return acc.astype(dtype)
  return (acc.astype(wide) * inverse.astype(wide)).astype(dtype)


def _key_from(where: str, value: object) -> jax.Array:
  """A single typed PRNG key from a typed key, a raw uint32[2] key or an int seed."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    if not -(2**63) <= int(value) < 2**63:
      raise ValueError(
        f"`{where}(key=...)` must be an int seed from -2**63 to 2**63 - 1 (what "
        f"jax.random.key accepts) or a jax.random.key, got key={value!r}."
      )
    return jax.random.key(int(value))
  if isinstance(value, (jax.Array, np.ndarray)) and jnp.shape(value) == ():
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      return jnp.asarray(value)
  if isinstance(value, (jax.Array, np.ndarray)) and value.dtype == np.uint32:
    if value.shape == (2,):  # a raw key from `jax.random.PRNGKey`
      return jax.random.wrap_key_data(jnp.asarray(value))
  raise TypeError(
    f"`{where}(key=...)` must be a single jax.random.key or an int seed, got key={value!r}."
  )


def stochastic_bfloat16(key: jax.Array | int) -> Accumulator:
  """A bfloat16 accumulator whose every sum is rounded stochastically.

  Half the memory of a float32 accumulator. Rounded to nearest, bfloat16 drops
  a micro-batch gradient smaller than half a unit in the last place of the
  running sum (swamping), a bias that grows with the window; rounded
  stochastically (up with probability equal to the distance to the lower
  neighbour) every sum is exact in expectation, so the window's sum is
  unbiased however long the window. See docs/precision_and_statistics.md.

  Args:
    key: a `jax.random.key` or an int seed. The state keeps it and splits it
      on every micro-step, so a run is reproducible from it; under
      `axis_name` each replica folds in its index and rounds with its own bits.

  Returns:
    An accumulator to pass as `optaccum.accumulate(..., accumulator=...)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(
    ...   optax.sgd(0.1), 4, accumulator=optaccum.stochastic_bfloat16(key=0)
    ... )
    >>> tx.init({"w": jnp.zeros(3)}).acc_grads["w"].dtype
    dtype(bfloat16)
  """
  key = _key_from("stochastic_bfloat16", key)
  data = np.asarray(jax.random.key_data(key), np.uint32)
  return Accumulator(
    dtype=jnp.dtype(jnp.bfloat16),
    stochastic=True,
    key_data=tuple(int(word) for word in data.ravel()),
    key_impl=jax.random.key_impl(key),
  )


def as_accumulator(
  where: str, value: Accumulator | DTypeLike | None, *, stochastic: bool = True
) -> Accumulator:
  """`accumulator=` as an `Accumulator`: None, a floating or complex dtype, or one already.

  Raises naming `where` for anything else, and for a stochastic one where
  `stochastic` is False.
  """
  if isinstance(value, Accumulator):
    if value.stochastic and not stochastic:
      raise ValueError(
        f"`{where}(accumulator=...)` sums within one step, where stochastic rounding "
        "has no window to be unbiased over: pass a dtype (e.g. jnp.bfloat16) or None."
      )
    return value
  if value is None:
    return Accumulator()
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"`{where}(accumulator=...)` must be None, a floating or complex dtype such as "
      "jnp.float32, or optaccum.stochastic_bfloat16(key), got "
      f"accumulator={value!r}."
    )
  return Accumulator(dtype=dtype)
