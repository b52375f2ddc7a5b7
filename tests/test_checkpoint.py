"""Orbax checkpoints taken mid-window, restored in a fresh process, against an uninterrupted run.

Run as a script (`python tests/test_checkpoint.py CHECKPOINT OUT`), this file is
the fresh process: it restores CHECKPOINT, finishes the training and writes the
final parameters to OUT.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx
from flax.training.train_state import TrainState

import optaccum

# `jax.pmap` over 4 of the devices: tests/checks/pmap_checkpoint.py, run in the
# suite's 8-device child (`eight_devices` in conftest.py).
pytestmark = pytest.mark.eight_devices("pmap_checkpoint", module="tests.checks.pmap_checkpoint")

EVERY_K = 3
MICRO_STEPS = 10
# Saved after 5 micro-steps: one window closed, two micro-batches into the next.
SAVE_AT = 5
FEATURES = 4


class Mlp(linen.Module):
  hidden: int = 8

  @linen.compact
  def __call__(self, x):
    hidden = jax.nn.tanh(linen.Dense(self.hidden, name="hidden")(x))
    return linen.Dense(2, name="out")(hidden)


def inner_optimizer():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


def fresh_state(seed=0, hidden=8, k=EVERY_K, inner=None):
  model = Mlp(hidden)
  params = model.init(jax.random.key(seed), jnp.zeros((1, FEATURES)))
  tx = optaccum.accumulate(inner or inner_optimizer(), k)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def micro_batch(step):
  rng = np.random.default_rng(step)
  x = rng.normal(size=(6, FEATURES)).astype(np.float32)
  return x, rng.normal(size=(6, 2)).astype(np.float32)


@jax.jit
def train_step(state, x, y):
  def loss_fn(params):
    return jnp.mean(jnp.square(state.apply_fn(params, x) - y))

  return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


def train(state, steps):
  for step in steps:
    state = train_step(state, *micro_batch(step))
  return state


def flat_params(state):
  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree.leaves_with_path(state.params)
  }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("checkpoint") / "mid_window"
  optaccum.checkpoint.save(path, train(fresh_state(), range(SAVE_AT)), k=EVERY_K)
  return path


def test_resume_mid_window_in_a_fresh_process_is_bit_identical(checkpoint, tmp_path):
  uninterrupted = flat_params(train(fresh_state(), range(MICRO_STEPS)))

  out = tmp_path / "resumed.npz"
  # The tree's optaccum, not a copy installed in the environment: a script's own
  # folder, not the repository, heads its sys.path.
  repo = pathlib.Path(__file__).resolve().parent.parent
  result = subprocess.run(
    [sys.executable, __file__, str(checkpoint), str(out)],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=str(repo)),
  )
  assert result.returncode == 0, result.stderr
  # The restored window was the saved one, not a fresh state's.
  assert json.loads(result.stdout) == {"mini_step": SAVE_AT % EVERY_K, "gradient_step": 1}
  resumed = dict(np.load(out))
  assert resumed.keys() == uninterrupted.keys()
  for name, value in uninterrupted.items():
    assert np.array_equal(resumed[name], value), name


def test_restore_with_other_params_names_the_leaves_and_both_shapes(checkpoint):
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(checkpoint, fresh_state(hidden=16), k=EVERY_K)
  lines = str(error.value).splitlines()
  assert lines[0].startswith("`checkpoint.restore(target=...)` does not fit the checkpoint at ")
  assert lines[0].endswith(": 9 leaves differ (another model, optimizer or dtype?).")
  # The parameters come first, then the optimizer state that mirrors them.
  assert lines[1:4] == [
    "  params.params.hidden.bias: checkpoint has float32[8], target has float32[16]",
    "  params.params.hidden.kernel: checkpoint has float32[4, 8], target has float32[4, 16]",
    "  params.params.out.kernel: checkpoint has float32[8, 2], target has float32[16, 2]",
  ]
  assert lines[-1] == "  ... and 1 more"


def test_restore_into_other_dtypes_names_both_sides_instead_of_casting(tmp_path):
  tx = optaccum.accumulate(optax.sgd(0.1), EVERY_K)
  params = {"w": jnp.full(4, 1.0002441, jnp.float32)}
  optaccum.checkpoint.save(tmp_path / "float32", (params, tx.init(params)), k=EVERY_K)
  # In bfloat16 the saved 1.0002441 is 1.0: a cast would drop the difference unseen.
  half = {"w": params["w"].astype(jnp.bfloat16)}
  assert np.array_equal(np.asarray(half["w"], np.float32), np.ones(4, np.float32))
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path / "float32", (half, tx.init(params)), k=EVERY_K)
  assert str(error.value).splitlines() == [
    f"`checkpoint.restore(target=...)` does not fit the checkpoint at {tmp_path / 'float32'}: "
    "1 leaves differ (another model, optimizer or dtype?).",
    "  0.w: checkpoint has float32[4], target has bfloat16[4]",
  ]
  restored, _ = optaccum.checkpoint.restore(
    tmp_path / "float32", (params, tx.init(params)), k=EVERY_K
  )
  assert np.array_equal(restored["w"], np.full(4, 1.0002441, np.float32))


def test_fresh_train_state_with_a_python_int_step_restores(tmp_path):
  # TrainState.create leaves step a Python int, which Orbax saves as int64: the
  # target's own Python int has no dtype to differ.
  state = fresh_state()
  assert isinstance(state.step, int)
  optaccum.checkpoint.save(tmp_path / "fresh", state, k=EVERY_K)
  restored = optaccum.checkpoint.restore(tmp_path / "fresh", fresh_state(seed=1), k=EVERY_K)
  assert int(restored.step) == 0
  assert flat_params(restored).keys() == flat_params(state).keys()
  for name, value in flat_params(state).items():
    assert np.array_equal(flat_params(restored)[name], value), name


def test_restore_with_other_optimizer_lists_leaves_found_on_one_side_only(checkpoint):
  target = fresh_state(inner=optax.sgd(0.1))
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(checkpoint, target, k=EVERY_K)
  # The saved momentum trace has no place in a plain-sgd target.
  assert str(error.value).splitlines()[1:] == [
    f"  opt_state.inner_opt_state.1.0.trace.params.{name}: checkpoint has {shape}, target has "
    "nothing"
    for name, shape in [
      ("hidden.bias", "float32[8]"),
      ("hidden.kernel", "float32[4, 8]"),
      ("out.bias", "float32[2]"),
      ("out.kernel", "float32[8, 2]"),
    ]
  ]


def test_restore_with_other_every_k_names_both_window_lengths(checkpoint):
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(checkpoint, fresh_state(k=4), k=4)
  assert str(error.value) == (
    "`checkpoint.restore(k=...)` gives windows of 4 micro-steps at gradient step 1, "
    f"but the checkpoint at {checkpoint} was saved with windows of 3 (2 micro-steps into "
    "the current one); restore with the k it was saved with."
  )


def test_restore_with_a_schedule_checks_the_window_length_at_the_saved_gradient_step(checkpoint):
  # Saved at gradient step 1 with k=3: a schedule giving 3 there fits, whatever it gives elsewhere.
  fits = lambda step: jnp.where(step < 1, 2, EVERY_K)  # noqa: E731
  restored = optaccum.checkpoint.restore(checkpoint, fresh_state(k=fits), k=fits)
  assert int(optaccum.status(restored).mini_step) == SAVE_AT % EVERY_K
  does_not_fit = lambda step: jnp.where(step < 1, EVERY_K, 5)  # noqa: E731
  with pytest.raises(ValueError, match="gives windows of 5 micro-steps at gradient step 1"):
    optaccum.checkpoint.restore(checkpoint, fresh_state(), k=does_not_fit)


def test_restore_of_a_checkpoint_without_a_recorded_window_fails(tmp_path):
  state = fresh_state()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "plain", state)
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path / "plain", state, k=EVERY_K)
  assert str(error.value) == (
    f"`checkpoint.restore(directory=...)`: the checkpoint at {tmp_path / 'plain'} records no "
    "window length (its file _CHECKPOINT_METADATA holds no custom metadata 'optaccum'); save "
    "it with `optaccum.checkpoint.save`, or through a CheckpointManager with "
    "`custom_metadata=optaccum.checkpoint.metadata(state, k=...)`."
  )


def test_restore_from_a_missing_directory_names_it(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(FileNotFoundError) as error:
    optaccum.checkpoint.restore(missing, fresh_state(), k=EVERY_K)
  assert str(error.value) == (
    f"`checkpoint.restore(directory=...)` must be a checkpoint directory, got {str(missing)!r}, "
    "which is not a directory."
  )


def test_restore_from_a_directory_without_a_checkpoint_says_so(tmp_path):
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path, fresh_state(), k=EVERY_K)
  assert str(error.value) == (
    "`checkpoint.restore(directory=...)` must be a checkpoint written by "
    f"`optaccum.checkpoint.save` (or a CheckpointManager step), but {str(tmp_path)!r} "
    "holds no Orbax checkpoint."
  )


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  grads = nnx.grad(lambda model: jnp.mean(jnp.square(model(x) - y)))(model)
  optimizer.update(model, grads)


def _with_optimizer(model):
  return model, nnx.Optimizer(model, optaccum.accumulate(inner_optimizer(), EVERY_K), wrt=nnx.Param)


def train_nnx(model, optimizer, steps):
  for step in steps:
    _nnx_step(model, optimizer, *micro_batch(step))


class _DropoutMlp(nnx.Module):
  def __init__(self, seed):
    rngs = nnx.Rngs(params=seed, dropout=seed + 100)
    self.hidden = nnx.Linear(FEATURES, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jax.nn.relu(self.hidden(x))))


@pytest.mark.parametrize(
  "make_model",
  [lambda seed: nnx.Linear(FEATURES, 2, rngs=nnx.Rngs(seed)), _DropoutMlp],
  ids=["linear", "dropout"],
)
def test_nnx_model_and_optimizer_resume_mid_window_bit_identically(tmp_path, make_model):
  # The `(model, optimizer)` objects themselves; with dropout, their Rngs' keys and
  # counts are saved too, so the masks continue where they stopped.
  fresh = lambda seed: _with_optimizer(make_model(seed))  # noqa: E731
  uninterrupted = fresh(0)
  train_nnx(*uninterrupted, range(MICRO_STEPS))

  saved = fresh(0)
  train_nnx(*saved, range(SAVE_AT))
  optaccum.checkpoint.save(tmp_path / "nnx", saved, k=EVERY_K)
  model, optimizer = optaccum.checkpoint.restore(tmp_path / "nnx", fresh(1), k=EVERY_K)
  train_nnx(model, optimizer, range(SAVE_AT, MICRO_STEPS))

  assert int(optaccum.flax.gradient_step(optimizer)) == MICRO_STEPS // EVERY_K
  for resumed, expected in zip(
    jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(uninterrupted[0]))
  ):
    if jax.dtypes.issubdtype(resumed.dtype, jax.dtypes.prng_key):  # dropout's key: its bits
      resumed, expected = jax.random.key_data(resumed), jax.random.key_data(expected)
    assert np.array_equal(resumed, expected)


def test_nnx_state_with_dropout_keys_resumes_mid_window_bit_identically(tmp_path):
  # `nnx.state((model, optimizer))`, as Flax's checkpointing guide saves it: the
  # Rngs' typed key and count are saved, so dropout masks continue, not restart.
  fresh = lambda seed: _with_optimizer(_DropoutMlp(seed))  # noqa: E731
  uninterrupted = fresh(0)
  train_nnx(*uninterrupted, range(MICRO_STEPS))
  saved = fresh(0)
  train_nnx(*saved, range(SAVE_AT))
  optaccum.checkpoint.save(tmp_path / "nnx_state", nnx.state(saved), k=EVERY_K)

  resumed = fresh(1)
  path = tmp_path / "nnx_state"
  restored = optaccum.checkpoint.restore(path, nnx.state(resumed), k=EVERY_K)
  nnx.update(resumed, restored)
  keys = jax.tree.leaves(nnx.state(resumed[0], nnx.RngKey))
  assert keys and all(jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) for key in keys)
  train_nnx(*resumed, range(SAVE_AT, MICRO_STEPS))
  for got, expected in zip(
    jax.tree.leaves(nnx.state(resumed[0], nnx.Param)),
    jax.tree.leaves(nnx.state(uninterrupted[0], nnx.Param)),
  ):
    assert np.array_equal(got, expected)
  with pytest.raises(ValueError, match=r"windows of 2 micro-steps"):
    optaccum.checkpoint.restore(tmp_path / "nnx_state", nnx.state(fresh(1)), k=2)


def _manager_save(root, step, state, *, metadata=True, items=None):
  """Saves `state` as `step` of a CheckpointManager at `root`, as a training loop would."""
  custom = optaccum.checkpoint.metadata(state, k=EVERY_K) if metadata else None
  args = ocp.args.StandardSave(state)
  if items is not None:  # several items: the state beside a JSON item
    args = ocp.args.Composite(**{items[0]: args, items[1]: ocp.args.JsonSave({"epoch": 1})})
  with ocp.CheckpointManager(root, item_names=items) as manager:
    manager.save(step, args=args, custom_metadata=custom)
    manager.wait_until_finished()


def test_checkpoint_manager_step_resumes_mid_window_and_refuses_another_window(tmp_path):
  uninterrupted = flat_params(train(fresh_state(), range(MICRO_STEPS)))
  _manager_save(tmp_path, SAVE_AT, train(fresh_state(), range(SAVE_AT)))

  step_directory = tmp_path / str(SAVE_AT)
  state = optaccum.checkpoint.restore(step_directory, fresh_state(seed=1), k=EVERY_K)
  assert int(optaccum.status(state.opt_state).mini_step) == SAVE_AT % EVERY_K
  resumed = flat_params(train(state, range(SAVE_AT, MICRO_STEPS)))
  for name, value in uninterrupted.items():
    assert np.array_equal(resumed[name], value), name
  # The case: saved with k = 3, restored into a k = 2 optimizer.
  with pytest.raises(ValueError, match=r"windows of 2 micro-steps .* windows of 3 \(2 micro"):
    optaccum.checkpoint.restore(step_directory, fresh_state(k=2), k=2)


def test_checkpoint_manager_step_with_several_items_restores_the_named_one(tmp_path):
  _manager_save(tmp_path, 1, train(fresh_state(), range(SAVE_AT)), items=("state", "extra"))
  state = optaccum.checkpoint.restore(tmp_path / "1", fresh_state(1), k=EVERY_K, item="state")
  assert int(optaccum.status(state.opt_state).mini_step) == SAVE_AT % EVERY_K
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path / "1", fresh_state(), k=EVERY_K)
  assert str(error.value) == (
    "`checkpoint.restore(item=...)` must name the item to restore of the CheckpointManager "
    f"step at {str(tmp_path / '1')!r}, which holds extra, state."
  )
  with pytest.raises(ValueError, match=r"which holds extra, state, got item='model'\.$"):
    optaccum.checkpoint.restore(tmp_path / "1", fresh_state(), k=EVERY_K, item="model")


def test_checkpoint_manager_directory_names_its_steps(tmp_path):
  for step in (2, 10):
    _manager_save(tmp_path, step, fresh_state())
  with pytest.raises(ValueError) as error:
    optaccum.checkpoint.restore(tmp_path, fresh_state(), k=EVERY_K)
  assert str(error.value) == (
    "`checkpoint.restore(directory=...)` must be one checkpoint, but "
    f"{str(tmp_path)!r} is a CheckpointManager's directory of steps 2, 10: pass one "
    f"step's directory, e.g. {str(tmp_path / '10')!r}."
  )


def test_checkpoint_manager_step_without_the_metadata_says_how_to_save_it(tmp_path):
  _manager_save(tmp_path, 0, fresh_state(), metadata=False)
  with pytest.raises(ValueError, match=r"records no window length \(its file _CHECKPOINT_METADATA"):
    optaccum.checkpoint.restore(tmp_path / "0", fresh_state(), k=EVERY_K)


def test_item_of_a_one_item_checkpoint_is_refused(checkpoint):
  with pytest.raises(ValueError, match=r"is a checkpoint of one item; leave item=None, got"):
    optaccum.checkpoint.restore(checkpoint, fresh_state(), k=EVERY_K, item="state")


def test_pmap_replicas_partial_sums_are_never_lost_by_a_mid_window_save(eight_devices):
  result = eight_devices
  replicated, kept = result["replicated"], result["per_device"]
  # Declared replicated, each device holds its own sum mid-window: refused.
  assert replicated["refusal"].startswith(
    "`checkpoint.save(state=...)` is declared replicated over 4 devices, but 3 of them "
    "hold other partial sums in a leaf of `acc_grads`"
  )
  assert replicated["resumed_equal"]  # a save at a window's end resumes bit for bit
  # Kept per device (a leading device axis), every sum is saved and resumes mid-window.
  assert kept["devices_differ"] and kept["resumed_equal"]


if __name__ == "__main__":
  # The fresh process: same promotion rules as the tests (tests/conftest.py).
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  checkpoint_path, out_path = sys.argv[1:]
  # Another seed, so only a real restore can reproduce the uninterrupted run.
  state = optaccum.checkpoint.restore(checkpoint_path, fresh_state(seed=1), k=EVERY_K)
  accumulation = optaccum.status(state).state
  print(
    json.dumps(
      {"mini_step": int(accumulation.mini_step), "gradient_step": int(accumulation.gradient_step)}
    )
  )
  np.savez(out_path, **flat_params(train(state, range(SAVE_AT, MICRO_STEPS))))
