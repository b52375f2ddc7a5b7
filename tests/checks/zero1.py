"""ZeRO-1 under plain `jax.jit`, Explicit and Auto meshes: optimizer state sharded over replicas.

Parameters replicated over `"data"`, AdamW's moments sharded over it, the batch
sharded over it, k = 4. Prints, for `apply_gradients` and `accumulate(...).update`
with `axis_name="data"`, the collectives one window runs (read from the compiled
program: k micro-steps, the closing branch once), the bytes of AdamW's first
moment per device, the parameters' layout after two windows, and the largest
relative difference from large-batch Optax on the same data.

The same forms then run on an Auto mesh (results named "auto <form>"), where
XLA picks the layouts: no `out_shardings` are pinned in either.

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.checks.zero1
"""

import json
import os
import sys

if "jax" not in sys.modules:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaccum
from tests import hlo

K, ROWS = 4, 64


def init_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "w1": jax.random.normal(k1, (16, 64)) / 4,
    "w2": jax.random.normal(k2, (64, 64)) / 8,
    "w3": jax.random.normal(k3, (64, 8)) / 8,
  }


def loss(params, x, y):
  h = jnp.tanh(x @ params["w1"])
  h = jnp.tanh(h @ params["w2"])
  return jnp.mean((h @ params["w3"] - y) ** 2)


def large_batch(params, xs, ys, windows):
  optimizer = optax.adamw(1e-3)
  state = optimizer.init(params)
  for w in range(windows):
    rows = slice(w * K, (w + 1) * K)
    grads = jax.grad(loss)(params, xs[rows].reshape(-1, 16), ys[rows].reshape(-1, 8))
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def per_window(text, calls=K):
  """Each collective's runs and bytes in one window: k calls, the closing branch once."""
  out = {}
  for op in ("all-reduce", "all-gather", "reduce-scatter"):
    found = hlo.collectives(text, (op,))
    always = [c for c in found if not c.conditional]
    branch = [c for c in found if c.conditional]
    out[op] = calls * sum(c.executions for c in always) + sum(c.executions for c in branch)
    out[op + " on every call"] = sum(c.executions for c in always)
    out[op + " bytes"] = calls * sum(c.executions * c.bytes for c in always) + sum(
      c.executions * c.bytes for c in branch
    )
  return out


def main():
  """Every form on an Explicit mesh, then on an Auto one, and `init`'s placements."""
  explicit = forms(AxisType.Explicit)
  auto = forms(AxisType.Auto)
  results = {**explicit, **{f"auto {form}": result for form, result in auto.items()}}
  results["placement"] = placement(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,)))
  for kind in (AxisType.Explicit, AxisType.Auto):
    results[f"tensor parallel {kind.name.lower()}"] = tensor_parallel(kind)
  print(json.dumps(results))


def two_windows():
  """Two windows of k micro-batches, the starting parameters, and large-batch Optax's end."""
  xs = jax.random.normal(jax.random.key(1), (2 * K, ROWS, 16))
  ys = jax.random.normal(jax.random.key(2), (2 * K, ROWS, 8))
  start = init_params(jax.random.key(0))
  return xs, ys, start, large_batch(start, xs, ys, 2)


def relative_error(params, reference):
  """The largest difference of a leaf from the reference's, relative to its largest entry."""
  return max(
    float(jnp.max(jnp.abs(params[n] - reference[n])) / jnp.max(jnp.abs(reference[n])))
    for n in reference
  )


def tensor_parallel(kind):
  """ZeRO-1 over "data" beside tensor parallelism over "model" (a 4 x 2 mesh), two windows.

  The matrices sharded over "model" along their output dimension; `init` shards
  each moment over "data" along its first dimension left free.
  """
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
  xs, ys, start, reference = two_windows()
  with jax.set_mesh(mesh):
    params = {n: jax.device_put(v, NamedSharding(mesh, P(None, "model"))) for n, v in start.items()}
    tx = optaccum.accumulate(
      optaccum.parallel.shard_optimizer(optax.adamw(1e-3), axis_name="data"), K, axis_name="data"
    )
    grad_fn = optaccum.parallel.per_replica(jax.grad(loss))
    step = jax.jit(lambda p, s, x, y: optaccum.apply_gradients(tx, grad_fn(p, x, y), s, p))
    state = tx.init(params)
    by_data = NamedSharding(mesh, P("data"))
    for x, y in zip(xs, ys):
      params, state = step(params, state, jax.device_put(x, by_data), jax.device_put(y, by_data))
  return {
    "relative_error": relative_error(params, reference),
    "mu_spec": str(state.inner_opt_state[0].mu["w1"].sharding.spec),
    "params_spec": [str(params[n].sharding.spec) for n in sorted(params)],
  }


def forms(kind):
  """form -> what one window compiles to and where two windows leave the state."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  replicated, by_data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  xs, ys, start, reference = two_windows()
  results = {}
  with jax.set_mesh(mesh):
    for form in ("apply_gradients", "update", "microbatch"):
      in_step = form == "microbatch"
      # ZeRO-1: the moments sharded over the replicas by `init`, the counters replicated.
      sharded_adamw = optaccum.parallel.shard_optimizer(optax.adamw(1e-3), axis_name="data")
      tx = sharded_adamw if in_step else optaccum.accumulate(sharded_adamw, K, axis_name="data")
      grad_fn = optaccum.parallel.per_replica(jax.grad(loss))
      params = jax.device_put(start, replicated)
      state = tx.init(params)
      if in_step:
        split = optaccum.microbatch(jax.value_and_grad(loss), K, axis_name="data")

        def step(params, state, x, y):
          _, grads = split(params, x, y)
          # shard_optimizer gathers its updates to the parameters' layout.
          updates, state = tx.update(grads, state, params)
          return optax.apply_updates(params, updates), state

      elif form == "apply_gradients":

        def step(params, state, x, y):
          return optaccum.apply_gradients(tx, grad_fn(params, x, y), state, params)

      else:

        def step(params, state, x, y):
          updates, state = tx.update(grad_fn(params, x, y), state, params)
          return optax.apply_updates(params, updates), state

      # No `out_shardings`: the layouts the state comes back in are the ones checked.
      step = jax.jit(step)
      batch = [(jax.device_put(x, by_data), jax.device_put(y, by_data)) for x, y in zip(xs, ys)]
      if in_step:  # a window is one step over k micro-batches' rows
        batch = [
          tuple(jnp.concatenate(part) for part in zip(*batch[w * K : (w + 1) * K]))
          for w in range(2)
        ]
      text = step.lower(params, state, *batch[0]).compile().as_text()
      for x, y in batch:
        params, state = step(params, state, x, y)
      mu = (state if in_step else state.inner_opt_state)[0].mu["w1"]
      results[form] = {
        **per_window(text, 1 if in_step else K),
        "relative_error": relative_error(params, reference),
        "params_spec": [str(params[n].sharding.spec) for n in sorted(params)],
        "mu_bytes_per_device": mu.addressable_shards[0].data.nbytes,
        "mu_spec": str(mu.sharding.spec),
        "mu_bytes": mu.nbytes,
        "gradient_bytes": sum(p.nbytes for p in start.values()),
      }
  return results


def placement(mesh):
  """Where `shard_optimizer`'s init puts each kind of state leaf, eagerly and under jit."""
  state = {
    "rows_divide": jnp.zeros((16, 3)),
    "columns_divide": jnp.zeros((3, 16)),
    "none_divides": jnp.zeros((3, 5)),
    "count": jnp.zeros((), jnp.int32),
  }
  tx = optaccum.parallel.shard_optimizer(
    optax.GradientTransformation(lambda params: state, optax.identity().update)
  )
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.zeros((16, 16)), NamedSharding(mesh, P(None, "data")))}
    eager, jitted = tx.init(params), jax.jit(tx.init)(params)
    # A leaf already sharded over the axis is left where it is.
    already = optaccum.parallel.shard_optimizer(optax.sgd(0.1, momentum=0.9)).init(params)
  spec = lambda leaf: str(getattr(leaf.sharding, "spec", "one device"))  # noqa: E731
  return {
    "eager": {name: spec(leaf) for name, leaf in eager.items()},
    "jitted": {name: spec(leaf) for name, leaf in jitted.items()},
    "already": str(already[0].trace["w"].sharding.spec),
  }


if __name__ == "__main__":
  main()
