"""Checkpoints at their edges: any damage to any file, a step without its metadata, replicas.

For every file Orbax writes for a checkpoint, and every damage (one flipped byte at
its start, middle and end, and every few bytes of the small JSON files; truncated
to nothing or to half; deleted), `checkpoint.restore` either raises a ValueError
naming the call, the directory and the damaged file, or restores the state bit
for bit: never another error, never another state. `checkpoint.save`'s checkpoints
name the file by its digest; a CheckpointManager's steps, written by Orbax alone,
by the error Orbax meets or by the arrays' checksums. And a save of replicated
state copies each distinct sum to the host once.

Run as a module (`python -m tests.test_edges_checkpoint MODE ...`), this file is
the child process of the tests that need one: restores that TensorStore fails on
(its threads report the failures after the fact) and 8 CPU devices.
"""

import functools
import json
import os
import pathlib
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optaccum
from optaccum import _checkpoint

EVERY_K = 3
LARGE = 100_000
DEVICES = 8
# Flipping 0x10 turns "jax.Array" into "jax.Qrray"; 0x01 and 0x20 turn digits,
# letters and their case into others.
FLIPS = (0x10, 0x01, 0x20)
# The small JSON files are flipped every this many bytes too, by turns with each of FLIPS.
STRIDE = 71


@functools.cache
def saved_state():
  """A state one micro-step into a window: a large leaf, small ones, bfloat16 and int32."""
  rng = np.random.default_rng(0)
  params = {
    "large": jnp.asarray(rng.normal(size=LARGE).astype(np.float32)),
    "half": jnp.asarray(rng.normal(size=64), jnp.bfloat16),
    "small": jnp.asarray([1.0, -2.0, 3.5], jnp.float32),
  }
  tx = optaccum.accumulate(optax.sgd(0.1), EVERY_K)
  grads = jax.tree.map(lambda leaf: jnp.full_like(leaf, 0.25), params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  return params, opt_state, {"count": jnp.arange(4, dtype=jnp.int32)}


def fresh_state():
  """A state as a run starts it: for the checks that refuse an argument before any save."""
  params = {"w": jnp.ones(3, jnp.float32)}
  return params, optaccum.accumulate(optax.sgd(0.1), EVERY_K).init(params)


def bits(tree):
  """Each leaf's dtype and bytes, by path."""
  return {
    jax.tree_util.keystr(path): (str(leaf.dtype), np.asarray(leaf).tobytes())
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def files(directory):
  """The files below `directory`, relative to it, sorted."""
  return sorted(
    os.path.relpath(os.path.join(root, name), directory)
    for root, _, names in os.walk(directory)
    for name in names
  )


def is_small_json(path):
  with open(path, "rb") as file:
    return os.path.getsize(path) < 8192 and file.read(1) == b"{"


def flip(position, mask):
  def damage(path):
    with open(path, "rb") as file:
      data = bytearray(file.read())
    data[position(len(data))] ^= mask
    with open(path, "wb") as file:
      file.write(bytes(data))

  return damage


def truncate(fraction):
  def damage(path):
    with open(path, "rb") as file:
      data = file.read()
    with open(path, "wb") as file:
      file.write(data[: int(len(data) * fraction)])

  return damage


DAMAGES = {
  "first byte flipped": flip(lambda size: 0, FLIPS[0]),
  "middle byte flipped": flip(lambda size: size // 2, FLIPS[0]),
  "last byte flipped": flip(lambda size: size - 1, FLIPS[0]),
  "truncated to nothing": truncate(0),
  "truncated to half": truncate(0.5),
  "deleted": os.remove,
}


def cases(checkpoint):
  """(file, damage name, damage) for each file of `checkpoint` and each damage."""
  found = []
  for name in files(checkpoint):
    found += [(name, damage, DAMAGES[damage]) for damage in DAMAGES]
    if is_small_json(os.path.join(checkpoint, name)):
      for number, position in enumerate(
        range(STRIDE, os.path.getsize(os.path.join(checkpoint, name)), STRIDE)
      ):
        mask = FLIPS[number % len(FLIPS)]
        found.append((name, f"byte {position} ^ {mask:#x}", flip(lambda _, p=position: p, mask)))
  return found


def damaged_copies(checkpoint, root):
  """One damaged copy of `checkpoint` under `root` per case: [(directory, file, damage)]."""
  made = []
  for number, (name, what, damage) in enumerate(cases(checkpoint)):
    directory = os.path.join(root, str(number))
    shutil.copytree(checkpoint, directory)
    damage(os.path.join(directory, name))
    made.append((directory, name, what))
  return made


def outcome(directory):
  """What `checkpoint.restore` does with `directory`: [error type, message], or whether it
  restored the saved state bit for bit."""
  state = saved_state()
  try:
    restored = optaccum.checkpoint.restore(directory, state, k=EVERY_K)
  except Exception as error:  # the tests assert on its type
    return [type(error).__name__, str(error)]
  return ["restored", "bit-identical" if bits(restored) == bits(state) else "different"]


def damaged(directory):
  return f"`checkpoint.restore(directory=...)`: the checkpoint at {directory} is damaged: "


def check_named_or_identical(directory, name, result):
  """The invariant: a ValueError naming the call, the directory and the file, or the state."""
  error_type, message = result
  if error_type == "restored":
    return message == "bit-identical"
  return error_type == "ValueError" and message.startswith(damaged(directory)) and name in message


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
  """A checkpoint written by `checkpoint.save`."""
  path = tmp_path_factory.mktemp("sealed") / "checkpoint"
  optaccum.checkpoint.save(path, saved_state(), k=EVERY_K)
  return str(path)


@pytest.fixture(scope="module")
def step(tmp_path_factory):
  """Step 7 of a CheckpointManager, saved with `checkpoint.metadata`."""
  root = tmp_path_factory.mktemp("manager")
  state = saved_state()
  with ocp.CheckpointManager(root) as manager:
    metadata = optaccum.checkpoint.metadata(state, k=EVERY_K)
    manager.save(7, args=ocp.args.StandardSave(state), custom_metadata=metadata)
    manager.wait_until_finished()
  return str(root / "7")


def test_save_writes_every_kind_of_orbax_file_and_its_digests(sealed):
  kinds = {
    name if "/d/" not in f"/{name}" else name.rsplit("/", 1)[0] + "/*" for name in files(sealed)
  }
  assert kinds == {
    "_CHECKPOINT_METADATA",
    "_METADATA",
    "_OPTACCUM_DIGESTS",
    "_sharding",
    "array_metadatas/process_0",
    "commit_success.txt",
    "d/*",
    "manifest.ocdbt",
    "ocdbt.process_0/d/*",
    "ocdbt.process_0/manifest.ocdbt",
  }
  # And nothing is left beside it.
  assert os.listdir(os.path.dirname(sealed)) == ["checkpoint"]


def expected_in_sealed(directory, name, what, size):
  """The message for damage `what` to file `name` (of `size` bytes) of a sealed checkpoint;
  None where several may come (the digest file's own, flipped)."""
  if what == "deleted":
    return damaged(directory) + f"its file {name} is missing."
  if name == "_OPTACCUM_DIGESTS":
    return (
      damaged(directory) + f"its file {name} is not valid JSON (" if "truncated" in what else None
    )
  if what.startswith("truncated"):
    kept = 0 if what == "truncated to nothing" else size // 2
    return damaged(directory) + f"its file {name} holds {kept} bytes, not the {size} saved."
  return (
    damaged(directory) + f"its file {name} reads back other than it was saved (SHA-256 differs)."
  )


def test_any_damage_to_any_file_of_a_save_names_the_file(sealed, tmp_path):
  wrong = []
  for directory, name, what in damaged_copies(sealed, tmp_path):
    result = outcome(directory)
    expected = expected_in_sealed(
      directory, name, what, os.path.getsize(os.path.join(sealed, name))
    )
    if expected is None:  # the digest file: not JSON, not its own digest, or the same JSON
      right = result == ["restored", "bit-identical"] or (
        result[0] == "ValueError"
        and (
          result[1] == damaged(directory) + f"its file {name} does not match its own digest."
          or result[1].startswith(damaged(directory) + f"its file {name} is not valid JSON (")
        )
      )
    else:
      right = result[0] == "ValueError" and result[1].startswith(expected)
    if not right:
      wrong.append(f"{name}, {what}: {result}")
  assert wrong == []


def test_the_undamaged_save_restores_bit_identically(sealed, tmp_path):
  shutil.copytree(sealed, tmp_path / "copy")
  assert outcome(tmp_path / "copy") == ["restored", "bit-identical"]


def test_any_damage_to_any_file_of_a_manager_step_is_named_or_harmless(step, tmp_path, run_python):
  made = damaged_copies(step, tmp_path)
  # In a child process: TensorStore's threads report the reads it failed after the fact.
  results = run_python(
    ["-m", "tests.test_edges_checkpoint", "restore", *(d for d, _, _ in made)],
    num_devices=1,
    timeout=300,
  )
  wrong = [
    f"{name}, {what}: {result}"
    for (directory, name, what), result in zip(made, results, strict=True)
    if not check_named_or_identical(directory, name, result)
  ]
  assert wrong == []
  # Damage to the files Orbax reads is found, not left to chance.
  found = {name for (_, name, _), (kind, _) in zip(made, results) if kind == "ValueError"}
  assert {"_CHECKPOINT_METADATA", "default/_METADATA", "default/manifest.ocdbt"} <= found


def test_a_manager_step_that_lost_its_metadata_names_the_file(step, tmp_path):
  shutil.copytree(step, tmp_path / "7")
  os.remove(tmp_path / "7" / "_CHECKPOINT_METADATA")
  assert outcome(tmp_path / "7") == [
    "ValueError",
    damaged(tmp_path / "7") + "its file _CHECKPOINT_METADATA is missing. A CheckpointManager "
    "step keeps there the window length and each array's checksum, without which its arrays "
    "(in default) cannot be checked; Orbax alone restores them unchecked.",
  ]


def test_a_none_turned_into_a_leaf_by_a_flipped_bit_is_named_with_its_file(step, tmp_path):
  shutil.copytree(step, tmp_path / "7")
  path = tmp_path / "7" / "default" / "_METADATA"
  tree = json.loads(path.read_text())["tree_metadata"]
  # The first None of the tree (an optimizer's empty state): its type "None" becomes "Nond".
  keys = next(
    entry["key_metadata"]
    for entry in tree.values()
    if entry["value_metadata"]["value_type"] == "None"
  )
  data = bytearray(path.read_bytes())
  at = data.index(b'"value_type": "None"') + len(b'"value_type": "Non')
  data[at] ^= 0x01
  path.write_bytes(bytes(data))
  leaf = ".".join(key["key"] for key in keys)
  # Orbax reads it as a leaf of unknown type, which no record lists.
  assert outcome(tmp_path / "7") == [
    "ValueError",
    damaged(tmp_path / "7") + "its file default/_METADATA lists other leaves than were saved:"
    f"\n  {leaf}: listed, not saved",
  ]


def edit_record(directory, edit):
  path = os.path.join(directory, "_CHECKPOINT_METADATA")
  with open(path) as file:
    content = json.load(file)
  edit(content["custom_metadata"]["optaccum"])
  with open(path, "w") as file:
    json.dump(content, file)


def test_a_changed_window_length_in_the_record_is_named_not_restored(step, tmp_path):
  shutil.copytree(step, tmp_path / "7")
  edit_record(tmp_path / "7", lambda record: record.update(k=2))
  # Without the record's own digest, k=2 would restore as if saved with it.
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path / "7", saved_state(), k=2)
  assert str(error.value) == damaged(tmp_path / "7") + (
    "its file _CHECKPOINT_METADATA holds custom metadata 'optaccum' that does not match its "
    "own digest."
  )


def test_a_record_of_optaccum_0_2_0_still_restores(step, tmp_path):
  shutil.copytree(step, tmp_path / "7")

  def as_in_0_2_0(record):
    del record["sealed"], record["record_digest"]

  edit_record(tmp_path / "7", as_in_0_2_0)
  assert outcome(tmp_path / "7") == ["restored", "bit-identical"]


def test_save_refuses_an_existing_or_remote_directory_and_replaces_an_interrupted_save(tmp_path):
  os.mkdir(tmp_path / "taken")
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.save(tmp_path / "taken", saved_state(), k=EVERY_K)
  assert str(error.value) == (
    "`checkpoint.save(directory=...)` must be a directory that does not exist yet, got "
    f"{str(tmp_path / 'taken')!r}, which exists."
  )
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.save("gs://bucket/step_1", saved_state(), k=EVERY_K)
  assert str(error.value) == (
    "`checkpoint.save(directory=...)` must be a local directory, which `checkpoint.restore` "
    "reads, got 'gs://bucket/step_1'."
  )
  # What an interrupted save leaves, before Orbax had finished.
  os.mkdir(tmp_path / "new.optaccum-unsealed")
  (tmp_path / "new.optaccum-unsealed" / "_METADATA").write_text("{")
  optaccum.checkpoint.save(tmp_path / "new", saved_state(), k=EVERY_K)
  assert sorted(os.listdir(tmp_path)) == ["new", "taken"]
  assert outcome(tmp_path / "new") == ["restored", "bit-identical"]


def exactly(message):
  """A `pytest.raises(match=...)` pattern for `message` alone."""
  return f"^{re.escape(message)}$"


def test_save_and_restore_take_a_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  optaccum.checkpoint.save("checkpoint", saved_state(), k=EVERY_K)
  assert os.listdir(tmp_path) == ["checkpoint"]
  assert outcome("checkpoint") == ["restored", "bit-identical"]
  assert outcome(pathlib.Path("checkpoint")) == ["restored", "bit-identical"]


def test_restore_takes_a_manager_step_by_a_relative_path(step, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  relative = os.path.relpath(step)  # up out of tmp_path, into the manager's directory
  assert not os.path.isabs(relative)
  assert outcome(relative) == ["restored", "bit-identical"]


def test_save_refuses_an_empty_path_and_the_current_directory(tmp_path, monkeypatch):
  work = tmp_path / "work"
  os.mkdir(work)
  monkeypatch.chdir(work)
  with pytest.raises(
    ValueError,
    match=exactly("`checkpoint.save(directory=...)` must name a directory, got directory=''."),
  ):
    optaccum.checkpoint.save("", fresh_state(), k=EVERY_K)
  for current in [".", str(work), "missing/..", pathlib.Path()]:
    with pytest.raises(
      ValueError,
      match=exactly(
        "`checkpoint.save(directory=...)` must be a directory that does not exist yet, got "
        f"{str(work)!r}, which exists."
      ),
    ):
      optaccum.checkpoint.save(current, fresh_state(), k=EVERY_K)
  # Nothing written, in the current directory or beside it.
  assert os.listdir(work) == []
  assert os.listdir(tmp_path) == ["work"]


CALLS_WITH_DIRECTORY = {
  "checkpoint.save": lambda directory: optaccum.checkpoint.save(
    directory, fresh_state(), k=EVERY_K
  ),
  "checkpoint.restore": lambda directory: optaccum.checkpoint.restore(
    directory, fresh_state(), k=EVERY_K
  ),
}


@pytest.mark.parametrize("call", CALLS_WITH_DIRECTORY)
@pytest.mark.parametrize("directory", [None, 3, b"/tmp/checkpoint"])
def test_a_directory_that_is_not_a_path_is_refused_naming_the_call(call, directory):
  with pytest.raises(
    TypeError,
    match=exactly(
      f"`{call}(directory=...)` must be a path, a str or an os.PathLike such as pathlib.Path, "
      f"got directory={directory!r}."
    ),
  ):
    CALLS_WITH_DIRECTORY[call](directory)


def test_restore_refuses_an_empty_or_remote_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(
    ValueError,
    match=exactly("`checkpoint.restore(directory=...)` must name a directory, got directory=''."),
  ):
    optaccum.checkpoint.restore("", fresh_state(), k=EVERY_K)
  with pytest.raises(
    ValueError,
    match=exactly(
      "`checkpoint.restore(directory=...)` must be a local directory, which `checkpoint.restore` "
      "reads, got 'gs://bucket/step_1'."
    ),
  ):
    optaccum.checkpoint.restore("gs://bucket/step_1", fresh_state(), k=EVERY_K)


def fail_sealing(seal):
  """Fails as a full disk would, where the digest file is written."""

  def failing(directory):
    raise OSError(28, "No space left on device")

  return failing


def take_the_directory_meanwhile(seal):
  """Seals, then, as another process would, writes the directory the save renames to."""

  def sealing_then_taking(directory):
    seal(directory)
    taken = directory.removesuffix(".optaccum-unsealed")
    os.mkdir(taken)
    with open(os.path.join(taken, "theirs.txt"), "w") as file:
      file.write("another save's")

  return sealing_then_taking


@pytest.mark.parametrize(
  "failure, left",
  [(fail_sealing, []), (take_the_directory_meanwhile, ["checkpoint"])],
  ids=["sealing fails", "directory taken meanwhile"],
)
def test_a_save_that_fails_after_orbax_wrote_leaves_no_unsealed_folder(
  failure, left, tmp_path, monkeypatch
):
  monkeypatch.setattr(_checkpoint, "_seal", failure(_checkpoint._seal))
  with pytest.raises(OSError):
    optaccum.checkpoint.save(tmp_path / "checkpoint", saved_state(), k=EVERY_K)
  assert os.listdir(tmp_path) == left
  if left:  # the other save's directory, untouched
    assert os.listdir(tmp_path / "checkpoint") == ["theirs.txt"]


def test_a_save_that_orbax_fails_leaves_no_unsealed_folder(tmp_path, run_python):
  # In a child: Orbax's background threads report the failure after the fact.
  result = run_python(
    ["-m", "tests.test_edges_checkpoint", "failed_save", str(tmp_path)], num_devices=1, timeout=120
  )
  # Orbax had created its temporary folder when TensorStore refused the dtype.
  assert result == {
    "error": 'ValueError: Error parsing object member "dtype": Unsupported data type: "uint4"',
    "left": [],
  }


def sticky(value):
  return lambda gradient_step: value


NOT_A_POSITIVE_INT = (
  "must be a positive int (at most 2**31 - 1, the largest int32 counter) or a callable "
  "`gradient_step -> k`, got k={!r}."
)
BAD_K = [
  (0, NOT_A_POSITIVE_INT.format(0)),
  (-1, NOT_A_POSITIVE_INT.format(-1)),
  (True, NOT_A_POSITIVE_INT.format(True)),
  (2.5, NOT_A_POSITIVE_INT.format(2.5)),
  ("4", NOT_A_POSITIVE_INT.format("4")),
  (
    sticky(jnp.nan),
    "must return a finite number of micro-steps, but at gradient step 0 it returned nan.",
  ),
  (
    sticky(jnp.inf),
    "must return a finite number of micro-steps, but at gradient step 0 it returned inf.",
  ),
  (sticky(None), "must return a real scalar, but at gradient step 0 it returned None."),
  (sticky("4"), "must return a real scalar, but at gradient step 0 it returned '4'."),
]
CALLS_WITH_K = {
  "checkpoint.save": lambda directory, k: optaccum.checkpoint.save(directory, fresh_state(), k=k),
  "checkpoint.metadata": lambda directory, k: optaccum.checkpoint.metadata(fresh_state(), k=k),
  "checkpoint.restore": lambda directory, k: optaccum.checkpoint.restore(
    directory, fresh_state(), k=k
  ),
}


@pytest.mark.parametrize("call", CALLS_WITH_K)
@pytest.mark.parametrize(
  "k, message", BAD_K, ids=["0", "-1", "True", "2.5", "'4'", "nan", "inf", "None", "returns '4'"]
)
def test_a_k_that_accumulate_refuses_is_refused_naming_the_call(call, k, message, tmp_path):
  # accumulate refuses it, with the same words.
  with pytest.raises(ValueError, match=exactly(f"`accumulate(k=...)` {message}")):
    optaccum.accumulate(optax.sgd(0.1), k)
  with pytest.raises(ValueError, match=exactly(f"`{call}(k=...)` {message}")):
    CALLS_WITH_K[call](tmp_path / "checkpoint", k)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  "call, argument",
  [
    ("checkpoint.save", "state"),
    ("checkpoint.metadata", "state"),
    ("checkpoint.restore", "target"),
  ],
)
@pytest.mark.parametrize("count", [0, 2])
def test_a_state_without_exactly_one_accumulate_state_is_refused_naming_the_argument(
  call, argument, count, tmp_path
):
  params, opt_state = fresh_state()
  state = (params, *[opt_state] * count)
  run = {
    "checkpoint.save": lambda: optaccum.checkpoint.save(tmp_path / "checkpoint", state, k=EVERY_K),
    "checkpoint.metadata": lambda: optaccum.checkpoint.metadata(state, k=EVERY_K),
    "checkpoint.restore": lambda: optaccum.checkpoint.restore(tmp_path, state, k=EVERY_K),
  }[call]
  with pytest.raises(
    ValueError,
    match=exactly(
      f"`{call}({argument}=...)` must hold exactly one optaccum AccumulateState (from "
      f"`optaccum.accumulate`), found {count} in a state of type tuple."
    ),
  ):
    run()
  assert os.listdir(tmp_path) == []


def test_a_replicated_save_copies_each_distinct_sum_to_the_host_once(tmp_path, run_python):
  result = run_python(
    ["-m", "tests.test_edges_checkpoint", "replicas", str(tmp_path)],
    num_devices=DEVICES,
    timeout=300,
  )
  leaf_bytes = 4 * LARGE
  # Plain jit over 8 devices, parameters and accumulator replicated: one copy of
  # each, not one per device (the replicas are compared by their checksums).
  assert result["replicated"]["host_bytes"] == 2 * leaf_bytes
  assert result["replicated"]["restored"] == "bit-identical"
  # axis_name: each replica holds its own partial sum, and each is saved once.
  assert result["per_replica"]["replicas_differ"]
  assert result["per_replica"]["host_bytes"] == (DEVICES + 1) * leaf_bytes
  assert result["per_replica"]["restored"] == "bit-identical"
  # One flipped bit in one device's copy of a replicated sum is still refused.
  assert result["one_bit_off"].startswith(
    "`checkpoint.save(state=...)` is declared replicated over 8 devices, but 1 of them hold "
    "other partial sums in a leaf of `acc_grads` of shape [100000], in the middle of a window"
  )


def host_bytes(save):
  """Bytes of JAX arrays turned into NumPy arrays while `save()` runs, in copies of 1 KiB or more.

  Counts `np.asarray`, `np.array` and `jax.device_get` (through `__array__`),
  the ways Orbax and optaccum bring an array to the host.
  """
  array_type = type(jnp.zeros(()))
  originals = np.asarray, np.array, array_type.__array__
  sizes, inside = [], []

  def counted(convert):
    def wrapper(value, *args, **kwargs):
      if isinstance(value, jax.Array) and not inside:
        sizes.append(value.nbytes)
      inside.append(True)
      try:
        return convert(value, *args, **kwargs)
      finally:
        inside.pop()

    return wrapper

  np.asarray, np.array, array_type.__array__ = (counted(convert) for convert in originals)
  try:
    save()
  finally:
    np.asarray, np.array, array_type.__array__ = originals
  return sum(size for size in sizes if size >= 1024)


def replicas(directory):
  """The child of test_a_replicated_save_copies_each_distinct_sum_to_the_host_once."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == DEVICES, jax.devices()
  # Auto axes: an Explicit mesh's arrays restore into a target Orbax cannot place.
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2 * DEVICES, LARGE)).astype(np.float32)

  def loss(params, x):
    return jnp.sum(params["w"] * jnp.mean(jnp.sin(x), axis=0))

  results = {}
  with jax.set_mesh(mesh):
    params = {
      "w": jax.device_put(rng.normal(size=LARGE).astype(np.float32), NamedSharding(mesh, P()))
    }
    batch = jax.device_put(x, NamedSharding(mesh, P("data")))
    for name, tx, grad in [
      ("replicated", optaccum.accumulate(optax.sgd(0.1), EVERY_K), jax.grad(loss)),
      (
        "per_replica",
        optaccum.accumulate(optax.sgd(0.1), EVERY_K, axis_name=("data",)),
        optaccum.parallel.per_replica(jax.grad(loss), axis_name=("data",)),
      ),
    ]:
      opt_state = tx.init(params)
      # As a training loop must on an Auto mesh: the state keeps its shardings.
      update = jax.jit(
        lambda p, s, b: tx.update(grad(p, b), s, p)[1],
        out_shardings=jax.tree.map(lambda leaf: leaf.sharding, opt_state),
      )
      opt_state = update(params, opt_state, batch)
      state = (params, opt_state)
      path = os.path.join(directory, name)
      sums = np.asarray(opt_state.acc_grads["w"])
      results[name] = {
        "host_bytes": host_bytes(lambda: optaccum.checkpoint.save(path, state, k=EVERY_K)),
        "replicas_differ": sums.ndim == 2 and not all(np.array_equal(sums[0], s) for s in sums[1:]),
      }
      fresh = (params, tx.init(params))
      restored = optaccum.checkpoint.restore(path, fresh, k=EVERY_K)
      same = bits(restored) == bits(state)
      results[name]["restored"] = "bit-identical" if same else "different"

    # A replicated sum whose last device holds one bit more: as pmap with
    # out_axes=None leaves a mid-window sum.
    fresh_state = optaccum.accumulate(optax.sgd(0.1), EVERY_K).init(params)
    copies = [np.asarray(params["w"]) for _ in range(DEVICES)]
    copies[-1] = copies[-1].copy()
    copies[-1].view(np.uint32)[0] ^= 1
    lying = jax.make_array_from_single_device_arrays(
      (LARGE,),
      NamedSharding(mesh, P()),
      [jax.device_put(c, d) for c, d in zip(copies, mesh.devices.flat)],
    )
    opt_state = fresh_state._replace(mini_step=jnp.ones((), jnp.int32), acc_grads={"w": lying})
    try:
      optaccum.checkpoint.save(os.path.join(directory, "lying"), (params, opt_state), k=EVERY_K)
      results["one_bit_off"] = "saved"
    except ValueError as error:
      results["one_bit_off"] = str(error)
  return results


def failed_save(directory):
  """The child of test_a_save_that_orbax_fails_leaves_no_unsealed_folder."""
  state = (*saved_state(), {"nibbles": jnp.zeros(4, jnp.uint4)})  # TensorStore has no uint4
  try:
    optaccum.checkpoint.save(os.path.join(directory, "checkpoint"), state, k=EVERY_K)
    error = "saved"
  except ValueError as raised:
    error = f"{type(raised).__name__}: {raised}"
  return {"error": error, "left": sorted(os.listdir(directory))}


if __name__ == "__main__":
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  mode, *arguments = sys.argv[1:]
  if mode == "restore":
    print(json.dumps([outcome(directory) for directory in arguments]))
  elif mode == "failed_save":
    print(json.dumps(failed_save(*arguments)))
  else:
    print(json.dumps(replicas(*arguments)))
