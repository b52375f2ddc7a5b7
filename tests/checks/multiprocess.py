"""Data-parallel training with optaccum across processes, on JAX's own distributed runtime.

Each process is one host: `jax.distributed.initialize` joins them over
127.0.0.1, CPU collectives run on gloo, and each process holds 2 of the 4
devices of the mesh. They train three windows of two micro-steps
(`accumulate(axis_name=...)` inside `data_parallel`), each micro-step itself
split in two by `microbatch`, then again under plain `jax.jit` (`per_replica`
around the same `microbatch`, `apply_gradients` with `axis_name`), then as
ZeRO-1 on an Explicit mesh (`parallel.shard_optimizer`: the momentum sharded over
the 4 devices of both processes), and print their parameters. `--reference` instead
trains large-batch optax on one device on the same global data.

Run by tests/test_distributed.py, or by hand (one line per process):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python -m tests.checks.multiprocess --process-id 0 --port 12355 &
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python -m tests.checks.multiprocess --process-id 1 --port 12355
On a real cluster only the launch differs; see docs/distributed.md.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaccum

NUM_PROCESSES, DEVICES, K, MICROBATCHES, WINDOWS, ROWS = 2, 4, 2, 2, 3, 4


def init_params():
  rng = np.random.RandomState(0)
  return {
    "w": rng.normal(size=(8, 3)).astype(np.float32),
    "b": np.zeros((3,), np.float32),
  }


def make_data():
  """[WINDOWS, K, global rows, ...]: every process builds all of it and keeps its part."""
  rng = np.random.RandomState(1)
  rows = DEVICES * ROWS * MICROBATCHES
  return {
    "x": rng.normal(size=(WINDOWS, K, rows, 8)).astype(np.float32),
    "y": rng.normal(size=(WINDOWS, K, rows, 3)).astype(np.float32),
  }


def loss(params, batch):
  return jnp.mean((jnp.tanh(batch["x"] @ params["w"] + params["b"]) - batch["y"]) ** 2)


def optimizer():
  return optax.sgd(0.1, momentum=0.9)


def reference():
  """Large-batch optax on one device: one update per window of K micro-steps."""
  params, data, tx = init_params(), make_data(), optimizer()
  state = tx.init(params)
  for w in range(WINDOWS):
    window = {name: x[w].reshape(-1, x.shape[-1]) for name, x in data.items()}
    updates, state = tx.update(jax.grad(loss)(params, window), state, params)
    params = optax.apply_updates(params, updates)
  return {"params": jax.tree.map(lambda x: np.asarray(x).tolist(), params)}


def train(process_id, port):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=NUM_PROCESSES,
    process_id=process_id,
    initialization_timeout=60,
  )
  try:
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))

    def global_array(x, spec):
      # Every process passes the same host data; each device takes its slice.
      return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

    tx = optaccum.accumulate(optimizer(), K, axis_name="data")
    # Each replica splits its rows again, scanning without communication.
    grad_fn = optaccum.microbatch(jax.value_and_grad(loss), MICROBATCHES)

    def local_step(params, opt_state, batch):
      _, grads = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    init = jax.jit(
      optaccum.parallel.data_parallel(tx.init, mesh, axis_name="data", batch_argnums=())
    )
    step = jax.jit(
      optaccum.parallel.data_parallel(local_step, mesh, axis_name="data", batch_argnums=2)
    )
    params = jax.tree.map(lambda x: global_array(x, P()), init_params())
    data = make_data()
    local, emitted = run_windows(step, params, init(params), data, global_array)
    plain_params, plain_emitted = train_plain_jit(mesh, global_array, data)
    explicit = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
    zero1 = train_zero1(explicit, data)
    return {
      "process_id": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "emitted": emitted,
      "params": local,
      "plain_jit_params": plain_params,
      "plain_jit_emitted": plain_emitted,
      **zero1,
    }
  finally:
    jax.distributed.shutdown()


def train_plain_jit(mesh, global_array, data):
  """The same training under plain `jax.jit`: per_replica gradients, axis_name."""
  tx = optaccum.accumulate(optimizer(), K, axis_name=("data",))
  grad_fn = optaccum.parallel.per_replica(
    optaccum.microbatch(jax.value_and_grad(loss), MICROBATCHES), axis_name=("data",)
  )

  def step(params, opt_state, batch):
    _, grads = grad_fn(params, batch)
    return optaccum.apply_gradients(tx, grads, opt_state, params)

  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda x: global_array(x, P()), init_params())
    return run_windows(jax.jit(step), params, tx.init(params), data, global_array)


def train_zero1(mesh, data):
  """ZeRO-1 on an Explicit mesh: the momentum sharded over the replicas, across processes."""

  def global_array(x, spec):
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

  inner = optaccum.parallel.shard_optimizer(optimizer(), axis_name="data")
  tx = optaccum.accumulate(inner, K, axis_name="data")
  grad_fn = optaccum.parallel.per_replica(
    optaccum.microbatch(jax.value_and_grad(loss), MICROBATCHES), axis_name="data"
  )

  def step(params, opt_state, batch):
    _, grads = grad_fn(params, batch)
    return optaccum.apply_gradients(tx, grads, opt_state, params)

  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda x: global_array(x, P()), init_params())
    opt_state = tx.init(params)
    local, emitted = run_windows(jax.jit(step), params, opt_state, data, global_array)
    trace = tx.init(params).inner_opt_state[0].trace["w"]
  return {
    "zero1_params": local,
    "zero1_emitted": emitted,
    "zero1_trace_shard": list(trace.addressable_shards[0].data.shape),
  }


def run_windows(step, params, opt_state, data, global_array):
  """Every micro-step of every window; this process's parameters and whether each emitted."""
  emitted = []
  for w in range(WINDOWS):
    for m in range(K):
      batch = {name: global_array(x[w, m], P("data")) for name, x in data.items()}
      params, opt_state = step(params, opt_state, batch)
      emitted.append(bool(optaccum.status(opt_state).has_updated.addressable_shards[0].data))
  local = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).tolist(), params)
  return local, emitted


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--port", type=int)
  parser.add_argument("--reference", action="store_true")
  args = parser.parse_args()
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  result = reference() if args.reference else train(args.process_id, args.port)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
