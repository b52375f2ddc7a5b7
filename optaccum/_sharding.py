"""Per-replica types under `jax.shard_map`, across the JAX versions optaccum supports.

Inside `shard_map` with `check_vma=True`, JAX types each value with the mesh
axes it varies over. The API for it has moved between releases:
`jax.lax.pvary` became `jax.lax.pcast(..., to="varying")`, and an abstract
value's varying axes moved from `.vma` to `.mat.varying`. The rest of optaccum
calls `vary` and never asks which JAX it runs on.
"""

from __future__ import annotations

from collections.abc import Hashable

import jax

from optaccum._types import PyTree


def varying_axes(x: jax.Array | jax.core.AbstractValue) -> frozenset[Hashable]:
  """The mesh axes an array (or abstract value) varies over; empty outside `shard_map`."""
  aval = x if isinstance(x, jax.core.AbstractValue) else jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_over(x: jax.Array, axes: frozenset[Hashable]) -> jax.Array:
  """`x` marked as varying over every axis in `axes` (those it lacks)."""
  missing = tuple(sorted(axes - varying_axes(x), key=str))
  if not missing:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)  # type: ignore[attr-defined]  # jax < 0.8 only


def vary(tree: PyTree, axis_name: Hashable) -> PyTree:
  """Marks each array leaf as varying over `axis_name` (where not already).

  Inside `shard_map` with `check_vma=True`, the gradient with respect to a
  replicated (invariant) input is summed across the axis by JAX itself; with
  respect to a varying one it stays local. Without `check_vma` this is a no-op.
  """

  axes = frozenset([axis_name])
  return jax.tree.map(lambda x: vary_over(x, axes) if isinstance(x, jax.Array) else x, tree)
