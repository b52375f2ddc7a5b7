"""Orbax checkpoints of a training state, resumable in the middle of a window.

The accumulation state is a plain pytree, so Orbax saves it like the rest of the
training state: a checkpoint taken between two micro-steps holds the window's
partial sums, and training resumed from it gives bit-identical parameters.
What the tree does not hold is the window length k; these helpers record it
next to the state and check both on restore, so a checkpoint that does not fit
the optimizer fails with a message instead of a shape error inside JAX, or a
silently different run. Each array's checksum, computed on its device at
save, is checked again after the restore; and `checkpoint.save` seals the
checkpoint with the size and SHA-256 of each file Orbax wrote, checked before
Orbax reads any of them: damaged files fail loudly too, with the file's name.

Orbax is an optional dependency (`pip install "optaccum[checkpoint]"`), imported
only inside these functions.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from optaccum import _validation
from optaccum._state import WINDOW_SUMS, counters, fields_of, locate_state
from optaccum._types import KSchedule, PyTree


def _orbax() -> Any:
  """`orbax.checkpoint`, imported without its import-time warning under newer JAX.

  orbax-checkpoint 0.12 names `jax.sharding.SingleDeviceSharding` at import,
  which jax 0.12 deprecates: a program run with warnings as errors would fail
  on optaccum's import of it, through no fault of its own.
  """
  import warnings

  with warnings.catch_warnings():
    warnings.filterwarnings(
      "ignore", "jax.sharding.SingleDeviceSharding is deprecated", DeprecationWarning
    )
    import orbax.checkpoint as ocp
  return ocp


# Under this key of the checkpoint's custom metadata: the window at save time, and
# each leaf's checksum. Records of optaccum 0.2.0 hold `_RECORD_FIELDS` alone; since
# then they also say whether `checkpoint.save` sealed the checkpoint with a digest
# file, and hold a digest of their own fields, so a damaged record is told from a
# checkpoint that does not fit.
_METADATA_KEY = "optaccum"
_RECORD_FIELDS = ("k", "mini_step", "gradient_step", "checksums")
_SEALED_FIELD = "sealed"
_RECORD_DIGEST_FIELD = "record_digest"
# The file `checkpoint.save` adds to a checkpoint once Orbax has written it: the
# size and SHA-256 of every other file, and a digest of its own content.
_DIGESTS_FILE = "_OPTACCUM_DIGESTS"
# How many mismatching leaves a message lists before it summarises the rest.
_MAX_LISTED = 8
# Kinds of dtype a Python scalar in the target may take the checkpoint's dtype within.
_KINDS = (jnp.bool_, jnp.integer, jnp.floating, jnp.complexfloating)
# Orbax's JSON files in a checkpoint: the step metadata (which holds the custom
# metadata) and the tree metadata always, the shardings and the per-process array
# metadata where present.
_STEP_FILE = "_CHECKPOINT_METADATA"
_TREE_FILE = "_METADATA"
_OPTIONAL_FILES = ("_sharding",)
_OPTIONAL_FOLDERS = ("array_metadatas",)
# TensorStore names the files it fails on as `local file "PATH"`, and the OCDBT
# entry (a leaf's chunk or metadata) it was reading as `Error reading "KEY" in OCDBT`.
_LOCAL_FILE = re.compile(r'local file "([^"]*)"')
_OCDBT_KEY = re.compile(r'Error reading "([^"]*)" in OCDBT')
# The OCDBT entries of an array that hold its zarr metadata, not its data.
_ZARR_METADATA = ("/.zarray", "/zarr.json")
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
  `orbax.checkpoint.StandardCheckpointer`; the window length in force, the
  counters and each array's checksum go into its metadata, and the size and
  SHA-256 of each file into a file `_OPTACCUM_DIGESTS`, for `checkpoint.restore`
  to check. `directory` appears complete or not at all; saves from several
  threads take turns. Guide: [checkpoints][save-and-restore].

  Args:
    directory: a local directory that does not exist yet (a str or
      `os.PathLike`); a relative path is taken from the current directory.
    state: the whole training state: a linen `TrainState`, a tuple
      `(model, optimizer)` of NNX objects, or any pytree holding one
      `optaccum.AccumulateState`.
    k: the `k` given to `optaccum.accumulate`, checked as `accumulate` checks it.

  Raises:
    TypeError: if `directory` is not a str or `os.PathLike`.
    ValueError: if `directory` is empty, exists or is a URL; if `k` is not a
      positive int or a schedule whose value at gradient step 0 is a finite
      real scalar; if `state` holds no (or several) AccumulateState; or if, in
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
  ocp = _orbax()

  where = "checkpoint.save"
  path = _local_path(where, directory)
  if os.path.lexists(path):
    raise ValueError(
      f"`{where}(directory=...)` must be a directory that does not exist yet, got "
      f"{path!r}, which exists."
    )
  metadata = _metadata(where, state, k, sealed=True)
  # The same name on every process of a multi-process save; what is left there
  # is an interrupted save's.
  unsealed = f"{path}.optaccum-unsealed"
  primary = ocp.multihost.is_primary_host(0)
  with _ORBAX_LOCK:
    if primary and os.path.lexists(unsealed):
      shutil.rmtree(unsealed)
    try:
      _sync(f"optaccum:save:start:{path}")
      # Orbax creates its temporary folder in a background thread by default,
      # which a save refused meanwhile (a dtype TensorStore lacks) leaves
      # running: the folder could appear after `_remove_unsealed` has looked.
      synchronous = ocp.options.AsyncOptions(create_directories_asynchronously=False)
      with ocp.StandardCheckpointer(async_options=synchronous) as checkpointer:
        checkpointer.save(unsealed, state, custom_metadata=metadata)
      _sync(f"optaccum:save:written:{path}")
      if primary:
        _seal(unsealed)
        os.rename(unsealed, path)
    except BaseException:
      if primary:
        _remove_unsealed(unsealed)
      raise
    _sync(f"optaccum:save:sealed:{path}")


def _local_path(where: str, directory: object) -> str:
  """`directory` as an absolute path, after checking that it names a local directory.

  Orbax takes absolute paths alone, so a relative one is resolved here, against
  the current directory; the messages name the path so resolved.
  """
  given = os.fspath(directory) if isinstance(directory, (str, os.PathLike)) else None
  if not isinstance(given, str):  # also an os.PathLike of bytes
    raise TypeError(
      f"`{where}(directory=...)` must be a path, a str or an os.PathLike such as "
      f"pathlib.Path, got directory={directory!r}."
    )
  if not given:
    # os.path.abspath would take it for the current directory.
    raise ValueError(f"`{where}(directory=...)` must name a directory, got directory=''.")
  if "://" in given:
    raise ValueError(
      f"`{where}(directory=...)` must be a local directory, which `checkpoint.restore` "
      f"reads, got {given!r}."
    )
  return os.path.abspath(given)


def _remove_unsealed(unsealed: str) -> None:
  """Removes what a failed save wrote: its unsealed folder, or Orbax's temporary one of it."""
  for path in [unsealed, *glob.glob(f"{glob.escape(unsealed)}.orbax-checkpoint-tmp*")]:
    shutil.rmtree(path, ignore_errors=True)


def _sync(name: str) -> None:
  """Waits for every process of a multi-process program (no wait in a single process)."""
  ocp = _orbax()

  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name)


def _seal(directory: str) -> None:
  """Writes the digest file of the checkpoint Orbax has written at `directory`."""
  files = {name: _file_digest(os.path.join(directory, name)) for name in _files_in(directory)}
  with open(os.path.join(directory, _DIGESTS_FILE), "w") as file:
    json.dump({"files": files, "digest": _digest_of(files)}, file)
    file.flush()
    os.fsync(file.fileno())


def _files_in(directory: str) -> list[str]:
  """The paths of the files below `directory`, relative to it, `/`-separated, sorted."""
  found = []
  for root, _, names in os.walk(directory):
    relative = os.path.relpath(root, directory)
    found += [name if relative == "." else f"{relative}/{name}" for name in names]
  return sorted(name.replace(os.sep, "/") for name in found if name != _DIGESTS_FILE)


def _file_digest(path: str) -> list[int | str]:
  """The size of the file at `path` and its SHA-256, in hex."""
  digest = hashlib.sha256()
  size = 0
  with open(path, "rb") as file:
    while chunk := file.read(1 << 20):
      digest.update(chunk)
      size += len(chunk)
  return [size, digest.hexdigest()]


def _digest_of(value: object) -> str:
  """The SHA-256, in hex, of `value` written as canonical JSON."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checkpoint_metadata(state: PyTree, *, k: KSchedule) -> dict[str, Any]:
  """What `checkpoint.restore` checks, for a save through Orbax's `CheckpointManager`.

  A training loop that keeps several checkpoints with
  `orbax.checkpoint.CheckpointManager` passes this as the save's
  `custom_metadata`, and restores a step with `checkpoint.restore` pointed at
  that step's directory: the window length, the counters and each array's
  checksum are checked as for `checkpoint.save`'s own (without its per-file
  digests). Guide: [with Orbax's CheckpointManager][with-orbaxs-checkpointmanager].

  Args:
    state: the whole training state the manager saves (one item).
    k: the `k` given to `optaccum.accumulate`, checked as `accumulate` checks it.

  Returns:
    A dict for `CheckpointManager.save(..., custom_metadata=...)`.

  Raises:
    ValueError: if `k` is not a positive int or a schedule whose value at
      gradient step 0 is a finite real scalar; if `state` holds no (or several)
      AccumulateState, or under `pmap` its replicas hold different partial
      sums (see `checkpoint.save`).

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
  return _metadata("checkpoint.metadata", state, k, sealed=False)


def _metadata(where: str, state: PyTree, k: KSchedule, *, sealed: bool) -> dict[str, Any]:
  """The custom metadata of a checkpoint of `state`: the window in force and the checksums.

  `sealed`: whether `checkpoint.save` adds its digest file to the checkpoint.
  """
  ocp = _orbax()

  _validation.check_k(where, k)
  fields = _fields(where, "state", state)
  mini_step, gradient_step = counters(fields)
  if mini_step > 0:
    _check_replicas_agree(where, fields)
  record: dict[str, Any] = {
    "k": _window_length(k, gradient_step),
    "mini_step": mini_step,
    "gradient_step": gradient_step,
    "checksums": _checksums(ocp.tree.to_flat_dict(state)),
    _SEALED_FIELD: sealed,
  }
  record[_RECORD_DIGEST_FIELD] = _digest_of(record)
  return {_METADATA_KEY: record}


def _fields(where: str, name: str, state: PyTree) -> dict[str, list]:
  """`fields_of(state)`; where `state` holds no (or several) AccumulateState, an error
  naming the call and the argument `name`."""
  try:
    return fields_of(state)
  except ValueError as error:
    failure = error
  locate_state(f"{where}({name}=...)", state)  # raises, saying how many it found
  raise failure


def restore_checkpoint(
  directory: str | os.PathLike[str],
  target: PyTree,
  *,
  k: KSchedule,
  item: str | None = None,
) -> PyTree:
  """Restores a state saved by `checkpoint.save`, after checking that it fits.

  Before reading any array it compares the checkpoint with `target` (the state
  a fresh run builds: same model, same optimizer) and with `k`, and raises a
  `ValueError` that shows both sides where they differ: leaves present on one
  side only or with other shapes or dtypes, or another window length. Damage to
  any file (a flipped bit, a truncated or missing file) raises a `ValueError`
  that names the file. It also restores one step of an
  `orbax.checkpoint.CheckpointManager` saved with
  `custom_metadata=optaccum.checkpoint.metadata(state, k=...)`: point
  `directory` at the step's directory. Guide: [what restore checks][what-restore-checks].

  Args:
    directory: the checkpoint directory, or a CheckpointManager step's (a str
      or `os.PathLike`); a relative path is taken from the current directory.
    target: a state of the form to restore: a freshly created `TrainState`,
      `(model, optimizer)` NNX objects, or any pytree, with arrays or
      `jax.ShapeDtypeStruct` leaves. Only its structure, shapes and dtypes are
      used.
    k: the `k` of the optimizer that will continue the training, checked as
      `accumulate` checks it.
    item: in a CheckpointManager step that holds several items (saved with
      `ocp.args.Composite`), the one holding the state; None (default) takes
      the only one.

  Returns:
    The restored state, of the form of `target`.

  Raises:
    TypeError: if `directory` is not a str or `os.PathLike`.
    FileNotFoundError: if `directory` is not a directory.
    ValueError: if `directory` is empty or a URL; if `k` is not a positive int
      or a schedule whose value at gradient step 0 is a finite real scalar; if
      `target` holds no (or several) AccumulateState; if the checkpoint's tree
      or window length does not fit, the checkpoint was not written by
      `checkpoint.save` (or with `checkpoint.metadata`), or it is damaged: a
      damaged file never surfaces as an error of Orbax's own.

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
  ocp = _orbax()

  where = "checkpoint.restore"
  directory = _local_path(where, directory)
  _validation.check_k(where, k)
  _fields(where, "target", target)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"`{where}(directory=...)` must be a checkpoint directory, got {directory!r}, "
      "which is not a directory."
    )
  abstract = jax.eval_shape(lambda tree: tree, target)
  item_directory = _item_directory(directory, item)
  sealed = _check_digests(directory)
  record = _read_record(directory, _check_files(directory, item_directory), sealed)
  with _ORBAX_LOCK, ocp.StandardCheckpointer() as checkpointer:
    saved_tree = ocp.tree.to_flat_dict(_tree_metadata(directory, item_directory, sealed))
    _check_tree_matches_record(directory, item_directory, saved_tree, record)
    _check_tree_fits(directory, saved_tree, ocp.tree.to_flat_dict(abstract))
    _check_window_fits(directory, record, k)
    with _reading(directory, item_directory, "its arrays", verified=sealed):
      restored = checkpointer.restore(item_directory, abstract)
  _check_checksums(directory, item_directory, record["checksums"], ocp.tree.to_flat_dict(restored))
  return restored


def _item_directory(directory: str, item: str | None) -> str:
  """Where the arrays of the checkpoint at `directory` lie.

  `directory` itself for `checkpoint.save`'s (and `StandardCheckpointer`'s)
  layout; the folder of one item within a `CheckpointManager` step directory.
  """
  names = set(os.listdir(directory))
  if _holds_item(directory):
    if item is not None:
      raise ValueError(
        f"`checkpoint.restore(item=...)` names an item of a CheckpointManager step, but "
        f"{directory!r} is a checkpoint of one item; leave item=None, got item={item!r}."
      )
    return directory
  folders = sorted(n for n in names if os.path.isdir(os.path.join(directory, n)))
  if _STEP_FILE not in names:
    steps = sorted((n for n in folders if n.isdigit()), key=int)
    latest = steps[-1] if steps else ""
    if steps and os.path.isfile(os.path.join(directory, latest, _STEP_FILE)):
      raise ValueError(
        f"`checkpoint.restore(directory=...)` must be one checkpoint, but {directory!r} is a "
        f"CheckpointManager's directory of steps {', '.join(steps)}: pass "
        f"one step's directory, e.g. {os.path.join(directory, latest)!r}."
      )
    items = [n for n in folders if _holds_item(os.path.join(directory, n))]
    if items:
      raise _damaged(
        directory,
        f"its file {_STEP_FILE} is missing. A CheckpointManager step keeps there the window "
        "length and each array's checksum, without which its arrays (in "
        f"{', '.join(items)}) cannot be checked; Orbax alone restores them unchecked.",
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


def _holds_item(directory: str) -> bool:
  """Whether `directory` holds the files of an item that Orbax saved."""
  return bool(set(os.listdir(directory)) & {_TREE_FILE, "manifest.ocdbt"})


def _check_replicas_agree(where: str, fields: dict[str, list]) -> None:
  """Raises a ValueError where one array of the window's sums differs between its replicas.

  Under `pmap(..., out_axes=None)` (or `in_axes=None` for the state) an
  `accumulate(axis_name=...)` state is declared replicated, but in the middle
  of a window each device holds its own partial sum. Orbax, like
  `jax.device_get`, would write device 0's copy alone and lose the others.
  The copies are compared by their checksums, each computed on the device
  that holds it (one dispatch per device), so only the checksums reach the
  host: not one gradient-sized copy per replica. Two copies that differ have
  the same checksum with a chance of one in 2**32.
  """
  leaves = [
    (name, leaf)
    for name in WINDOW_SUMS
    for leaf in fields.get(name, [])
    if isinstance(leaf, jax.Array)
    and leaf.is_fully_replicated
    and len(leaf.addressable_shards) > 1  # one copy: nothing to compare
  ]
  if not leaves:
    return
  copies: dict[jax.Device, dict[str, jax.Array]] = {}
  for number, (_, leaf) in enumerate(leaves):
    for shard in leaf.addressable_shards:
      copies.setdefault(shard.device, {})[str(number)] = shard.data
  with jax.set_mesh(None):  # each copy on its own device, not on the mesh in context
    sums = jax.device_get([_checksum_tree(on_device) for on_device in copies.values()])
  for number, (name, leaf) in enumerate(leaves):
    held = [int(on_device[str(number)]) for on_device in sums if str(number) in on_device]
    differ = sum(value != held[0] for value in held[1:])
    if differ:
      raise ValueError(
        f"`{where}(state=...)` is declared replicated over {len(held)} devices, but "
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


def _check_digests(directory: str) -> bool:
  """Raises a ValueError naming each file that differs from `checkpoint.save`'s digests of it.

  Returns whether the checkpoint holds the digest file (one written by
  Orbax alone, as a CheckpointManager's step, does not).
  """
  if not os.path.isfile(os.path.join(directory, _DIGESTS_FILE)):
    return False
  content = _read_json(directory, os.path.join(directory, _DIGESTS_FILE))
  files = content.get("files") if isinstance(content, dict) else None
  if not isinstance(files, dict) or content.get("digest") != _digest_of(files):
    raise _damaged(directory, f"its file {_DIGESTS_FILE} does not match its own digest.")
  problems = []
  for name, saved in sorted(files.items()):
    path = os.path.join(directory, *name.split("/"))
    if not os.path.isfile(path):
      problems.append(f"its file {name} is missing.")
      continue
    size, digest = _file_digest(path)
    if size != saved[0]:
      problems.append(f"its file {name} holds {size} bytes, not the {saved[0]} saved.")
    elif digest != saved[1]:
      problems.append(f"its file {name} reads back other than it was saved (SHA-256 differs).")
  if len(problems) > 1:
    raise _damaged(directory, f"{len(problems)} of its files differ:" + _listing(problems))
  if problems:
    raise _damaged(directory, problems[0])
  return True


def _read_json(directory: str, path: str) -> Any:
  """The content of the JSON file at `path`; a ValueError naming it where it is not JSON."""
  try:
    with open(path, "rb") as file:
      return json.loads(file.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    name = os.path.relpath(path, directory)
    raise _damaged(directory, f"its file {name} is not valid JSON ({error}).") from error


def _check_files(directory: str, item_directory: str) -> Any:
  """Raises a ValueError where Orbax's JSON files of the checkpoint are missing or not JSON.

  The step's metadata lies in `directory`, the item's files in `item_directory`
  (the same folder but in a CheckpointManager step). Returns the step's metadata.
  """
  names = set(os.listdir(directory)) | set(os.listdir(item_directory))
  if not names & {_STEP_FILE, _TREE_FILE, "manifest.ocdbt"}:
    raise ValueError(
      "`checkpoint.restore(directory=...)` must be a checkpoint written by "
      f"`optaccum.checkpoint.save` (or a CheckpointManager step), but {directory!r} holds "
      "no Orbax checkpoint."
    )
  required = [_STEP_FILE, os.path.join(os.path.relpath(item_directory, directory), _TREE_FILE)]
  if any(name.startswith("ocdbt.process_") for name in os.listdir(item_directory)):
    # The processes' OCDBT databases, which Orbax joins into one that its manifest opens.
    required.append(os.path.join(os.path.relpath(item_directory, directory), "manifest.ocdbt"))
  for name in required:
    if not os.path.isfile(os.path.join(directory, name)):
      raise _damaged(directory, f"its file {os.path.normpath(name)} is missing.")
  contents = [_read_json(directory, path) for path in _json_files(directory, item_directory)]
  return contents[0]


def _json_files(directory: str, item_directory: str) -> list[str]:
  """The paths of Orbax's JSON files of the checkpoint: the step's metadata, then the item's."""
  names = set(os.listdir(item_directory))
  files = [os.path.join(directory, _STEP_FILE)]
  files += [os.path.join(item_directory, n) for n in (_TREE_FILE, *_OPTIONAL_FILES) if n in names]
  for folder in _OPTIONAL_FOLDERS:
    if folder in names:
      path = os.path.join(item_directory, folder)
      files += [os.path.join(path, name) for name in sorted(os.listdir(path))]
  return files


def _read_record(directory: str, step_metadata: Any, sealed: bool) -> dict[str, Any]:
  """The record `checkpoint.save` (or `checkpoint.metadata`) wrote, after checking it.

  `step_metadata`: the content of the step's metadata file; `sealed`: whether
  the checkpoint holds `checkpoint.save`'s digest file.
  """
  custom = step_metadata.get("custom_metadata") if isinstance(step_metadata, dict) else None
  if not isinstance(custom, dict):  # Orbax writes it always, `{}` at least
    raise _damaged(directory, f"its file {_STEP_FILE} holds no custom metadata field.")
  record = custom.get(_METADATA_KEY)
  # A record under a key of its own: its name damaged.
  misplaced = [
    key for key, value in custom.items() if isinstance(value, dict) and "checksums" in value
  ]
  if record is None and misplaced:
    raise _damaged(
      directory,
      f"its file {_STEP_FILE} holds a record under {misplaced[0]!r}, not {_METADATA_KEY!r}.",
    )
  if record is None:
    raise ValueError(
      f"`checkpoint.restore(directory=...)`: the checkpoint at {directory} records no "
      f"window length (its file {_STEP_FILE} holds no custom metadata {_METADATA_KEY!r}); "
      "save it with `optaccum.checkpoint.save`, or through a CheckpointManager with "
      "`custom_metadata=optaccum.checkpoint.metadata(state, k=...)`."
    )
  _check_record(directory, record, sealed)
  return record


def _check_record(directory: str, record: object, sealed: bool) -> None:
  """Raises a ValueError where the record lacks a field, or differs from its own digest."""
  held = list(record) if isinstance(record, dict) else []
  # A record of optaccum 0.2.0 holds the first fields alone.
  fields: tuple[str, ...] = _RECORD_FIELDS
  if len(held) > len(fields):
    fields += (_SEALED_FIELD, _RECORD_DIGEST_FIELD)
  what = f"its file {_STEP_FILE} holds custom metadata {_METADATA_KEY!r} that"
  missing = [field for field in fields if field not in held]
  if missing:
    raise _damaged(
      directory,
      f"{what} lacks {', '.join(missing)} (it holds {', '.join(map(str, held)) or 'nothing'}).",
    )
  record = cast(dict, record)
  if _RECORD_DIGEST_FIELD in fields:
    rest = {name: value for name, value in record.items() if name != _RECORD_DIGEST_FIELD}
    if record[_RECORD_DIGEST_FIELD] != _digest_of(rest):
      raise _damaged(directory, f"{what} does not match its own digest.")
  checksums = record["checksums"]
  if not (
    all(_is_int(record[name]) for name in _RECORD_FIELDS[:3])
    and isinstance(checksums, dict)
    and all(_is_int(value) for value in checksums.values())
  ):
    raise _damaged(directory, f"{what} holds other than whole numbers.")
  if record.get(_SEALED_FIELD) and not sealed:
    raise _damaged(directory, f"its file {_DIGESTS_FILE} is missing.")


def _is_int(value: object) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _tree_metadata(directory: str, item_directory: str, verified: bool) -> PyTree:
  """The saved tree's metadata, from Orbax's handler, which names what it cannot read.

  (`StandardCheckpointer.metadata` would log the reason and return no tree.)
  """
  ocp = _orbax()
  from etils import epath

  handler = ocp.StandardCheckpointHandler()
  try:
    with _reading(directory, item_directory, "its tree metadata", verified=verified):
      return handler.metadata(epath.Path(item_directory)).tree
  finally:
    handler.close()


def _storage_error(error: BaseException) -> BaseException:
  """TensorStore's error where Orbax wraps it in a bare Exception, else `error`."""
  if type(error) is Exception and error.__cause__ is not None:
    return error.__cause__
  return error


def _reason(error: BaseException) -> str:
  """The error in one line, without the TensorStore spec it may end with."""
  error = _storage_error(error)
  text = (str(error).split(" [tensorstore_spec=")[0].splitlines() or [""])[0]
  return f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def _reading(directory: str, item_directory: str, what: str, *, verified: bool) -> Iterator[None]:
  """Turns an error inside Orbax from a damaged file into a ValueError naming the file.

  A damaged file surfaces as TensorStore's error on reading it, or as an
  error Orbax (or the JSON decoder it calls) raises on a field it cannot
  parse: a KeyError, a NotImplementedError, an AssertionError. Where such an
  error names no file, the message names the item's JSON files, which Orbax
  parses there. Other errors (JAX's, on a target it cannot place; lack of
  memory) pass through unchanged, as do all but TensorStore's in a checkpoint
  whose files were `verified` against their digests.
  """
  try:
    yield
  except Exception as error:  # Orbax wraps TensorStore's errors in a bare Exception.
    cause = _storage_error(error)
    text = str(cause)
    storage = isinstance(cause, ValueError) and text.startswith(_STORAGE_CODES)
    if not storage and (verified or not _raised_parsing(cause)):
      raise
    culprits = _files_named(directory, item_directory, text) or [
      os.path.relpath(path, directory) for path in _json_files(directory, item_directory)[1:]
    ]
    where = " or ".join(culprits)
    raise _damaged(
      directory, f"Orbax cannot read {what} from {where} ({_reason(error)})."
    ) from error


def _raised_parsing(error: BaseException) -> bool:
  """Whether `error` was raised inside Orbax, where bad metadata surfaces.

  Inside Orbax or the standard library it calls (the JSON decoder, `enum`):
  the innermost frame outside the standard library is Orbax's, not JAX's.
  """
  packages = []
  trace = error.__traceback__
  while trace is not None:
    packages.append(str(trace.tb_frame.f_globals.get("__name__", "")).split(".")[0])
    trace = trace.tb_next
  outside = [name for name in packages if name not in sys.stdlib_module_names]
  return bool(outside) and outside[-1] == "orbax"


def _files_named(directory: str, item_directory: str, text: str) -> list[str]:
  """The checkpoint's files that TensorStore's error `text` names, relative to `directory`.

  A file it names itself; else the files holding the OCDBT entry it names.
  """
  # The database's own folder ends with a separator, the files in it do not.
  named = [path for path in _LOCAL_FILE.findall(text) if not path.endswith(("/", os.sep))]
  if named:
    return [os.path.relpath(named[-1], directory)]  # the innermost
  keys = _OCDBT_KEY.findall(text)
  files = _ocdbt_files(item_directory) if keys else {}
  found = [file for key in keys for file in files.get(key, [])]
  return [os.path.relpath(os.path.join(item_directory, n), directory) for n in dict.fromkeys(found)]


def _ocdbt_files(item_directory: str) -> dict[str, list[str]]:
  """The files holding each entry of the item's OCDBT database, by key; {} if unreadable.

  An entry's value lies inline in a B-tree node's file, or in a data file of
  its own; TensorStore's `ocdbt.dump` gives both as `kind:base:path:offset:length`.
  """
  import tensorstore as ts

  found: dict[str, list[str]] = {}
  try:
    store = ts.KvStore.open({"driver": "file", "path": os.path.join(item_directory, "")}).result()
    manifest = ts.ocdbt.dump(store).result()
    pending = [version["root"]["location"] for version in manifest["versions"][-1:]]
    while pending:
      location = pending.pop()
      for entry in ts.ocdbt.dump(store, location).result().get("entries", []):
        values = [v for v in entry.values() if isinstance(v, str) and ":" in v]
        pending += [v for v in values if v.startswith("btreenode:")]
        held = [v for v in values if v.startswith("value:")] or [location]
        if "inline_value" in entry or "indirect_value" in entry:
          key = entry["key"].decode() if isinstance(entry["key"], bytes) else str(entry["key"])
          found.setdefault(key, []).extend(_location_file(value) for value in held)
  except Exception:  # a database too damaged to map: the message names no file
    return {}
  return found


def _location_file(location: str) -> str:
  """The file of an OCDBT location `kind:base:path:offset:length`, relative to the database."""
  _, base, path, *_ = location.split(":")
  return base + path


def _check_tree_matches_record(
  directory: str, item_directory: str, saved: dict[tuple, _Shaped], record: dict[str, Any]
) -> None:
  """Raises a ValueError where the tree metadata lists other leaves than the record's.

  (A flipped bit that turns a None's type into an unknown one lists a leaf.)
  """
  listed = {_leaf_name(key) for key in saved}
  recorded = set(record["checksums"])
  if listed != recorded:
    lines = [f"{name}: listed, not saved" for name in sorted(listed - recorded)]
    lines += [f"{name}: saved, not listed" for name in sorted(recorded - listed)]
    name = os.path.relpath(os.path.join(item_directory, _TREE_FILE), directory)
    raise _damaged(
      directory, f"its file {name} lists other leaves than were saved:" + _listing(lines)
    )


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


def _check_checksums(
  directory: str, item_directory: str, saved: dict, restored: dict[tuple, ArrayLike]
) -> None:
  """Raises a ValueError naming the leaves whose restored bits differ from the saved ones.

  Each leaf is named with the files its data lies in.
  """
  computed = _checksums(restored)
  differ = [name for name, value in computed.items() if saved.get(name) != value]
  if differ:
    files = _ocdbt_files(item_directory)
    lines = []
    for name in differ:
      held = [
        os.path.relpath(os.path.join(item_directory, file), directory)
        for key, files_of_key in files.items()
        if key.startswith(f"{name}/") and not key.endswith(_ZARR_METADATA)
        for file in files_of_key
      ]
      lines.append(f"{name} (in {', '.join(dict.fromkeys(held))})" if held else name)
    raise _damaged(
      directory,
      f"the data of {len(differ)} of its {len(computed)} leaves reads back other than "
      "it was saved (checksums differ):" + _listing(lines),
    )
