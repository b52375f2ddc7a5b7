"""Features under replicas on 8 CPU devices, against float64 NumPy: both replica modes.

`microbatch` with a shorter last micro-batch and with a traced `num_real`, and
`microbatch(per_example=...)` (DP-SGD clipping), each inside `jax.shard_map` and
under plain `jax.jit` over an Explicit mesh; `skip.spikes` inside
`accumulate(axis_name=...)` in both modes, with `strategy="cond"` and `"select"`.
Prints one JSON line of the largest differences from the references and the
counted skips. Run by tests/test_replica_features.py in the suite's 8-device
child, or by hand:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.checks.replica_features
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaccum

R, K, CLIP = 8, 4, 0.5


def loss(params, x, y):
  return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def numpy_grad(params, x, y):
  """The gradient of `loss` in float64 NumPy, by hand."""
  w1, w2 = (np.asarray(params[n], np.float64) for n in ("w1", "w2"))
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  h = np.tanh(x @ w1)
  d_out = 2 * (h @ w2 - y) / y.size
  d_h = d_out @ w2.T * (1 - h**2)
  return {"w1": x.T @ d_h, "w2": h.T @ d_out}


def clipped_mean(params, x, y):
  """DP-SGD's mean of per-example gradients, each clipped to norm CLIP, in float64."""
  total = None
  for i in range(len(x)):
    g = numpy_grad(params, x[i : i + 1], y[i : i + 1])
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    g = {n: v * min(1.0, CLIP / norm) for n, v in g.items()}
    total = g if total is None else {n: total[n] + g[n] for n in g}
  return {n: v / len(x) for n, v in total.items()}


def clip(grads):
  norm = optax.tree.norm(grads)
  return jax.tree.map(lambda g: g * jnp.minimum(1.0, CLIP / norm), grads), norm


def largest_difference(got, expected):
  return max(float(np.max(np.abs(np.asarray(got[n], np.float64) - expected[n]))) for n in expected)


def microbatch_cases(mesh, params, rng):
  """Tail, num_real and per_example, inside shard_map and under plain jit."""
  put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data")))  # noqa: E731
  grad_fn = jax.value_and_grad(loss)

  def both_modes(split, x, y, *extra, out_specs=(P(), P())):
    mapped = jax.shard_map(
      split,
      mesh=mesh,
      in_specs=(P(), P("data"), P("data"), *(P() for _ in extra)),
      out_specs=out_specs,
    )
    with jax.set_mesh(mesh):
      return jax.jit(mapped)(params, put(x), put(y), *extra), jax.jit(split)(
        params, put(x), put(y), *extra
      )

  out = {}
  # 10 rows per replica, k = 4: micro-batches of 3, 3, 3 and a last one of 1 row.
  x, y = rng.normal(size=(R * 10, 6)), rng.normal(size=(R * 10, 2))
  expected = numpy_grad(params, x, y)
  split = optaccum.microbatch(grad_fn, K, axis_name="data")
  for mode, (_, grads) in zip(("shard_map", "mesh"), both_modes(split, x, y)):
    out[f"tail/{mode}"] = largest_difference(grads, expected)
  # 8 rows per replica, k = 4, num_real = 3 (traced): micro-batch i holds rows
  # i and i + 4 of each replica, so rows 3 and 7 of each are left out.
  x, y = rng.normal(size=(R * 8, 6)), rng.normal(size=(R * 8, 2))
  kept = np.concatenate([r * 8 + np.array([0, 1, 2, 4, 5, 6]) for r in range(R)])
  expected = numpy_grad(params, x[kept], y[kept])

  def with_real(params, x, y, num_real):
    return optaccum.microbatch(grad_fn, K, axis_name="data", num_real=num_real)(params, x, y)

  for mode, (_, grads) in zip(("shard_map", "mesh"), both_modes(with_real, x, y, jnp.int32(3))):
    out[f"num_real/{mode}"] = largest_difference(grads, expected)
  # Per-example clipping; the norms come back per example, in the batch's rows.
  expected = clipped_mean(params, x, y)
  split = optaccum.microbatch(grad_fn, K, axis_name="data", per_example=clip)
  runs = both_modes(split, x, y, out_specs=((P(), P("data")), P()))
  for mode, ((_, norms), grads) in zip(("shard_map", "mesh"), runs):
    out[f"per_example/{mode}"] = largest_difference(grads, expected)
    out[f"per_example_norms/{mode}"] = list(np.shape(norms))
  return out


def spikes_reference(params, xs, ys, lr, sigmas, min_history):
  """Windows of sgd in float64, a window skipped above mean + sigmas * sample std of the norms."""
  w = {n: np.asarray(v, np.float64) for n, v in params.items()}
  norms, skipped = [], 0
  for xw, yw in zip(xs, ys):
    g = numpy_grad(w, xw.reshape(-1, xw.shape[-1]), yw.reshape(-1, yw.shape[-1]))
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    if len(norms) >= min_history and norm > np.mean(norms) + sigmas * np.std(norms, ddof=1):
      skipped += 1
      continue
    norms.append(norm)
    w = {n: w[n] - lr * g[n] for n in w}
  return w, skipped


def spikes_cases(mesh, params, rng):
  """`skip.spikes` as the inner optimizer, across replicas: both modes, two strategies."""
  windows, k, lr, sigmas, min_history = 8, 2, 0.05, 3.0, 3
  xs = rng.normal(size=(windows, k, R * 4, 6))
  ys = rng.normal(size=(windows, k, R * 4, 2))
  ys[6] *= 100.0  # a spike in window 6
  expected, expected_skips = spikes_reference(params, xs, ys, lr, sigmas, min_history)
  put = lambda a: jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, P("data")))  # noqa: E731
  out = {"expected_skips": expected_skips}
  for strategy, mode in (("cond", "mesh"), ("select", "shard_map"), ("select", "mesh")):
    inner = optaccum.skip.spikes(
      optax.sgd(lr), num_sigmas=sigmas, history=8, min_history=min_history
    )
    tx = optaccum.accumulate(inner, k, axis_name="data", strategy=strategy)
    if mode == "mesh":
      grad_fn = optaccum.parallel.per_replica(jax.grad(loss), axis_name="data")
      init, step = (
        tx.init,
        jax.jit(lambda p, s, x, y: optaccum.apply_gradients(tx, grad_fn(p, x, y), s, p)),
      )
    else:

      def local(p, s, x, y):
        return optaccum.apply_gradients(tx, jax.grad(loss)(p, x, y), s, p)

      data_parallel = optaccum.parallel.data_parallel
      init = jax.jit(data_parallel(tx.init, mesh, axis_name="data", batch_argnums=()))
      step = jax.jit(data_parallel(local, mesh, axis_name="data", batch_argnums=(2, 3)))
    with jax.set_mesh(mesh):
      p = jax.device_put(params, NamedSharding(mesh, P()))
      s = init(p)
      for w in range(windows):
        for m in range(k):
          p, s = step(p, s, put(xs[w, m]), put(ys[w, m]))
    out[f"{strategy}/{mode}"] = {
      "difference": largest_difference(p, expected),
      "skips": int(np.asarray(optaccum.status(s).num_spike_windows).ravel()[0]),
    }
  return out


def main():
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  rng = np.random.default_rng(0)
  params = {
    "w1": jnp.asarray(rng.normal(size=(6, 16)) / 3, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(16, 2)) / 4, jnp.float32),
  }
  mesh = jax.make_mesh((R,), ("data",), axis_types=(AxisType.Explicit,))
  results = microbatch_cases(mesh, params, rng)
  results["spikes"] = spikes_cases(mesh, params, rng)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
