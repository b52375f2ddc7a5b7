"""Orbax checkpoints of a training state, resumable in the middle of a window.

The accumulation state is a plain pytree, so Orbax saves it like the rest of the
training state: a checkpoint taken between two micro-steps holds the window's
partial sums, and training resumed from it gives bit-identical parameters.
What the tree does not hold is the window length k; these helpers record it
next to the state and check both on restore, so a checkpoint that does not fit
the optimizer fails with a message instead of a shape error inside JAX, or a
silently different run. Each array's checksum, computed on its device at
save, is checked again after the restore, so damaged data fails loudly too.

Orbax is an optional dependency (`pip install "optaccum[checkpoint]"`), imported
only inside these functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from optaccum import _validation
from optaccum._state import WINDOW_SUMS, counters, fields_of
from optaccum._types import KSchedule, PyTree

# Under this key of the checkpoint's custom metadata: the window at save time, and
# each leaf's checksum.
_METADATA_KEY = "optaccum"
_RECORD_FIELDS = ("k", "mini_step", "gradient_step", "checksums")
# How many mismatching leaves a message lists before it summarises the rest.
_MAX_LISTED = 8
# Kinds of dtype a Python scalar in the target may take the checkpoint's dtype within.
_KINDS = (jnp.bool_, jnp.integer, jnp.floating, jnp.complexfloating)
# Orbax's JSON files in a checkpoint: the step metadata (which holds the custom
# metadata) and the tree metadata always, the shardings and the per-process array
# metadata where present.
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "_METADATA")
_OPTIONAL_FILES = ("_sharding",)
_OPTIONAL_FOLDERS = ("array_metadatas",)
# TensorStore's status codes for files it cannot find, read or decode.
_STORAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")
# Orbax numbers each save with a process-wide counter and keys the signals a save
# waits on ("temporary directory created") by the current number, so two saves at
# once in one process read each other's signals: one writes before its directory
# exists, or waits for a signal that never comes. One Orbax call at a time keeps
# them apart.
_ORBAX_LOCK = threading.Lock()


class _Shaped(Protocol):
  """A leaf as the tree checks see it: a `jax.ShapeDtypeStruct`, or Orbax's metadata of one."""

  @property
  def shape(self) -> tuple[int, ...]: ...

  @property
  def dtype(self) -> Any: ...


def save_checkpoint(
  directory: str | os.PathLike[str],
  state: PyTree,
  *,
  k: KSchedule,
) -> None:
  """Saves a training state with Orbax, with the window length it is using.

  Save at any micro-step, in the middle of a window too: the window's partial
  sums are part of the state. The state is written by
  `orbax.checkpoint.StandardCheckpointer`; the window length in force (k, or
  `k(gradient_step)` for a schedule), the counters and a checksum of each
  array (computed on its device, in one dispatch) go into the checkpoint's
  custom metadata, where `checkpoint.restore` checks them. Saves from several
  threads at once are safe: they take turns.

  Args:
    directory: a directory that does not exist yet (Orbax refuses to
      overwrite).
    state: the whole training state: a linen `TrainState`, a tuple
      `(model, optimizer)` of NNX objects, or any pytree holding one
      `optaccum.AccumulateState`.
    k: the `k` given to `optaccum.accumulate`.

  Raises:
    ValueError: if `state` holds no (or several) AccumulateState; or if, in
      the middle of a window under `pmap` with `axis_name`, a state declared
      replicated holds other partial sums on other devices (Orbax would write
      device 0's alone): save when a window has just closed, or keep the state
      per device (`out_axes=0`).

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), k=4)
    >>> params = {"w": jnp.zeros(3)}
    >>> opt_state = tx.init(params)
    >>> _, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   optaccum.checkpoint.save(f"{directory}/step_1", (params, opt_state), k=4)
    ...   fresh = (params, tx.init(params))
    ...   params, opt_state = optaccum.checkpoint.restore(f"{directory}/step_1", fresh, k=4)
    >>> int(optaccum.status(opt_state).mini_step)  # one micro-step into the window
    1
  """
  import orbax.checkpoint as ocp

  metadata = _metadata("checkpoint.save", state, k)
  with _ORBAX_LOCK, ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.fspath(directory), state, custom_metadata=metadata)


def checkpoint_metadata(state: PyTree, *, k: KSchedule) -> dict[str, Any]:
  """What `checkpoint.restore` checks, for a save through Orbax's `CheckpointManager`.

  `checkpoint.save` writes one checkpoint directory; a training loop that keeps
  several with `orbax.checkpoint.CheckpointManager` passes this as the save's
  `custom_metadata`, and restores a step with `checkpoint.restore` pointed at
  that step's directory: the window length, the counters and each array's
  checksum are checked as for `checkpoint.save`'s own.

  Args:
    state: the whole training state the manager saves (one item).
    k: the `k` given to `optaccum.accumulate`.

  Returns:
    A dict for `CheckpointManager.save(..., custom_metadata=...)`.

  Raises:
    ValueError: if `state` holds no (or several) AccumulateState, or under
      `pmap` its replicas hold different partial sums (see `checkpoint.save`).

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import orbax.checkpoint as ocp
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), k=4)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = (params, tx.init(params))
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     manager.save(7, args=ocp.args.StandardSave(state),
    ...                  custom_metadata=optaccum.checkpoint.metadata(state, k=4))
    ...     manager.wait_until_finished()
    ...   optaccum.checkpoint.restore(f"{directory}/7", state, k=2)
    Traceback (most recent call last):
    ValueError: `checkpoint.restore(k=...)` gives windows of 2 micro-steps ... of 4 ...
  """
  return _metadata("checkpoint.metadata", state, k)


def _metadata(where: str, state: PyTree, k: KSchedule) -> dict[str, Any]:
  """The custom metadata of a checkpoint of `state`: the window in force and the checksums."""
  import orbax.checkpoint as ocp

  _validation.check_k(where, k)
  fields = fields_of(state)
  mini_step, gradient_step = counters(fields)
  if mini_step > 0:
    _check_replicas_agree(where, fields)
  record = {
    "k": _window_length(k, gradient_step),
    "mini_step": mini_step,
    "gradient_step": gradient_step,
    "checksums": _checksums(ocp.tree.to_flat_dict(state)),
  }
  return {_METADATA_KEY: record}


def restore_checkpoint(
  directory: str | os.PathLike[str],
  target: PyTree,
  *,
  k: KSchedule,
  item: str | None = None,
) -> PyTree:
  """Restores a state saved by `checkpoint.save`, after checking that it fits.

  Before reading any array it compares the checkpoint with `target` (the state
  a fresh run builds: same model, same optimizer) and with `k`, and
  raises a `ValueError` that shows both sides where they differ: leaves present
  on one side only or with other shapes or dtypes (another model, another
  optimizer, another precision), or another window length. After reading, it
  checks each array against the checksum taken at save, so damaged data raises
  a `ValueError` too, as do damaged or missing Orbax files.

  It also restores one step of an `orbax.checkpoint.CheckpointManager` saved
  with `custom_metadata=optaccum.checkpoint.metadata(state, k=...)`:
  point `directory` at the step's directory (`f"{manager.directory}/{step}"`).

  Args:
    directory: the checkpoint directory, or a CheckpointManager step's.
    target: a state of the form to restore: a freshly created `TrainState`,
      `(model, optimizer)` NNX objects, or any pytree, with arrays or
      `jax.ShapeDtypeStruct` leaves. Only its structure, shapes and dtypes are
      used.
    k: the `k` of the optimizer that will continue the training.
    item: in a CheckpointManager step that holds several items (saved with
      `ocp.args.Composite`), the one holding the state; None (default) takes
      the only one.

  Returns:
    The restored state, of the form of `target`.

  Raises:
    FileNotFoundError: if `directory` is not a directory.
    ValueError: if the checkpoint's tree or window length does not fit, the
      checkpoint was not written by `checkpoint.save`, or it is damaged.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optaccum.accumulate(optax.sgd(0.1), k=4)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   optaccum.checkpoint.save(f"{directory}/ckpt", tx.init(params), k=4)
    ...   optaccum.checkpoint.restore(f"{directory}/ckpt", tx.init(params), k=2)
    Traceback (most recent call last):
    ValueError: `checkpoint.restore(k=...)` gives windows of 2 micro-steps ... of 4 ...
  """
  import orbax.checkpoint as ocp

  where = "checkpoint.restore"
  _validation.check_k(where, k)
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"`{where}(directory=...)` must be a checkpoint directory, got {directory!r}, "
      "which is not a directory."
    )
  abstract = jax.eval_shape(lambda tree: tree, target)
  item_directory = _item_directory(directory, item)
  _check_files(directory, item_directory)
  with _ORBAX_LOCK, ocp.StandardCheckpointer() as checkpointer:
    saved_tree = _tree_metadata(item_directory)
    with _reading(directory, "Orbax cannot read its _CHECKPOINT_METADATA"):
      custom_metadata = checkpointer.metadata(directory).custom_metadata or {}
    _check_tree_fits(directory, ocp.tree.to_flat_dict(saved_tree), ocp.tree.to_flat_dict(abstract))
    record = custom_metadata.get(_METADATA_KEY)
    _check_record(directory, record)
    _check_window_fits(directory, cast(dict, record), k)
    with _reading(directory, "Orbax cannot read its arrays"):
      restored = checkpointer.restore(item_directory, abstract)
  _check_checksums(directory, cast(dict, record)["checksums"], ocp.tree.to_flat_dict(restored))
  return restored


def _item_directory(directory: str, item: str | None) -> str:
  """Where the arrays of the checkpoint at `directory` lie.

  `directory` itself for `checkpoint.save`'s (and `StandardCheckpointer`'s)
  layout; the folder of one item within a `CheckpointManager` step directory.
  """
  names = set(os.listdir(directory))
  if names & {"_METADATA", "manifest.ocdbt"}:
    if item is not None:
      raise ValueError(
        f"`checkpoint.restore(item=...)` names an item of a CheckpointManager step, but "
        f"{directory!r} is a checkpoint of one item; leave item=None, got item={item!r}."
      )
    return directory
  folders = sorted(n for n in names if os.path.isdir(os.path.join(directory, n)))
  if "_CHECKPOINT_METADATA" not in names:
    steps = sorted((n for n in folders if n.isdigit()), key=int)
    latest = steps[-1] if steps else ""
    if steps and os.path.isfile(os.path.join(directory, latest, "_CHECKPOINT_METADATA")):
      raise ValueError(
        f"`checkpoint.restore(directory=...)` must be one checkpoint, but {directory!r} is a "
        f"CheckpointManager's directory of steps {', '.join(steps)}: pass "
        f"one step's directory, e.g. {os.path.join(directory, latest)!r}."
      )
    return directory  # `_check_files` says it holds no checkpoint
  if item is None and len(folders) == 1:
    return os.path.join(directory, folders[0])
  if item is None or item not in folders:
    got = "" if item is None else f", got item={item!r}"
    raise ValueError(
      f"`checkpoint.restore(item=...)` must name the item to restore of the CheckpointManager "
      f"step at {directory!r}, which holds {', '.join(folders) or 'none'}{got}."
    )
  return os.path.join(directory, item)


def _check_replicas_agree(where: str, fields: dict[str, list]) -> None:
  """Raises a ValueError where one array of the window's sums differs between its replicas.

  Under `pmap(..., out_axes=None)` (or `in_axes=None` for the state) an
  `accumulate(axis_name=...)` state is declared replicated, but in the middle
  of a window each device holds its own partial sum. Orbax, like
  `jax.device_get`, would write device 0's copy alone and lose the others.
  """
  for name in WINDOW_SUMS:
    for leaf in fields.get(name, []):
      if not isinstance(leaf, jax.Array) or not leaf.is_fully_replicated:
        continue
      if len(leaf.addressable_shards) < 2:  # one copy: nothing to compare
        continue
      shards = [np.asarray(shard.data).tobytes() for shard in leaf.addressable_shards]
      differ = sum(shard != shards[0] for shard in shards[1:])
      if differ:
        raise ValueError(
          f"`{where}(state=...)` is declared replicated over {len(shards)} devices, but "
          f"{differ} of them hold other partial sums in a leaf of `{name}` of shape "
          f"{list(leaf.shape)}, in the middle of a window: under pmap with axis_name each device "
          "accumulates its own micro-batches until the window closes, and a save (or "
          "jax.device_get) would keep device 0's alone. Save when a window has just "
          "closed (optaccum.status(...).has_updated), or keep the state per device "
          "(pmap out_axes=0)."
        )


def _window_length(k: KSchedule, gradient_step: int) -> int:
  """The window length in force at `gradient_step`, as `accumulate` computes it."""
  return int(_validation.as_schedule(k)(jnp.asarray(gradient_step, jnp.int32)))


def _leaf_name(key: tuple) -> str:
  """A leaf's name in messages and in the checksum record: its Orbax path, dotted."""
  return ".".join(map(str, key))


def _describe(leaf: _Shaped) -> str:
  """A leaf as `dtype[shape]`: float32[4, 8], key<fry>[2]."""
  return f"{leaf.dtype}{list(leaf.shape)}"


def _fits(saved: _Shaped, target: _Shaped) -> bool:
  """Whether Orbax restores the `saved` leaf into `target` without reshaping or casting it."""
  if jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key):
    target = jax.eval_shape(jax.random.key_data, target)  # Orbax stores a key as its data.
  if tuple(saved.shape) != tuple(target.shape):
    return False
  if getattr(target, "weak_type", False):
    # A Python scalar in the target (a fresh TrainState's step) has no dtype of its
    # own; Orbax saved it as int64 or float64.
    return [jnp.issubdtype(saved.dtype, kind) for kind in _KINDS] == [
      jnp.issubdtype(target.dtype, kind) for kind in _KINDS
    ]
  return saved.dtype == target.dtype


def _listing(lines: list[str]) -> str:
  """`lines`, one per row and indented, the first `_MAX_LISTED` of them."""
  listed = lines[:_MAX_LISTED]
  if len(lines) > _MAX_LISTED:
    listed.append(f"... and {len(lines) - _MAX_LISTED} more")
  return "".join(f"\n  {line}" for line in listed)


def _checksums(leaves: dict[tuple, ArrayLike]) -> dict[str, int]:
  """Each leaf's checksum by name, computed where the leaves live, in one dispatch."""
  named = {_leaf_name(key): leaf for key, leaf in leaves.items()}
  return {name: int(value) for name, value in jax.device_get(_checksum_tree(named)).items()}


@jax.jit
def _checksum_tree(leaves: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {name: _checksum(leaf) for name, leaf in leaves.items()}


def _checksum(leaf: jax.Array) -> jax.Array:
  """A uint32 hash of the leaf's bits and where they sit.

  Each word goes through a bijection keyed by its position, so a change to any
  one word (a flipped bit, say) always changes the sum; and uint32 sums wrap
  alike in any order, so the value does not depend on sharding or backend.
  """
  words = _words(leaf)
  return jnp.sum(_mix(words ^ _mix(_positions(words.shape))), dtype=jnp.uint32)


def _words(leaf: jax.Array) -> jax.Array:
  """The leaf's bits as uint32 words (a complex entry as its real and imaginary parts).

  One word per entry of 32 bits or fewer, in a trailing axis two per 64-bit entry.
  """
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
    leaf = jnp.stack([jnp.real(leaf), jnp.imag(leaf)], axis=-1)
  if leaf.dtype == jnp.bool_:
    leaf = leaf.astype(jnp.uint8)
  bits = jax.dtypes.itemsize_bits(leaf.dtype)
  if bits > 32:
    return lax.bitcast_convert_type(leaf, jnp.uint32)
  return lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """Each entry's row-major index, modulo 2**32, without reshaping the leaf."""
  index = jnp.zeros(shape, jnp.uint32)
  for axis, size in enumerate(shape):
    index = index * np.uint32(size % 2**32) + lax.broadcasted_iota(jnp.uint32, shape, axis)
  return index


def _mix(x: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection of uint32 that spreads each bit over all 32."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _damaged(directory: str, what: str) -> ValueError:
  return ValueError(
    f"`checkpoint.restore(directory=...)`: the checkpoint at {directory} is damaged: {what}"
  )


def _storage_error(error: BaseException) -> BaseException:
  """TensorStore's error where Orbax wraps it in a bare Exception, else `error`."""
  if type(error) is Exception and error.__cause__ is not None:
    return error.__cause__
  return error


def _is_damage(error: BaseException) -> bool:
  """Whether an error from inside Orbax says the checkpoint's files are missing or bad.

  TensorStore's errors are ValueErrors led by a status code; Orbax's own, on a
  field missing from its metadata, are KeyErrors. Any other error (out of
  memory, say) is not the checkpoint's fault and passes through unchanged.
  """
  error = _storage_error(error)
  if isinstance(error, ValueError):
    return str(error).startswith(_STORAGE_CODES)
  return isinstance(error, KeyError)


def _reason(error: BaseException) -> str:
  """The error in one line, without the TensorStore spec it may end with."""
  error = _storage_error(error)
  text = (str(error).split(" [tensorstore_spec=")[0].splitlines() or [""])[0]
  return f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def _reading(directory: str, what: str) -> Iterator[None]:
  """Turns an error from damaged files inside Orbax into a ValueError saying what it is."""
  try:
    yield
  except Exception as error:  # Orbax wraps TensorStore's errors in a bare Exception.
    if not _is_damage(error):
      raise
    raise _damaged(directory, f"{what} ({_reason(error)}).") from error


def _check_files(directory: str, item_directory: str) -> None:
  """Raises a ValueError where Orbax's JSON files of the checkpoint are missing or not JSON.

  The step's metadata lies in `directory`, the item's files in `item_directory`
  (the same folder but in a CheckpointManager step).
  """
  names = set(os.listdir(directory)) | set(os.listdir(item_directory))
  if not names & {*_REQUIRED_FILES, "manifest.ocdbt"}:
    raise ValueError(
      "`checkpoint.restore(directory=...)` must be a checkpoint written by "
      f"`optaccum.checkpoint.save` (or a CheckpointManager step), but {directory!r} holds "
      "no Orbax checkpoint."
    )
  step_file, item_file = _REQUIRED_FILES
  for path in (os.path.join(directory, step_file), os.path.join(item_directory, item_file)):
    if not os.path.isfile(path):
      raise _damaged(directory, f"its file {os.path.relpath(path, directory)} is missing.")
  for path in _json_files(directory, item_directory):
    try:
      with open(path, "rb") as file:
        json.loads(file.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      name = os.path.relpath(path, directory)
      raise _damaged(directory, f"its file {name} is not valid JSON ({error}).") from error


def _json_files(directory: str, item_directory: str) -> list[str]:
  """The paths of Orbax's JSON files of the checkpoint: the step's metadata, then the item's."""
  step_file, item_file = _REQUIRED_FILES
  names = set(os.listdir(item_directory))
  files = [os.path.join(directory, step_file)]
  files += [os.path.join(item_directory, n) for n in (item_file, *_OPTIONAL_FILES) if n in names]
  for folder in _OPTIONAL_FOLDERS:
    if folder in names:
      path = os.path.join(item_directory, folder)
      files += [os.path.join(path, name) for name in sorted(os.listdir(path))]
  return files


def _tree_metadata(directory: str) -> PyTree:
  """The saved tree's metadata, from Orbax's handler, which names what it cannot read.

  (`StandardCheckpointer.metadata` would log the reason and return no tree.)
  """
  import orbax.checkpoint as ocp
  from etils import epath

  handler = ocp.StandardCheckpointHandler()
  try:
    with _reading(directory, "Orbax cannot read its tree metadata"):
      return handler.metadata(epath.Path(directory)).tree
  finally:
    handler.close()


def _check_tree_fits(
  directory: str, saved: dict[tuple, _Shaped], target: dict[tuple, _Shaped]
) -> None:
  """Raises a ValueError listing the leaves where `saved` and `target` differ."""
  lines = []
  # In the target's tree order (a TrainState lists its params before its optimizer
  # state), then what only the checkpoint holds.
  for key in [*target, *(key for key in saved if key not in target)]:
    name = _leaf_name(key)
    if key not in target:
      lines.append(f"{name}: checkpoint has {_describe(saved[key])}, target has nothing")
    elif key not in saved:
      lines.append(f"{name}: checkpoint has nothing, target has {_describe(target[key])}")
    elif not _fits(saved[key], target[key]):
      # Orbax would cast to the target's dtype without a word.
      lines.append(
        f"{name}: checkpoint has {_describe(saved[key])}, target has {_describe(target[key])}"
      )
  if lines:
    raise ValueError(
      f"`checkpoint.restore(target=...)` does not fit the checkpoint at {directory}: "
      f"{len(lines)} leaves differ (another model, optimizer or dtype?)." + _listing(lines)
    )


def _check_record(directory: str, record: object) -> None:
  """Raises a ValueError where the record `checkpoint.save` writes is absent or incomplete."""
  if record is None:
    raise ValueError(
      f"`checkpoint.restore(directory=...)`: the checkpoint at {directory} records no "
      "window length; save it with `optaccum.checkpoint.save`, or through a "
      "CheckpointManager with `custom_metadata=optaccum.checkpoint.metadata(state, "
      "k=...)`."
    )
  held = list(record) if isinstance(record, dict) else []
  missing = [field for field in _RECORD_FIELDS if field not in held]
  if missing:
    raise _damaged(
      directory,
      f"its custom metadata {_METADATA_KEY!r} lacks {', '.join(missing)} (it holds "
      f"{', '.join(map(str, held)) or 'nothing'}).",
    )


def _check_window_fits(directory: str, record: dict, k: KSchedule) -> None:
  """Raises a ValueError where the saved window length differs from `k`'s."""
  length = _window_length(k, record["gradient_step"])
  if length != record["k"]:
    raise ValueError(
      f"`checkpoint.restore(k=...)` gives windows of {length} micro-steps at gradient "
      f"step {record['gradient_step']}, but the checkpoint at {directory} was saved with "
      f"windows of {record['k']} ({record['mini_step']} micro-steps into the "
      f"current one); restore with the k it was saved with."
    )


def _check_checksums(directory: str, saved: dict, restored: dict[tuple, ArrayLike]) -> None:
  """Raises a ValueError naming the leaves whose restored bits differ from the saved ones."""
  computed = _checksums(restored)
  differ = [name for name, value in computed.items() if saved.get(name) != value]
  if differ:
    raise _damaged(
      directory,
      f"the data of {len(differ)} of its {len(computed)} leaves reads back other than "
      "it was saved (checksums differ):" + _listing(differ),
    )
