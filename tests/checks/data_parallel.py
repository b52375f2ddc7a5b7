"""One all-reduce per window on 8 CPU replicas: optaccum against the naive versions.

Data-parallel training over 8 replicas, three windows of k = 4 micro-batches,
run three ways: optaccum (local accumulation, one reduction per window), the
naive version (all-reduce every micro-batch), and large-batch optax on one
device (the reference). Prints one JSON line: parameter differences, and the
all-reduces of each compiled step (in the program, run per call, bytes).

Run by tests/test_data_parallel.py, or by hand:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.checks.data_parallel
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaccum
from tests import hlo

REPLICAS, K, WINDOWS, ROWS = 8, 4, 3, 4  # ROWS: rows per replica per micro-batch


def init_params():
  rng = np.random.RandomState(0)
  return {
    "w1": jnp.asarray(rng.normal(size=(8, 16)) / 3, jnp.float32),
    "b1": jnp.zeros((16,), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(16, 4)) / 4, jnp.float32),
  }


def make_windows():
  """[WINDOWS, K, REPLICAS * ROWS, ...]: each micro-step's global batch, with a token mask."""
  rng = np.random.RandomState(1)
  shape = (WINDOWS, K, REPLICAS * ROWS)
  mask = (rng.uniform(size=shape) < 0.7).astype(np.float32)
  mask[0, 0, :ROWS] = 0.0  # one replica sees no valid row in one micro-step
  return {
    "x": jnp.asarray(rng.normal(size=(*shape, 8)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(*shape, 4)), jnp.float32),
    "mask": jnp.asarray(mask),
  }


def per_row_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - batch["y"]) ** 2, axis=-1)


def mean_loss(params, batch):
  return jnp.mean(per_row_loss(params, batch))


def token_loss(params, batch):
  """Mean over valid rows; 0 where there are none (the weight is then 0 too)."""
  tokens = jnp.sum(batch["mask"])
  total = jnp.sum(per_row_loss(params, batch) * batch["mask"])
  return total / jnp.maximum(tokens, jnp.float32(1))


def num_tokens(params, batch):
  return jnp.sum(batch["mask"])


def optimizer():
  return optax.sgd(0.1, momentum=0.9)


def reference(windows, loss):
  """Large-batch optax on one device: one update per window, on the whole window."""
  params, tx = init_params(), optimizer()
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for w in range(WINDOWS):
    window = jax.tree.map(lambda x: x[w].reshape(-1, *x.shape[3:]), windows)
    params, state = step(params, state, window)
  return params


def max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(*map(jax.tree.leaves, (a, b)))
  )


def replicas_equal(tree):
  """Whether every device holds the same copy of each (replicated) leaf."""
  return all(
    all(
      np.array_equal(np.asarray(s.data), np.asarray(x.addressable_shards[0].data))
      for s in x.addressable_shards
    )
    for x in jax.tree.leaves(tree)
  )


def in_step(mesh, windows, weighted):
  """`microbatch` inside `data_parallel`: a step is a window; k micro-batches per replica."""
  loss = token_loss if weighted else mean_loss
  weight_fn = num_tokens if weighted else None
  grad_fn = jax.value_and_grad(loss)
  ours = optaccum.microbatch(grad_fn, K, axis_name="data", weight_fn=weight_fn)

  def naive_fn(params, batch):
    # The all-reduce a naive loop does on every micro-batch.
    return jax.lax.pmean(grad_fn(params, batch), "data")

  runs = {"optaccum": ours}
  if not weighted:  # the weighted run is checked against the reference alone
    runs["naive"] = optaccum.microbatch(naive_fn, K)
  tx = optimizer()
  results = {}
  for name, fn in runs.items():

    def local_step(params, opt_state, batch, fn=fn):
      _, grads = fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    step = jax.jit(
      optaccum.parallel.data_parallel(local_step, mesh, axis_name="data", batch_argnums=2)
    )
    params = init_params()
    opt_state = tx.init(params)
    # A step's global batch is a whole window; each replica splits its share in k.
    batches = jax.tree.map(lambda x: x.reshape(WINDOWS, -1, *x.shape[3:]), windows)
    step = step.lower(params, opt_state, jax.tree.map(lambda x: x[0], batches)).compile()
    for w in range(WINDOWS):
      params, opt_state = step(params, opt_state, jax.tree.map(lambda x: x[w], batches))
    results[name] = {
      "params": params,
      "all_reduce_per_step": hlo.summary(step.as_text()),
      "replicas_equal": replicas_equal(params),
    }
  return results


def cross_step(mesh, windows, weighted):
  """`accumulate(axis_name=...)` inside `data_parallel`: a step is one micro-batch."""
  loss = token_loss if weighted else mean_loss
  # Statistics ride along: their running sums are per replica, like the accumulator.
  ours_tx = optaccum.accumulate(optimizer(), K, axis_name="data", statistics=True)
  naive_tx = optaccum.accumulate(optimizer(), K)

  def ours_step(params, opt_state, batch):
    grads = jax.grad(loss)(params, batch)  # this replica's gradient: no all-reduce
    weight = num_tokens(params, batch) if weighted else None
    updates, opt_state = ours_tx.update(grads, opt_state, params, weight=weight)
    return optax.apply_updates(params, updates), opt_state

  def naive_step(params, opt_state, batch):
    grads = jax.lax.pmean(jax.grad(loss)(params, batch), "data")  # every micro-step
    updates, opt_state = naive_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  runs = {"optaccum": (ours_tx, ours_step)}
  if not weighted:  # the weighted run is checked against the reference alone
    runs["naive"] = (naive_tx, naive_step)
  results = {}
  for name, (tx, local_step) in runs.items():
    init = jax.jit(
      optaccum.parallel.data_parallel(tx.init, mesh, axis_name="data", batch_argnums=())
    )
    step = jax.jit(
      optaccum.parallel.data_parallel(local_step, mesh, axis_name="data", batch_argnums=2)
    )
    params = init_params()
    opt_state = init(params)
    step = step.lower(params, opt_state, jax.tree.map(lambda x: x[0, 0], windows)).compile()
    emitted = []
    for w in range(WINDOWS):
      for m in range(K):
        params, opt_state = step(params, opt_state, jax.tree.map(lambda x: x[w, m], windows))
        emitted.append(bool(optaccum.status(opt_state).has_updated))
    results[name] = {
      "params": params,
      "all_reduce_per_step": hlo.summary(step.as_text()),
      "emitted": emitted,
      "acc_grads_shape": list(jax.tree.leaves(opt_state.acc_grads)[0].shape),
      "replicas_equal": replicas_equal(params),
    }
    if name == "optaccum" and not weighted:
      ours = optaccum.status(opt_state).statistics
      expected = statistics_reference(windows, loss)
      results[name]["statistics_diff"] = max(
        abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected))
      )
  return results


def statistics_reference(windows, loss):
  """One device, every replica's local gradient a micro-batch of its own (K * REPLICAS a window).

  Replays the data-parallel run: the parameters follow the large-batch reference
  (the optimizer sees the same window means), and the statistics of the last window
  come from the local gradients exactly as each replica computed them.
  """
  tx = optaccum.accumulate(optax.identity(), K * REPLICAS, statistics=True)
  params, inner = init_params(), optimizer()
  state, inner_state = tx.init(params), inner.init(params)

  @jax.jit  # one program for the 96 micro-batches (op by op, each update recompiled its branches)
  def micro_step(params, state, rows):
    return tx.update(jax.grad(loss)(params, rows), state, params)

  for w in range(WINDOWS):
    for m in range(K):
      for r in range(REPLICAS):
        rows = jax.tree.map(lambda x: x[w, m, r * ROWS : (r + 1) * ROWS], windows)
        window_mean, state = micro_step(params, state, rows)
    updates, inner_state = inner.update(window_mean, inner_state, params)
    params = optax.apply_updates(params, updates)
  return optaccum.status(state).statistics


def gspmd_in_step(mesh, windows):
  """No shard_map: `microbatch` under plain `jax.jit` with the batch sharded over devices."""
  grad_fn = optaccum.microbatch(jax.value_and_grad(mean_loss), K)
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  batch = jax.tree.map(lambda x: x[0].reshape(-1, *x.shape[3:]), windows)
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  return hlo.summary(jax.jit(grad_fn).lower(params, batch).compile().as_text())


def mark_per_replica(tree):
  """What a user writes for a local gradient under check_vma: pvary in jax 0.7, pcast in 0.10."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(tree, "data", to="varying")
  return jax.lax.pvary(tree, "data")


def vma_checked(mesh, windows):
  """The same inside a bare `jax.shard_map` with check_vma=True (JAX's default)."""
  params = init_params()
  window = jax.tree.map(lambda x: x[0].reshape(-1, *x.shape[3:]), windows)
  grad_fn = optaccum.microbatch(jax.value_and_grad(mean_loss), K, axis_name="data")
  split = jax.jit(
    jax.shard_map(grad_fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=True)
  )
  split = split.lower(params, window).compile()
  _, grads = split(params, window)
  expected = jax.grad(mean_loss)(params, window)

  tx = optaccum.accumulate(optimizer(), K, axis_name="data")

  def one_window(params, window):
    # The whole window in one call, so the per-replica state never leaves it.
    opt_state = tx.init(params)
    for m in range(K):
      local = mark_per_replica(params)  # so that its gradient stays per replica
      grads = jax.grad(mean_loss)(local, jax.tree.map(lambda x: x[m], window))
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params

  window_steps = jax.tree.map(lambda x: x[0], windows)
  run = jax.jit(
    jax.shard_map(
      one_window, mesh=mesh, in_specs=(P(), P(None, "data")), out_specs=P(), check_vma=True
    )
  )
  after = run(params, window_steps)
  tx_ref = optimizer()
  updates, _ = tx_ref.update(expected, tx_ref.init(params), params)
  return {
    "microbatch_grads_diff": max_diff(grads, expected),
    "microbatch_all_reduce": hlo.summary(split.as_text()),
    "accumulate_window_diff": max_diff(after, optax.apply_updates(params, updates)),
  }


def main():
  assert jax.device_count() == REPLICAS, (
    "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  )
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  mesh = jax.make_mesh((REPLICAS,), ("data",), axis_types=(AxisType.Auto,))
  windows = make_windows()
  grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(init_params()))
  results = {"jax": jax.__version__, "replicas": REPLICAS, "k": K, "grad_bytes": grad_bytes}
  for weighted in (False, True):
    expected = reference(windows, token_loss if weighted else mean_loss)
    label = "weighted" if weighted else "mean"
    for mode, run in (("in_step", in_step), ("cross_step", cross_step)):
      found = run(mesh, windows, weighted)
      for name, result in found.items():
        result["diff_to_reference"] = max_diff(result.pop("params"), expected)
      results[f"{mode}/{label}"] = found
  results["gspmd_in_step"] = gspmd_in_step(mesh, windows)
  results["vma_checked"] = vma_checked(mesh, windows)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
