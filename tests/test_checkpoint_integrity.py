"""Checkpoints restored wrong in silence: flipped bits, damaged Orbax files, saves from threads.

Each damage, done to the files Orbax writes or to the values behind a checkpoint's
record, must end in a `ValueError` that names the checkpoint directory and what
is wrong; and saves from two threads at once must all land. `checkpoint.save`
seals its checkpoints with each file's digest, which finds any damage first
(tests/test_edges_checkpoint.py); the damage here is done to checkpoints written
by Orbax with `checkpoint.metadata`, as a CheckpointManager writes them, where
the arrays' checksums and the errors Orbax meets must name it.
"""

import json
import os
import pathlib
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optaccum

EVERY_K = 3
LARGE = 200_000


def with_optimizer(leaves):
  """`(leaves, opt_state)`: a state `checkpoint.save` takes, the leaves first."""
  params = {"w": jnp.zeros(3, jnp.float32)}
  return leaves, optaccum.accumulate(optax.sgd(0.1), EVERY_K).init(params)


def damaged(directory):
  return f"`checkpoint.restore(directory=...)`: the checkpoint at {directory} is damaged: "


def save_unsealed(directory, state, record_of=None):
  """Saves `state` with Orbax alone, under the record of `record_of` (default: `state`)."""
  metadata = optaccum.checkpoint.metadata(record_of or state, k=EVERY_K)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, state, custom_metadata=metadata)


def only_file(folder):
  (name,) = os.listdir(folder)
  return name


def flip_one_bit(leaf):
  """`leaf` with the lowest bit of its last byte flipped (for a bool: its last entry)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = flip_one_bit(jax.random.key_data(leaf))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  data = np.array(leaf)
  data.reshape(-1).view(np.uint8)[-1] ^= 1
  return jnp.asarray(data)


def bits(leaf):
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf).tobytes()


def every_kind_of_leaf(x64):
  if x64:
    return {
      "complex128": jnp.asarray([1 + 2j, -3j], jnp.complex128),
      "float64": jnp.asarray([1.0, 1.0 + 2.0**-40], jnp.float64),
      "int64": jnp.asarray([2**40, -1], jnp.int64),
      "uint64": jnp.asarray([2**63, 1], jnp.uint64),
    }
  return {
    "bool": jnp.asarray([True, False, True]),
    "bfloat16": jnp.asarray([1.0, -2.5], jnp.bfloat16),
    "complex64": jnp.asarray([1 + 2j], jnp.complex64),
    "float16": jnp.asarray([[0.5, 3.0]], jnp.float16),
    "float32": jnp.asarray(1.0002441, jnp.float32),
    "int4": jnp.asarray([1, -3, 7], jnp.int4),
    "int8": jnp.arange(5, dtype=jnp.int8),
    "key": jax.random.split(jax.random.key(0), 2),
  }


@pytest.mark.parametrize("x64", [False, True])
def test_one_flipped_bit_in_any_kind_of_leaf_is_named_at_restore(tmp_path, x64):
  with jax.enable_x64(x64):
    leaves = every_kind_of_leaf(x64)
    saved = with_optimizer(leaves)
    optaccum.checkpoint.save(tmp_path / "saved", saved, k=EVERY_K)
    restored = optaccum.checkpoint.restore(tmp_path / "saved", saved, k=EVERY_K)
    for name, leaf in leaves.items():
      assert restored[0][name].dtype == leaf.dtype, name
      assert bits(restored[0][name]) == bits(leaf), name

    # The same tree with one bit flipped in every leaf, under the record of `saved`
    # (and without the digests of `checkpoint.save`, which would name the files first).
    flipped = with_optimizer({name: flip_one_bit(leaf) for name, leaf in leaves.items()})
    save_unsealed(tmp_path / "flipped", flipped, record_of=saved)
    with pytest.raises(ValueError) as error:
      optaccum.checkpoint.restore(tmp_path / "flipped", saved, k=EVERY_K)
  total = len(ocp.tree.to_flat_dict(saved))
  # Values this small lie inline in the one node of the OCDBT tree, in d/.
  node = "d/" + only_file(tmp_path / "flipped" / "d")
  assert str(error.value).splitlines() == [
    damaged(tmp_path / "flipped")
    + f"the data of {len(leaves)} of its {total} leaves reads back other than it was saved "
    "(checksums differ):",
    *(f"  0.{name} (in {node})" for name in sorted(leaves)),
  ]


def largest_file(directory):
  files = [path for path in pathlib.Path(directory).rglob("*") if path.is_file()]
  return max(files, key=lambda path: path.stat().st_size)


@pytest.mark.parametrize("sealed", [True, False])
def test_a_bit_flipped_on_disk_in_a_large_leaf_is_named_at_restore(tmp_path, sealed):
  rng = np.random.default_rng(0)
  # Random values compress little, so the largest file Orbax writes holds them.
  large = jnp.asarray(rng.normal(size=LARGE).astype(np.float32))
  state = with_optimizer({"large": large, "small": jnp.ones(3, jnp.float32)})
  if sealed:
    optaccum.checkpoint.save(tmp_path / "checkpoint", state, k=EVERY_K)
  else:
    save_unsealed(tmp_path / "checkpoint", state)
  data_file = largest_file(tmp_path / "checkpoint")
  data = bytearray(data_file.read_bytes())
  assert len(data) > LARGE
  data[len(data) // 2] ^= 1 << 4
  data_file.write_bytes(data)

  # The flip lands in the compressed values, which still decompress: Orbax alone
  # restores wrong values without a word.
  with ocp.StandardCheckpointer() as checkpointer:
    bare = checkpointer.restore(tmp_path / "checkpoint", jax.eval_shape(lambda tree: tree, state))
  assert not np.array_equal(bare[0]["large"], large)

  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path / "checkpoint", state, k=EVERY_K)
  name = data_file.relative_to(tmp_path / "checkpoint").as_posix()
  if sealed:  # the file's digest, before Orbax reads it
    expected = f"its file {name} reads back other than it was saved (SHA-256 differs)."
  else:  # the leaf's checksum, after
    expected = (
      f"the data of 1 of its {len(ocp.tree.to_flat_dict(state))} leaves reads back other than "
      f"it was saved (checksums differ):\n  0.large (in {name})"
    )
  assert str(error.value) == damaged(tmp_path / "checkpoint") + expected


def truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] = 0xFF  # never a byte of UTF-8
  path.write_bytes(data)


def edit_json(path, edit):
  content = json.loads(path.read_text())
  edit(content)
  path.write_text(json.dumps(content))


def drop_skip_deserialize(tree):
  del next(iter(tree["tree_metadata"].values()))["value_metadata"]["skip_deserialize"]


def drop_checksums(step):
  del step["custom_metadata"]["optaccum"]["checksums"]


def delete_array_data(directory):
  # Each process writes its arrays into a database of its own: ocdbt.process_<i>/d/.
  files = [path for path in directory.glob("ocdbt.process_*/d/*") if path.is_file()]
  assert files
  for path in files:
    path.unlink()


# Damage found before Orbax reads anything: each case in this process.
DAMAGE = {
  "step metadata truncated": (
    lambda d: truncate(d / "_CHECKPOINT_METADATA"),
    "its file _CHECKPOINT_METADATA is not valid JSON (",
  ),
  "step metadata deleted": (
    lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "its file _CHECKPOINT_METADATA is missing.",
  ),
  "tree metadata truncated": (
    lambda d: truncate(d / "_METADATA"),
    "its file _METADATA is not valid JSON (",
  ),
  "tree metadata deleted": (
    lambda d: (d / "_METADATA").unlink(),
    "its file _METADATA is missing.",
  ),
  "tree metadata without a field": (
    lambda d: edit_json(d / "_METADATA", drop_skip_deserialize),
    "Orbax cannot read its tree metadata from _METADATA or _sharding or array_metadatas/"
    "process_0 (KeyError: 'skip_deserialize').",
  ),
  "shardings garbled": (
    lambda d: garble(d / "_sharding"),
    "its file _sharding is not valid JSON ('utf-8' codec can't decode byte 0xff",
  ),
  "array metadata truncated": (
    lambda d: truncate(d / "array_metadatas" / "process_0"),
    "its file array_metadatas/process_0 is not valid JSON (",
  ),
  "record without checksums": (
    lambda d: edit_json(d / "_CHECKPOINT_METADATA", drop_checksums),
    "its file _CHECKPOINT_METADATA holds custom metadata 'optaccum' that lacks checksums (it "
    "holds k, mini_step, gradient_step, sealed, record_digest).",
  ),
}

# Damage TensorStore meets while reading. When a read fails, Orbax leaves its other
# reads behind, and TensorStore's threads report them ("Exception ignored in",
# "Event loop is closed") some time later, so these run in a process of their own.
READ_DAMAGE = {
  # (damage, what the message says first, where TensorStore says it failed); which
  # array it was reading when it failed varies.
  "OCDBT manifest truncated": (
    lambda d: truncate(d / "manifest.ocdbt"),
    "Orbax cannot read its tree metadata from manifest.ocdbt (ValueError: DATA_LOSS: ",
    'Error decoding local file "{d}/manifest.ocdbt"',
  ),
  "OCDBT index deleted": (
    lambda d: shutil.rmtree(d / "d"),
    "Orbax cannot read its tree metadata from d/",
    'NOT_FOUND: Error opening "zarr" driver',
  ),
  "array data deleted": (
    delete_array_data,
    "Orbax cannot read its arrays from ocdbt.process_0/d/",
    'Error reading "0.large/0" in OCDBT database at local file "{d}/"',
  ),
}


def saved_state():
  rng = np.random.default_rng(1)
  return with_optimizer({"large": jnp.asarray(rng.normal(size=1000).astype(np.float32))})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint of `saved_state()`, without `checkpoint.save`'s digests."""
  path = tmp_path_factory.mktemp("damage") / "checkpoint"
  save_unsealed(path, saved_state())
  return path


def restore_error(directory):
  """The type and message of what `checkpoint.restore` raises for `directory`."""
  try:
    optaccum.checkpoint.restore(directory, saved_state(), k=EVERY_K)
  except Exception as error:  # the test asserts on its type
    return type(error).__name__, str(error)
  return None, None


def check_damage_is_named(directory, error_type, message, what, where=""):
  # A ValueError of our own, not a JSONDecodeError or another error from inside Orbax.
  assert error_type == "ValueError"
  assert message.startswith(damaged(directory) + what), message
  assert where.replace("{d}", str(directory)) in message


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_or_missing_orbax_files_are_named_with_the_directory(saved, tmp_path, case):
  damage, what = DAMAGE[case]
  directory = tmp_path / "checkpoint"
  shutil.copytree(saved, directory)
  damage(directory)
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(directory, saved_state(), k=EVERY_K)
  check_damage_is_named(directory, type(error.value).__name__, str(error.value), what)


def test_damage_tensorstore_meets_is_named_with_the_directory(saved, tmp_path, run_python):
  directories = []
  for number, (damage, *_) in enumerate(READ_DAMAGE.values()):
    directories.append(tmp_path / f"checkpoint_{number}")
    shutil.copytree(saved, directories[-1])
    damage(directories[-1])
  # As a module, so the child imports this tree's optaccum.
  module = "tests.test_checkpoint_integrity"
  results = run_python(["-m", module, *map(str, directories)], num_devices=1, timeout=120)
  for directory, (_, *expected), (error_type, message) in zip(
    directories, READ_DAMAGE.values(), results
  ):
    check_damage_is_named(directory, error_type, message, *expected)


def test_the_undamaged_copy_restores(saved, tmp_path):
  shutil.copytree(saved, tmp_path / "checkpoint")
  state = saved_state()
  restored = optaccum.checkpoint.restore(tmp_path / "checkpoint", state, k=EVERY_K)
  assert np.array_equal(restored[0]["large"], state[0]["large"])


def test_saves_from_two_threads_at_once_all_succeed_and_restore(tmp_path):
  saves = 15
  states = {
    (thread, step): with_optimizer({"w": jnp.full(1000, 100 * thread + step, jnp.float32)})
    for thread in range(2)
    for step in range(saves)
  }
  barrier = threading.Barrier(2, timeout=60)
  errors = []

  def save_all(thread):
    for step in range(saves):
      try:
        barrier.wait()  # Both threads inside Orbax at once, every time.
        path = tmp_path / f"thread_{thread}" / f"step_{step}"
        optaccum.checkpoint.save(path, states[thread, step], k=EVERY_K)
      except Exception as error:  # collected, asserted on below
        errors.append(f"thread {thread}, step {step}: {error!r}")

  threads = [threading.Thread(target=save_all, args=(thread,), daemon=True) for thread in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=120)
  assert not any(thread.is_alive() for thread in threads), "a save hangs"
  assert errors == []
  for (thread, step), state in states.items():
    path = tmp_path / f"thread_{thread}" / f"step_{step}"
    restored = optaccum.checkpoint.restore(path, state, k=EVERY_K)
    assert np.array_equal(restored[0]["w"], np.full(1000, 100 * thread + step, np.float32))


def test_a_directory_of_other_files_still_holds_no_checkpoint(tmp_path):
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  os.mkdir(tmp_path / "d")
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path, with_optimizer({}), k=EVERY_K)
  assert str(error.value) == (
    "`checkpoint.restore(directory=...)` must be a checkpoint written by "
    f"`optaccum.checkpoint.save` (or a CheckpointManager step), but {str(tmp_path)!r} "
    "holds no Orbax checkpoint."
  )


if __name__ == "__main__":
  # The child of test_damage_tensorstore_meets_is_named_with_the_directory: one
  # restore per directory given, and what each raised, as JSON on the last line.
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  print(json.dumps([restore_error(directory) for directory in sys.argv[1:]]))
