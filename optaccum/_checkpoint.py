"""Orbax checkpoints of a training state, resumable in the middle of a window.

The accumulation state is a plain pytree, so Orbax saves it like the rest of the
training state: a checkpoint taken between two micro-steps holds the window's
partial sums, and training resumed from it gives bit-identical parameters.
What the tree does not hold is the window length k; these helpers record it
next to the state and check both on restore, so a checkpoint that does not fit
the optimizer fails with a message instead of a shape error inside JAX, or a
silently different run.

Orbax is an optional dependency (`pip install "optaccum[checkpoint]"`), imported
only inside these functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optaccum import _validation
from optaccum._inspect import accumulation_state
from optaccum._validation import _describe

# Under this key of the checkpoint's custom metadata: the window at save time.
_METADATA_KEY = "optaccum"
# How many mismatching leaves a message lists before it summarises the rest.
_MAX_LISTED = 8


def save_checkpoint(
  directory: str | os.PathLike,
  state: Any,
  *,
  every_k: int | Callable[[jax.Array], Any],
) -> None:
  """Saves a training state with Orbax, with the window length it is using.

  Save at any micro-step, in the middle of a window too: the window's partial
  sums are part of the state. The state is written by
  `orbax.checkpoint.StandardCheckpointer`; the window length in force (k, or
  `every_k(gradient_step)` for a schedule) and the counters go into the
  checkpoint's custom metadata, where `restore_checkpoint` checks them.

  Args:
    directory: a directory that does not exist yet (Orbax refuses to
      overwrite).
    state: the whole training state: a linen `TrainState`, a tuple
      `(model, optimizer)` of NNX objects, or any pytree holding one
      `optaccum.AccumulateState`.
    every_k: the `every_k` given to `optaccum.accumulate`.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), every_k=4)
    >>> params = {"w": jnp.zeros(3)}
    >>> opt_state = tx.init(params)
    >>> _, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   optaccum.save_checkpoint(f"{directory}/step_1", (params, opt_state), every_k=4)
    ...   fresh = (params, tx.init(params))
    ...   params, opt_state = optaccum.restore_checkpoint(f"{directory}/step_1", fresh, every_k=4)
    >>> int(optaccum.accumulation_state(opt_state).mini_step)  # one micro-step into the window
    1
  """
  import orbax.checkpoint as ocp

  _validation.check_every_k("save_checkpoint", every_k)
  mini_step, gradient_step = _counters(state)
  record = {
    "every_k": _window_length(every_k, gradient_step),
    "mini_step": mini_step,
    "gradient_step": gradient_step,
  }
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.fspath(directory), state, custom_metadata={_METADATA_KEY: record})


def restore_checkpoint(
  directory: str | os.PathLike,
  target: Any,
  *,
  every_k: int | Callable[[jax.Array], Any],
) -> Any:
  """Restores a state saved by `save_checkpoint`, after checking that it fits.

  Before reading any array it compares the checkpoint with `target` (the state
  a fresh run builds: same model, same optimizer) and with `every_k`, and
  raises a `ValueError` that shows both sides where they differ: leaves present
  on one side only or with other shapes (another model, another optimizer), or
  another window length.

  Args:
    directory: the checkpoint directory.
    target: a state of the form to restore: a freshly created `TrainState`,
      `(model, optimizer)` NNX objects, or any pytree, with arrays or
      `jax.ShapeDtypeStruct` leaves. Only its structure, shapes and dtypes are
      used.
    every_k: the `every_k` of the optimizer that will continue the training.

  Returns:
    The restored state, of the form of `target`.

  Raises:
    FileNotFoundError: if `directory` is not a directory.
    ValueError: if the checkpoint's tree or window length does not fit, or the
      checkpoint was not written by `save_checkpoint`.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optaccum.accumulate(optax.sgd(0.1), every_k=4)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   optaccum.save_checkpoint(f"{directory}/ckpt", tx.init(params), every_k=4)
    ...   optaccum.restore_checkpoint(f"{directory}/ckpt", tx.init(params), every_k=2)
    Traceback (most recent call last):
    ValueError: `restore_checkpoint(every_k=...)` gives windows of 2 micro-steps ... of 4 ...
  """
  import orbax.checkpoint as ocp

  where = "restore_checkpoint"
  _validation.check_every_k(where, every_k)
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"`{where}(directory=...)` must be a checkpoint directory, got {directory!r}, "
      "which is not a directory."
    )
  abstract = jax.eval_shape(lambda tree: tree, target)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory)
    if metadata.item_metadata is None:
      raise ValueError(
        f"`{where}(directory=...)` must be a checkpoint written by "
        f"`optaccum.save_checkpoint`, but {directory!r} holds no Orbax checkpoint."
      )
    _check_tree_fits(
      directory,
      ocp.tree.to_flat_dict(metadata.item_metadata.tree),
      ocp.tree.to_flat_dict(abstract),
    )
    _check_window_fits(directory, (metadata.custom_metadata or {}).get(_METADATA_KEY), every_k)
    return checkpointer.restore(directory, abstract)


def _counters(state: Any) -> tuple[int, int]:
  """The state's (mini_step, gradient_step) as Python ints, NNX Variables included."""
  accumulation = accumulation_state(state)
  # An NNX Variable is a pytree around its array; a plain array is its own leaf.
  return tuple(
    int(jax.tree.leaves(counter)[0])
    for counter in (accumulation.mini_step, accumulation.gradient_step)
  )


def _window_length(every_k: Any, gradient_step: int) -> int:
  """The window length in force at `gradient_step`, as `accumulate` computes it."""
  return int(_validation.as_schedule(every_k)(jnp.asarray(gradient_step, jnp.int32)))


def _check_tree_fits(directory: str, saved: dict, target: dict) -> None:
  """Raises a ValueError listing the leaves where `saved` and `target` differ."""
  lines = []
  # In the target's tree order (a TrainState lists its params before its optimizer
  # state), then what only the checkpoint holds.
  for key in [*target, *(key for key in saved if key not in target)]:
    name = ".".join(map(str, key))
    if key not in target:
      lines.append(f"{name}: checkpoint has {_describe(saved[key])}, target has nothing")
    elif key not in saved:
      lines.append(f"{name}: checkpoint has nothing, target has {_describe(target[key])}")
    elif tuple(saved[key].shape) != tuple(target[key].shape):
      lines.append(
        f"{name}: checkpoint has {_describe(saved[key])}, target has {_describe(target[key])}"
      )
  if not lines:
    return
  listed = lines[:_MAX_LISTED]
  if len(lines) > _MAX_LISTED:
    listed.append(f"... and {len(lines) - _MAX_LISTED} more")
  raise ValueError(
    f"`restore_checkpoint(target=...)` does not fit the checkpoint at {directory}: "
    f"{len(lines)} leaves differ (another model or optimizer?).\n  " + "\n  ".join(listed)
  )


def _check_window_fits(directory: str, record: Any, every_k: Any) -> None:
  """Raises a ValueError where the saved window length differs from `every_k`'s."""
  if record is None:
    raise ValueError(
      f"`restore_checkpoint(directory=...)`: the checkpoint at {directory} records no "
      "window length; save it with `optaccum.save_checkpoint`."
    )
  k = _window_length(every_k, record["gradient_step"])
  if k != record["every_k"]:
    raise ValueError(
      f"`restore_checkpoint(every_k=...)` gives windows of {k} micro-steps at gradient "
      f"step {record['gradient_step']}, but the checkpoint at {directory} was saved with "
      f"windows of {record['every_k']} ({record['mini_step']} micro-steps into the "
      f"current one); restore with the every_k it was saved with."
    )
