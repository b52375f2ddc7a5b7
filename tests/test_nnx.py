"""Flax NNX: `microbatch` with a module argument, and `apply_nnx_gradients`, against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optaccum

IN_FEATURES, HIDDEN, CLASSES = 256, 512, 3  # the first kernel has 131072 entries
BATCH, K = 32, 4


class Net(nnx.Module):
  """Linear -> BatchNorm -> Dropout -> Linear."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(IN_FEATURES, HIDDEN, rngs=rngs)
    self.norm = nnx.BatchNorm(HIDDEN, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jax.nn.relu(self.norm(self.hidden(x)))))


def loss_fn(model, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def make_batch(seed, size=BATCH):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(size, IN_FEATURES)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(rng.integers(0, CLASSES, size=size), jnp.int32)


def new_model():
  """A Net whose running BatchNorm statistics are not the initial zeros and ones."""
  model = Net(nnx.Rngs(0))
  model.norm.mean[...] = jnp.linspace(-0.5, 0.5, HIDDEN, dtype=jnp.float32)
  model.norm.var[...] = jnp.linspace(0.5, 2.0, HIDDEN, dtype=jnp.float32)
  return model


def arrays(tree):
  """The leaves of a state as NumPy arrays, PRNG keys as their key data."""
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
  return [
    np.asarray(jax.random.key_data(x) if is_key(x) else x)
    for x in jax.tree.leaves(nnx.as_pure(tree))
  ]


def assert_close(actual, expected, rtol, atol):
  assert jax.tree.structure(nnx.as_pure(actual)) == jax.tree.structure(nnx.as_pure(expected))
  for a, e in zip(arrays(actual), arrays(expected)):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def rng_count(model):
  return int(model.dropout.rngs.count[...])


# --- microbatch with a module ------------------------------------------------------------


def test_module_in_eval_mode_gives_the_unsplit_loss_and_grads():
  model = new_model()
  model.eval()
  x, labels = make_batch(1)
  grad_fn = nnx.value_and_grad(loss_fn)
  loss, grads = optaccum.microbatch(grad_fn, K)(model, x, labels)
  expected_loss, expected_grads = grad_fn(model, x, labels)
  assert isinstance(grads, nnx.State)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  assert_close(grads, expected_grads, rtol=1e-5, atol=1e-7)
  # Nothing in the module changes in eval mode: no masks drawn, running stats read only.
  assert_close(nnx.state(model), nnx.state(new_model()), rtol=0, atol=0)


def test_module_in_train_mode_equals_k_calls_one_micro_batch_at_a_time():
  model, reference = new_model(), new_model()
  x, labels = make_batch(2)
  grad_fn = nnx.value_and_grad(loss_fn)

  @nnx.jit
  def split_step(model, x, labels):
    return optaccum.microbatch(grad_fn, K)(model, x, labels)

  loss, grads = split_step(model, x, labels)
  # The reference: fn on micro-batch i (rows i, i + K, ...) in turn, on one module.
  calls = [nnx.jit(grad_fn)(reference, x[i::K], labels[i::K]) for i in range(K)]
  expected_loss = np.mean([call[0] for call in calls])
  expected_grads = jax.tree.map(lambda *g: sum(g) / K, *[call[1] for call in calls])
  assert all(np.isfinite(g).all() for g in arrays(grads))
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  assert_close(grads, expected_grads, rtol=1e-5, atol=1e-7)
  # The module holds what the K calls left: one dropout key drawn per micro-batch,
  # and the running statistics updated once per micro-batch.
  assert rng_count(model) == rng_count(new_model()) + K == rng_count(reference)
  assert_close(nnx.state(model), nnx.state(reference), rtol=1e-6, atol=1e-7)
  assert not np.allclose(model.norm.mean[...], new_model().norm.mean[...])


def test_micro_batches_draw_different_dropout_masks():
  model = new_model()
  model.norm.eval()  # only dropout is random
  x = jnp.tile(make_batch(3, size=1)[0], (K, 1))  # K copies of one example
  labels = jnp.zeros(K, jnp.int32)

  def per_example_loss(model, x, labels):
    return loss_fn(model, x, labels), model(x)

  (_, logits), _ = optaccum.microbatch(
    nnx.value_and_grad(per_example_loss, has_aux=True), K, has_aux=True, aux_reduction="stack"
  )(model, x, labels)
  # The same example in every micro-batch: the logits differ only if the masks do, that
  # is if each micro-batch starts from the rng count the previous one advanced.
  assert len({tuple(np.round(np.asarray(row).ravel(), 5)) for row in logits}) == K


# --- apply_nnx_gradients -----------------------------------------------------------------

LEARNING_RATE, WINDOWS = 1e-2, 2


def adamw():
  # eps=1e-5 rather than 1e-8: Adam divides each gradient entry by the root of its
  # second moment, so with a tiny eps the float32 rounding in an entry near 0 (a mean
  # of 4 means against a mean of 32) moves it by up to a whole step (1e-2 x 0.8% seen).
  return optax.adamw(LEARNING_RATE, eps=1e-5, weight_decay=1e-2)


grad_step = nnx.jit(nnx.grad(loss_fn))


@nnx.jit(static_argnames="how")
def apply_step(model, optimizer, grads, weight, how):
  # Gradients come from one compiled function, so both ways apply the same bits.
  with jax.numpy_dtype_promotion("standard"):  # for optax's adamw, see test_equivalence
    if how == "fast":
      optaccum.flax.apply_nnx_gradients(optimizer, model, grads, weight=weight)
    else:
      optimizer.update(model, grads, weight=weight)


def micro_step(model, optimizer, x, labels, weight, how):
  apply_step(model, optimizer, grad_step(model, x, labels), weight, how)


@nnx.jit
def large_batch_step(model, optimizer, x, labels):
  grads = nnx.grad(loss_fn)(model, x, labels)
  with jax.numpy_dtype_promotion("standard"):  # for optax's adamw
    optimizer.update(model, grads)


def eval_model():
  model = new_model()
  model.eval()  # deterministic: micro-batches and the large batch see the same function
  return model


def train_accumulated(tx, how, weights=(1.0,) * K, windows=WINDOWS):
  model = eval_model()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for window in range(windows):
    x, labels = make_batch(10 + window)
    for i in range(K):
      micro_step(model, optimizer, x[i::K], labels[i::K], jnp.float32(weights[i]), how)
  return model, optimizer


def test_fast_path_equals_large_batch_adamw():
  model, optimizer = train_accumulated(optaccum.accumulate(adamw(), K), "fast")
  reference = eval_model()
  reference_optimizer = nnx.Optimizer(reference, adamw(), wrt=nnx.Param)
  for window in range(WINDOWS):
    large_batch_step(reference, reference_optimizer, *make_batch(10 + window))
  params = nnx.state(model, nnx.Param)
  # Two steps of 1e-2 each, equal to 2e-4 of a step.
  assert_close(params, nnx.state(reference, nnx.Param), rtol=0, atol=2e-6)
  moved = [
    np.max(np.abs(a - b))
    for a, b in zip(arrays(params), arrays(nnx.state(eval_model(), nnx.Param)))
  ]
  assert min(moved) > 1e-2
  assert int(optimizer.step[...]) == WINDOWS * K
  assert int(optaccum.flax.gradient_step(optimizer)) == WINDOWS
  assert int(reference_optimizer.step[...]) == WINDOWS


def test_fast_path_equals_optimizer_update_with_weights():
  tx = optaccum.accumulate(adamw(), K)
  weights = (3.0, 1.0, 0.5, 2.0)
  model, optimizer = train_accumulated(tx, "fast", weights, windows=1)
  expected_model, expected_optimizer = train_accumulated(tx, "update", weights, windows=1)
  # The same arithmetic, except that the fast path adds the update into the parameter
  # inside the optimizer's conditional, where XLA may fuse it: a float32 rounding of
  # the parameter (one unit in the last place) or of the update (of size ~LEARNING_RATE).
  update_ulp = float(np.spacing(np.float32(LEARNING_RATE)))
  for actual, expected in zip(arrays(nnx.state(model)), arrays(nnx.state(expected_model))):
    np.testing.assert_allclose(actual, expected, rtol=2**-23, atol=update_ulp)
  inner, expected_inner = (
    nnx.as_pure(o.opt_state).inner_opt_state for o in (optimizer, expected_optimizer)
  )
  assert_close(inner, expected_inner, rtol=0, atol=0)
  assert int(optimizer.step[...]) == int(expected_optimizer.step[...]) == K
  assert int(optaccum.flax.gradient_step(optimizer)) == 1


def test_fast_path_leaves_the_parameters_until_the_window_closes():
  model = eval_model()
  optimizer = nnx.Optimizer(model, optaccum.accumulate(adamw(), K), wrt=nnx.Param)
  before = nnx.state(model, nnx.Param)
  x, labels = make_batch(4)
  micro_step(model, optimizer, x[:8], labels[:8], None, "fast")
  assert_close(nnx.state(model, nnx.Param), before, rtol=0, atol=0)
  assert int(optimizer.step[...]) == 1
  assert int(optaccum.flax.gradient_step(optimizer)) == 0


def test_chain_holding_the_accumulation_goes_through_optimizer_update():
  tx = optax.chain(optax.clip(1.0), optaccum.accumulate(adamw(), K))
  weights = (3.0, 1.0, 0.5, 2.0)
  model, optimizer = train_accumulated(tx, "fast", weights)
  expected_model, _ = train_accumulated(tx, "update", weights)
  assert_close(nnx.state(model), nnx.state(expected_model), rtol=0, atol=0)
  assert int(optimizer.step[...]) == WINDOWS * K
  assert int(optaccum.flax.gradient_step(optimizer)) == WINDOWS


# --- Errors --------------------------------------------------------------------------------


def small_model_and_grads():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  grads = nnx.grad(lambda model: jnp.sum(model(jnp.ones((1, 2)))))(model)
  return model, grads


def test_apply_nnx_gradients_refuses_what_is_not_an_nnx_optimizer():
  model, grads = small_model_and_grads()
  with pytest.raises(TypeError, match=r"apply_nnx_gradients\(optimizer=...\)` must be an nnx"):
    optaccum.flax.apply_nnx_gradients(optax.sgd(0.1), model, grads)


def test_apply_nnx_gradients_without_accumulation_is_the_plain_update():
  # Accumulation switched off by configuration: the same call, no branch.
  model, grads = small_model_and_grads()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  reference_model, _ = small_model_and_grads()
  reference = nnx.Optimizer(reference_model, optax.sgd(0.1), wrt=nnx.Param)
  optaccum.flax.apply_nnx_gradients(optimizer, model, grads)
  reference.update(reference_model, grads)
  assert jnp.array_equal(model.kernel[...], reference_model.kernel[...])
  assert int(optimizer.step[...]) == 1 and int(optaccum.flax.gradient_step(optimizer)) == 1
  with pytest.raises(TypeError, match=r"`apply_nnx_gradients\(weight=...\)` needs an accumulation"):
    optaccum.flax.apply_nnx_gradients(optimizer, model, grads, weight=2)


def test_apply_nnx_gradients_refuses_update_args_that_are_not_a_dict():
  model, grads = small_model_and_grads()
  optimizer = nnx.Optimizer(model, optaccum.accumulate(optax.sgd(0.1), 2), wrt=nnx.Param)
  with pytest.raises(TypeError, match=r"update_args=...\)` must be a dict .* got update_args=3"):
    optaccum.flax.apply_nnx_gradients(optimizer, model, grads, update_args=3)


def test_microbatch_of_an_nnx_jit_function_equals_the_unsplit_call():
  # nnx.jit hands back new Param arrays whether or not they changed.
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 2))
  grad_fn = nnx.jit(nnx.value_and_grad(lambda model, x: jnp.mean(model(x) ** 2)))
  value, grads = optaccum.microbatch(grad_fn, 4)(model, x)
  expected_value, expected_grads = grad_fn(model, x)
  assert jnp.allclose(value, expected_value, rtol=1e-6)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    assert jnp.allclose(got, expected, rtol=1e-5)


def test_microbatch_refuses_a_forward_pass_that_changes_the_state_structure():
  class Sowing(nnx.Module):
    def __init__(self):
      self.linear = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      self.seen = nnx.BatchStat(jnp.zeros(()))

    def __call__(self, x):
      self.extra = nnx.BatchStat(jnp.ones(3))  # a new Variable on every call
      return self.linear(x)

  split = optaccum.microbatch(nnx.value_and_grad(lambda m, x: jnp.mean(m(x))), 2)
  with pytest.raises(ValueError, match=r"`microbatch\(fn=...\)` changed what the NNX module"):
    split(Sowing(), jnp.ones((4, 2)))


def test_microbatch_refuses_a_module_with_mesh_axis_name():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  split = optaccum.microbatch(nnx.value_and_grad(lambda m, x: jnp.mean(m(x))), 2, axis_name="data")
  one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  refusal = r"axis_name=...\)` under plain `jax.jit` does not take NNX modules .*'data'"
  with jax.set_mesh(one), pytest.raises(ValueError, match=refusal):
    split(model, jnp.ones((4, 2)))


SHARD_MAP_CHECK = """
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx
import optaccum

jax.config.update("jax_numpy_dtype_promotion", "strict")
model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
loss = lambda model, x: jnp.mean(model(x) ** 2)
mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
rows = jnp.arange(32.0).reshape(8, 4) / 8
x = jax.device_put(rows, NamedSharding(mesh, P("data")))

def run(model):  # each replica splits its 4 rows into 2 micro-batches
  graphdef, state = nnx.split(model)

  def step(state, x):
    model = nnx.merge(graphdef, state)
    value, grads = optaccum.microbatch(nnx.value_and_grad(loss), 2, axis_name="data")(model, x)
    return value, grads, nnx.state(model, nnx.BatchStat)

  specs = dict(in_specs=(P(), P("data")), out_specs=(P(), P(), P("data")))
  return jax.jit(jax.shard_map(step, mesh=mesh, **specs))(state, x)

model.eval()
value, grads, _ = run(model)
expected_value, expected_grads = nnx.value_and_grad(loss)(model, rows)
model.train()
_, _, stats = run(model)
print(json.dumps({
  "loss": float(jnp.abs(value - expected_value)),
  "grads": max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads))),
  "stats_shape": list(stats["layers"][1]["mean"][...].shape),
}))
"""


# Two replicas, the first 2 devices of the suite's 8-device child (`eight_devices` in
# conftest.py).
pytestmark = pytest.mark.eight_devices("nnx_shard_map", code=SHARD_MAP_CHECK)


def test_module_under_shard_map_with_axis_name(eight_devices):
  result = eight_devices
  assert result["loss"] < 1e-6 and result["grads"] < 1e-6
  # Training mode: each replica carries its own running statistics out.
  assert result["stats_shape"] == [16]
