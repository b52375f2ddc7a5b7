"""optaccum.microbatch: equal to the unsplit call, with keys, weights, aux and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaccum
from tests.helpers import init_mlp, mlp

RTOL, ATOL = 1e-5, 1e-6


def make_batch(key, size=16):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.normal(kx, (size, 6)), "y": jax.random.normal(ky, (size, 3))}


def mse(params, batch):
  return jnp.mean((mlp(params, batch["x"]) - batch["y"]) ** 2)


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
    actual,
    expected,
  )


@pytest.fixture
def params():
  return init_mlp(jax.random.key(0), (6, 16, 3))


@pytest.fixture
def batch():
  return make_batch(jax.random.key(1))


@pytest.mark.parametrize("num_microbatches", [1, 2, 4, 16])
def test_mean_equals_unsplit_call(params, batch, num_microbatches):
  grad_fn = jax.jit(jax.value_and_grad(mse))
  split = jax.jit(optaccum.microbatch(grad_fn, num_microbatches))
  assert_trees_close(split(params, batch), grad_fn(params, batch))


def test_aux_means_equal_unsplit_metrics(params, batch):
  def loss(params, batch):
    error = mlp(params, batch["x"]) - batch["y"]
    return jnp.mean(error**2), {"mae": jnp.mean(jnp.abs(error)), "bias": jnp.mean(error)}

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  split = jax.jit(optaccum.microbatch(grad_fn, 4, has_aux=True))
  assert_trees_close(split(params, batch), grad_fn(params, batch))


def test_sum_reduction_equals_unsplit_sum_loss(params, batch):
  def loss(params, batch):
    return jnp.sum((mlp(params, batch["x"]) - batch["y"]) ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss))
  split = jax.jit(optaccum.microbatch(grad_fn, 4, reduction="sum"))
  assert_trees_close(split(params, batch), grad_fn(params, batch), rtol=1e-5, atol=1e-5)


def token_batch(key, size=8, length=5):
  kx, ky, km = jax.random.split(key, 3)
  mask = jax.random.bernoulli(km, 0.6, (size, length)).astype(jnp.float32)
  # Uneven micro-batches: micro-batch 0 of 4 (rows 0 and 4) holds one token only.
  mask = mask.at[0].set(jnp.array([1.0, 0, 0, 0, 0])).at[4].set(0.0)
  return {
    "x": jax.random.normal(kx, (size, length, 6)),
    "y": jax.random.normal(ky, (size, length, 3)),
    "mask": mask,
  }


def token_loss(params, batch):
  """Mean over the valid tokens of the batch; a metric of the same kind as aux."""
  error = jnp.sum((mlp(params, batch["x"]) - batch["y"]) ** 2, axis=-1)
  tokens = jnp.sum(batch["mask"])
  abs_error = jnp.sum(jnp.abs(error) * batch["mask"]) / tokens
  return jnp.sum(error * batch["mask"]) / tokens, {"abs_error": abs_error}


def num_tokens(params, batch):
  return jnp.sum(batch["mask"])


def test_weighted_mean_equals_token_mean_of_whole_batch(params):
  batch = token_batch(jax.random.key(2))
  grad_fn = jax.jit(jax.value_and_grad(token_loss, has_aux=True))
  split = jax.jit(optaccum.microbatch(grad_fn, 4, has_aux=True, weight_fn=num_tokens))
  assert_trees_close(split(params, batch), grad_fn(params, batch))


def test_weighted_sum_reduction_sums_weighted_microbatches(params):
  batch = token_batch(jax.random.key(2))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: token_loss(p, b)[0]))
  split = jax.jit(optaccum.microbatch(grad_fn, 4, reduction="sum", weight_fn=num_tokens))
  # Reference: micro-batch i holds rows i, i + 4, ... (documented), weight = its tokens.
  expected = None
  for i in range(4):
    part = jax.tree.map(lambda x: x[i::4], batch)
    value, grads = grad_fn(params, part)
    term = jax.tree.map(lambda v: v * num_tokens(params, part), (value, grads))
    expected = term if expected is None else jax.tree.map(jnp.add, expected, term)
  assert_trees_close(split(params, batch), expected, atol=1e-5)


def test_zero_total_weight_gives_zeros(params):
  batch = token_batch(jax.random.key(2))
  batch["mask"] = jnp.zeros_like(batch["mask"])
  # token_loss is then 0 / 0 = NaN on every micro-batch: zeros must come back anyway.
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: token_loss(p, b)[0]))
  value, grads = jax.jit(optaccum.microbatch(grad_fn, 4, weight_fn=num_tokens))(params, batch)
  assert float(value) == 0.0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_bfloat16_gradients_accumulate_in_float32():
  # Micro-batch gradients 1 and seven of 2**-9: in bfloat16, 1 + 2**-9 rounds back
  # to 1, so a bfloat16 sum loses all seven small terms.
  x = jnp.array([1.0] + [2.0**-9] * 7, jnp.bfloat16)
  weight = jnp.ones((), jnp.bfloat16)
  grad_fn = jax.jit(jax.value_and_grad(lambda w, x: jnp.mean(w * x)))
  expected = np.mean(np.asarray(x, np.float64))  # 0.1267..., NumPy in float64

  value, grads = jax.jit(optaccum.microbatch(grad_fn, 8))(weight, x)
  assert grads.dtype == jnp.bfloat16 and value.dtype == jnp.bfloat16
  assert float(grads) == float(jnp.asarray(expected, jnp.bfloat16))  # 0.126953125
  # The same sum in bfloat16 drops the small terms: what float32 buys.
  _, low = jax.jit(optaccum.microbatch(grad_fn, 8, accumulator=jnp.bfloat16))(weight, x)
  assert float(low) == 0.125


def dropout_loss(params, batch, key):
  keep = jax.random.bernoulli(key, 0.5, batch["x"].shape)
  x = jnp.where(keep, batch["x"] / 0.5, jnp.zeros_like(batch["x"]))
  loss = jnp.mean((mlp(params, x) - batch["y"]) ** 2)
  return loss, {"keep": keep.astype(jnp.float32)}


def test_each_microbatch_gets_its_own_key(params):
  # Identical rows everywhere: any difference between micro-batches is the key's.
  batch = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), make_batch(jax.random.key(1)))
  grad_fn = jax.jit(jax.value_and_grad(dropout_loss, has_aux=True))
  split = jax.jit(
    optaccum.microbatch(grad_fn, 4, has_aux=True, key_arg=2, aux_reduction={"keep": "stack"})
  )
  key = jax.random.key(7)
  (value, aux), grads = split(params, batch, key)

  # Reference: micro-batch i gets jax.random.split(key, 4)[i] (documented).
  keys = jax.random.split(key, 4)
  parts = [grad_fn(params, jax.tree.map(lambda x: x[i::4], batch), keys[i]) for i in range(4)]
  assert_trees_close(value, np.mean([p[0][0] for p in parts]))
  assert_trees_close(grads, jax.tree.map(lambda *g: sum(g) / 4, *[p[1] for p in parts]))
  masks = aux["keep"]
  assert all(not np.array_equal(masks[0], masks[i]) for i in range(1, 4))


def test_same_key_reproduces_and_another_key_differs(params, batch):
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, k: dropout_loss(p, b, k)[0]))
  split = jax.jit(optaccum.microbatch(grad_fn, 4, key_arg=2))
  first = split(params, batch, jax.random.key(3))
  assert_trees_close(split(params, batch, jax.random.key(3)), first, rtol=0, atol=0)
  assert float(split(params, batch, jax.random.key(4))[0]) != float(first[0])


def test_key_by_keyword_and_legacy_uint32_key(params, batch):
  def loss(params, batch, *, rng):
    return dropout_loss(params, batch, rng)[0]

  grad_fn = jax.jit(jax.value_and_grad(loss))
  split = jax.jit(optaccum.microbatch(grad_fn, 2, key_arg="rng"))
  raw = jax.random.PRNGKey(5)
  keys = jax.random.split(raw, 2)
  parts = [grad_fn(params, jax.tree.map(lambda x: x[i::2], batch), rng=keys[i]) for i in range(2)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *parts)
  assert_trees_close(split(params, batch, rng=raw), expected)


def test_aux_reductions_sum_concat_stack_and_callable(params, batch):
  def loss(params, batch):
    error = mlp(params, batch["x"]) - batch["y"]
    per_example = jnp.mean(error**2, axis=-1)
    aux = {
      "num_large": jnp.sum(per_example > 1.0, dtype=jnp.int32),
      "per_example": per_example,
      "worst": jnp.max(per_example),
      "each": jnp.mean(per_example),
    }
    return jnp.mean(per_example), aux

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  choices = {"num_large": "sum", "per_example": "concat", "worst": jnp.max, "each": "stack"}
  split = jax.jit(optaccum.microbatch(grad_fn, 4, has_aux=True, aux_reduction=choices))
  (_, aux), _ = split(params, batch)
  (_, whole), _ = grad_fn(params, batch)
  assert aux["num_large"].dtype == jnp.int32
  assert int(aux["num_large"]) == int(whole["num_large"])
  assert_trees_close(aux["per_example"], whole["per_example"])  # the batch's own row order
  assert_trees_close(aux["worst"], whole["worst"])
  assert_trees_close(aux["each"], [jnp.mean(whole["per_example"][i::4]) for i in range(4)])


def test_only_batch_arguments_are_split(params, batch):
  def loss(params, x, scale, *, y, offset):
    return jnp.mean((scale * mlp(params, x) + offset - y) ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss))
  split = jax.jit(optaccum.microbatch(grad_fn, 4, batch_argnums=1, batch_argnames="y"))
  scale, offset = jnp.float32(0.5), jnp.ones((3,))  # would not split into 4
  args = (params, batch["x"], scale)
  kwargs = {"y": batch["y"], "offset": offset}
  assert_trees_close(split(*args, **kwargs), grad_fn(*args, **kwargs))


def _loss_with_int_aux(params, batch):
  return mse(params, batch), jnp.sum(batch["x"] > 0, dtype=jnp.int32)


@pytest.mark.parametrize(
  ("make", "call", "error", "message"),
  [
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 0),
      None,
      ValueError,
      r"`microbatch\(k=...\)` must be a positive int, got k=0\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, reduction="median"),
      None,
      ValueError,
      r"`microbatch\(reduction=...\)` must be one of 'mean', 'sum', got reduction='median'\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, aux_reduction={"a": "median"}),
      None,
      ValueError,
      r"`microbatch\(aux_reduction=...\)` must be one of 'mean', 'sum', 'stack', 'concat'",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, batch_argnums=(1, 2), key_arg=2),
      None,
      ValueError,
      r"`microbatch\(key_arg=...\)` names a batch argument",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, key_arg=0),
      None,
      TypeError,
      r"`microbatch\(key_arg=...\)` must be None, a positive int",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, weight_fn=3),
      None,
      TypeError,
      r"`microbatch\(weight_fn=...\)` must be None or a callable, got weight_fn=3\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, batch_argnums=-1),
      None,
      TypeError,
      r"`microbatch\(batch_argnums=...\)` must be a non-negative int",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 3),
      lambda fn, p, b: fn(p, {**b, "n": jnp.zeros(15)}),
      ValueError,
      r"`microbatch\(k=3\)` cuts a batch whose rows k does not divide .* the same rows: "
      r"argument 1 at \['n'\] has 15, argument 1 at \['x'\] has 16\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, batch_argnums=(1, 2)),
      lambda fn, p, b: fn(p, b),
      ValueError,
      r"`microbatch\(batch_argnums=...\)` names argument 2, but the call has 2 positional",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(lambda p, b, s: mse(p, b) * s), 2),
      lambda fn, p, b: fn(p, b, jnp.float32(2.0)),
      ValueError,
      r"argument 2 at the root has no batch axis",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(dropout_loss, has_aux=True), 2, key_arg=2),
      lambda fn, p, b: fn(p, b, jnp.zeros(3)),
      TypeError,
      r"`microbatch\(key_arg=...\)` names argument 2, which must be a single PRNG key",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(_loss_with_int_aux, has_aux=True), 2),
      lambda fn, p, b: fn(p, b),
      TypeError,
      r"`microbatch\(fn=...\)` returned a tuple as its loss; pass has_aux=True",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, has_aux=True),
      lambda fn, p, b: fn(p, b),
      TypeError,
      r"`microbatch\(has_aux=True\)` needs `fn` to return `\(\(loss, aux\), grads\)`",
    ),
    (
      lambda: optaccum.microbatch(
        jax.value_and_grad(_loss_with_int_aux, has_aux=True), 2, has_aux=True
      ),
      lambda fn, p, b: fn(p, b),
      TypeError,
      r"`microbatch\(aux_reduction=...\)` is 'mean' for an aux leaf of dtype int32",
    ),
    (
      lambda: optaccum.microbatch("loss", 2),
      None,
      TypeError,
      r"`microbatch\(fn=...\)` must be callable, got fn='loss'\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, has_aux=1),
      None,
      TypeError,
      r"`microbatch\(has_aux=...\)` must be a bool, got has_aux=1\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, batch_argnames=3),
      None,
      TypeError,
      r"`microbatch\(batch_argnames=...\)` must be a str or a sequence of str, "
      r"got batch_argnames=3\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, accumulator=jnp.int32),
      None,
      TypeError,
      r"`microbatch\(accumulator=...\)` must be None, a floating or complex dtype",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, accumulator="int32"),
      None,
      TypeError,
      r"`microbatch\(accumulator=...\)` must be None, .* got accumulator='int32'\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, accumulator=3),
      None,
      TypeError,
      r"`microbatch\(accumulator=...\)` must be None, .* got accumulator=3\.",
    ),
    (
      lambda: optaccum.microbatch(
        jax.value_and_grad(mse), 2, accumulator=optaccum.stochastic_bfloat16(0)
      ),
      None,
      ValueError,
      r"`microbatch\(accumulator=...\)` sums within one step, where stochastic rounding",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, axis_name=["data"]),
      None,
      TypeError,
      r"`microbatch\(axis_name=...\)` must be hashable, got axis_name=\['data'\]\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, batch_argnames="y"),
      lambda fn, p, b: fn(p, b),
      ValueError,
      r"`microbatch\(batch_argnames=...\)` names 'y', which the call does not pass; "
      r"it passes \[\]\.",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, key_arg=2),
      lambda fn, p, b: fn(p, b),
      ValueError,
      r"`microbatch\(key_arg=...\)` names argument 2, but the call has 2 positional",
    ),
    (
      lambda: optaccum.microbatch(jax.value_and_grad(mse), 2, key_arg="rng"),
      lambda fn, p, b: fn(p, b),
      ValueError,
      r"`microbatch\(key_arg=...\)` names 'rng', which the call does not pass",
    ),
    (
      lambda: optaccum.microbatch(lambda p, b: mse(p, b), 2),
      lambda fn, p, b: fn(p, b),
      TypeError,
      r"`microbatch\(fn=...\)` must return `\(loss, grads\)` as `jax.value_and_grad` does",
    ),
    (
      lambda: optaccum.microbatch(
        jax.value_and_grad(_loss_with_int_aux, has_aux=True),
        2,
        has_aux=True,
        aux_reduction={"count": "sum"},
      ),
      lambda fn, p, b: fn(p, b),
      ValueError,
      r"`microbatch\(aux_reduction=...\)` must be one choice or a tree prefix of the aux",
    ),
    (
      lambda: optaccum.microbatch(
        jax.value_and_grad(lambda p, b: (mse(p, b), mse(p, b)), has_aux=True),
        2,
        has_aux=True,
        aux_reduction="concat",
      ),
      lambda fn, p, b: fn(p, b),
      ValueError,
      r"`microbatch\(aux_reduction=...\)` is 'concat' for a scalar aux leaf",
    ),
    (
      lambda: optaccum.microbatch(
        jax.value_and_grad(mse), 2, weight_fn=lambda p, b: jnp.sum(b["x"], axis=0)
      ),
      lambda fn, p, b: fn(p, b),
      ValueError,
      r"`microbatch\(weight_fn=...\)` must be a scalar, got an array of shape \(6,\)\.",
    ),
  ],
)
def test_bad_arguments_raise_naming_call_argument_and_value(
  params, batch, make, call, error, message
):
  with pytest.raises(error, match=message):
    fn = make()
    if call is not None:
      call(fn, params, batch)


def test_memory_of_split_step_is_a_fraction_of_unsplit(run_python):
  # The benchmark prints the numbers quoted in docs/distributed.md.
  result = run_python(["benchmarks/microbatch_memory.py", "8"], num_devices=1, timeout=120)
  temp = {row["num_microbatches"]: row["temp_bytes"] for row in result["rows"]}
  # None is the unsplit step; activations dominate this model, so a step that
  # holds one micro-batch's activations of eight needs well under half.
  assert temp[8] / temp[None] < 0.5, result


@pytest.mark.parametrize("bad_weight", [float("nan"), float("inf"), -1.0])
def test_a_nan_infinite_or_negative_weight_skips_its_micro_batch_as_accumulate_does(bad_weight):
  # Micro-batch 1 (rows 1 and 5 of 8, k = 4) holds a NaN input and a bad
  # weight: it adds nothing, and the rest is the token mean of the other rows.
  def loss(w, x, mask):
    return jnp.sum(((x @ w) ** 2) * mask) / jnp.sum(mask)

  w = jnp.linspace(-1.0, 1.0, 3)
  x = np.arange(24.0, dtype=np.float32).reshape(8, 3) / 10
  mask = np.array([1, 1, 0, 1, 1, 1, 1, 0], np.float32)
  x[1, 0] = np.nan

  def weight_fn(w, x, mask):
    return jnp.where(jnp.isnan(x[0, 0]), jnp.float32(bad_weight), jnp.sum(mask))

  split = optaccum.microbatch(jax.value_and_grad(loss), 4, weight_fn=weight_fn)
  value, grads = jax.jit(split)(w, jnp.asarray(x), jnp.asarray(mask))
  kept = np.array([0, 2, 3, 4, 6, 7])
  xs, ms = x[kept].astype(np.float64), mask[kept].astype(np.float64)
  residual = xs @ np.asarray(w, np.float64)
  expected_value = np.sum(residual**2 * ms) / np.sum(ms)
  expected_grads = 2 * (xs * (residual * ms)[:, None]).sum(0) / np.sum(ms)
  np.testing.assert_allclose(float(value), expected_value, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grads), expected_grads, rtol=1e-5, atol=1e-7)


def test_weights_all_skipped_give_zeros_not_nan():
  def loss(w, x):
    return jnp.mean((x @ w) ** 2)

  split = optaccum.microbatch(
    jax.value_and_grad(loss), 2, weight_fn=lambda w, x: jnp.float32(-1), reduction="mean"
  )
  value, grads = split(jnp.ones(3), jnp.ones((4, 3)))
  assert float(value) == 0.0 and not np.any(np.asarray(grads))


def test_gradients_a_sum_over_micro_batches_cannot_hold_are_refused(params, batch):
  # With respect to the batch: each micro-batch's rows are other examples.
  both = jax.value_and_grad(lambda p, b: mse(p, b), argnums=(0, 1))
  with pytest.raises(ValueError, match=r"`microbatch\(fn=...\)` returned a gradient at \[1\]"):
    optaccum.microbatch(both, 4)(params, batch)
  # float0, an integer leaf's gradient under allow_int=True.
  counted = (params, jnp.arange(3))
  ints = jax.value_and_grad(lambda p, b: mse(p[0], b), allow_int=True)
  with pytest.raises(TypeError, match=r"returned a float0 gradient at \[1\]"):
    optaccum.microbatch(ints, 4)(counted, batch)
