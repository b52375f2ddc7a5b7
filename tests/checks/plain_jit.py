"""Data parallelism under plain `jax.jit` on 8 CPU devices: all-reduces per window, equality.

Run by tests/test_plain_jit.py in a process of its own, or by hand:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.checks.plain_jit [--full]
Prints one JSON line. For each mesh (dp: 'data'=8; hsdp: 'data'=2 x 'fsdp'=4,
the matrices sharded over 'fsdp' by rows; pure fsdp: 'data'=8 sharding both the
batch and the matrices), each axis type (Auto, Explicit)
and each method, it counts the compiled all-reduces per window of k = 4
micro-steps that communicate over 'data' and over 'fsdp', and the all-gathers
over 'data' (from the program's
structure: loop trip counts, conditional branches, device groups), their
bytes, the per-device bytes of the accumulator, and the largest difference
from large-batch Optax (SGD with momentum and weight decay) on the same data
after two windows. `features` checks the window guard, skip policies, weights,
statistics, stochastic rounding, aux outputs and keys under `axis_name`. The
numbers in docs/distributed.md come from `--full`; the test runs the methods it
asserts on (and one baseline) and the features on one mesh.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaccum
from tests import hlo

K, ROWS, WINDOWS = 4, 64, 2
MESHES = {"dp": ((8,), ("data",)), "hsdp": ((2, 4), ("data", "fsdp")), "fsdp": ((8,), ("data",))}
# The mesh axis each kind shards its matrices over: pure FSDP shards them over the batch axis.
PARAM_AXIS = {"dp": None, "hsdp": "fsdp", "fsdp": "data"}
AXES = ("data",)


def spec_of(x):
  parts = list(x.sharding.spec)
  while parts and parts[-1] is None:
    parts.pop()
  return str(P(*parts))


def host_params():
  """A 3-layer MLP's parameters, in host memory: the same values on every mesh."""
  rng = np.random.RandomState(0)
  shapes = {"w1": (32, 128), "b1": (128,), "w2": (128, 128), "b2": (128,), "w3": (128, 16)}
  shapes["b3"] = (16,)
  return {
    name: (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    for name, shape in shapes.items()
  }


def make_params(mesh, kind):
  """The MLP on the mesh; its matrices sharded by rows over `PARAM_AXIS[kind]`, if any."""
  params = {}
  for name, value in host_params().items():
    spec = P(PARAM_AXIS[kind]) if PARAM_AXIS[kind] and value.ndim == 2 else P()
    params[name] = jax.device_put(value, NamedSharding(mesh, spec))
  return params


def make_loss(explicit_fsdp):
  def loss(params, x, y):
    if explicit_fsdp:
      # The model contract on an Explicit FSDP mesh: the model gathers its weights.
      params = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params)
    # In the parameters' dtype (a no-op for float32; bfloat16 where
    # microbatch(gather_dtype=jnp.bfloat16) cast them), as a mixed-precision model does.
    x, y = x.astype(params["w1"].dtype), y.astype(params["w1"].dtype)
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"] + params["b2"])
    return jnp.mean((h @ params["w3"] + params["b3"] - y) ** 2)

  return loss


def host_data():
  """[WINDOWS * K] micro-batches of ROWS rows (inputs, targets), in host memory."""
  rng = np.random.RandomState(1)
  xs = rng.normal(size=(WINDOWS * K, ROWS, 32)).astype(np.float32)
  ys = rng.normal(size=(WINDOWS * K, ROWS, 16)).astype(np.float32)
  return xs, ys


def make_data(mesh, kind):
  """The micro-batches on the mesh, sharded over the batch axes."""
  batch = NamedSharding(mesh, P(("data", "fsdp") if kind == "hsdp" else "data"))
  return [(jax.device_put(x, batch), jax.device_put(y, batch)) for x, y in zip(*host_data())]


def optimizer():
  # Not AdamW: optax's bias correction fails the strict dtype promotion this check runs under.
  return optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.5, momentum=0.9))


@functools.cache
def reference():
  """Large-batch Optax on the host: one update per window, on the window's rows.

  The same parameters and data on every mesh: computed once for all of them.
  """
  params, (xs, ys) = host_params(), host_data()
  loss = make_loss(False)
  state = optimizer().init(params)
  for w in range(WINDOWS):
    x = np.concatenate(xs[w * K : (w + 1) * K])
    y = np.concatenate(ys[w * K : (w + 1) * K])
    grads = jax.grad(loss)(params, x, y)
    updates, state = optimizer().update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def per_window(text, mesh_shape, axis, steps, op="all-reduce"):
  """`op`s over mesh axis `axis` per window: `steps` calls of the compiled step.

  Ops outside conditionals run on every call; those inside a branch run on
  the window's closing call only.
  """
  count, size = 0, 0
  for c in hlo.collectives(text, (op,)):
    if not c.spans(mesh_shape, axis):
      continue
    assert c.executions is not None, "a loop of unknown trip count"
    runs = c.executions * (1 if c.conditional else steps)
    count, size = count + runs, size + runs * c.bytes
  return count, size


def local_bytes(tree):
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def methods(loss):
  """Name -> (init, step, calls per window). A step is (params, state, x, y) -> (params, state)."""
  tx = optaccum.accumulate(optimizer(), K, axis_name=AXES)
  plain_tx = optaccum.accumulate(optimizer(), K)
  multisteps = optax.MultiSteps(optimizer(), K)
  grad_fn = optaccum.parallel.per_replica(jax.grad(loss), axis_name=AXES)
  split = optaccum.microbatch(jax.value_and_grad(loss), K, axis_name=AXES)
  split_bf16 = optaccum.microbatch(
    jax.value_and_grad(loss), K, axis_name=AXES, gather_dtype=jnp.bfloat16
  )
  plain_split = optaccum.microbatch(jax.value_and_grad(loss), K)

  def transformation(tx, grads_of):
    def step(params, state, x, y):
      updates, state = tx.update(grads_of(params, x, y), state, params)
      return optax.apply_updates(params, updates), state

    return step

  def fast(params, state, x, y):
    return optaccum.apply_gradients(tx, grad_fn(params, x, y), state, params)

  def in_step(split_fn):
    def step(params, state, x, y):
      _, grads = split_fn(params, x, y)
      updates, state = optimizer().update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  return {
    "accumulate(axis_name) + per_replica": (tx.init, transformation(tx, grad_fn), K),
    "apply_gradients(axis_name) + per_replica": (tx.init, fast, K),
    "microbatch(axis_name)": (optimizer().init, in_step(split), 1),
    "microbatch(axis_name, gather_dtype=bfloat16)": (optimizer().init, in_step(split_bf16), 1),
    "accumulate, plain jit": (plain_tx.init, transformation(plain_tx, jax.grad(loss)), K),
    "microbatch, plain jit": (optimizer().init, in_step(plain_split), 1),
    "optax.MultiSteps": (multisteps.init, transformation(multisteps, jax.grad(loss)), K),
    "large batch, no accumulation": (optimizer().init, in_step(jax.value_and_grad(loss)), 1),
  }


def joined(data, calls):
  """The micro-batches as the method takes them: one by one, or k joined into one call."""
  if calls == K:
    return data
  return [
    tuple(jnp.concatenate([d[i] for d in data[w * K : (w + 1) * K]]) for i in range(2))
    for w in range(WINDOWS)
  ]


# Without --full: the methods the test asserts on, and one baseline (the suite's time).
ASSERTED = (
  "accumulate(axis_name) + per_replica",
  "apply_gradients(axis_name) + per_replica",
  "microbatch(axis_name)",
  "accumulate, plain jit",
)


def check(kind, axis_type, chosen=ASSERTED):
  shape, axis_names = MESHES[kind]
  mesh = jax.make_mesh(shape, axis_names, axis_types=(axis_type,) * len(axis_names))
  explicit_fsdp = PARAM_AXIS[kind] is not None and axis_type == AxisType.Explicit
  loss = make_loss(explicit_fsdp)
  results = {}
  with jax.set_mesh(mesh):
    params = make_params(mesh, kind)
    data = make_data(mesh, kind)
    expected = reference()
    for name, (init, step, calls) in methods(loss).items():
      if name not in chosen:
        continue
      batches = joined(data, calls)
      state = init(params)
      # optax.MultiSteps fails strict promotion itself; optaccum runs strict.
      promotion = "standard" if name == "optax.MultiSteps" else "strict"
      # On an Auto mesh XLA picks the outputs' layouts: pin them to the inputs',
      # as a training loop that feeds its outputs back must. Explicit: the types do.
      out = None
      if axis_type == AxisType.Auto:
        out = jax.tree.map(lambda a: a.sharding, (params, state))
      with jax.numpy_dtype_promotion(promotion):
        compiled = jax.jit(step, out_shardings=out).lower(params, state, *batches[0]).compile()
      text = compiled.as_text()
      new_params = params
      for x, y in batches:
        new_params, state = compiled(new_params, state, x, y)
      diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(expected))
      )
      data_reduces, data_bytes = per_window(text, shape, 0, calls)
      data_gathers, gather_bytes = per_window(text, shape, 0, calls, "all-gather")
      fsdp_reduces, fsdp_bytes = per_window(text, shape, 1, calls) if kind == "hsdp" else (0, 0)
      acc = getattr(state, "acc_grads", None)
      results[name] = {
        "data_all_reduces": data_reduces,
        "data_bytes": data_bytes,
        "data_all_gathers": data_gathers,
        "data_gather_bytes": gather_bytes,
        "fsdp_all_reduces": fsdp_reduces,
        "fsdp_bytes": fsdp_bytes,
        "max_abs_diff": diff,
        # The profiler spans each all-reduce over the data axis was traced in.
        "data_all_reduce_op_names": [c.op_name for c in hlo.collectives(text) if c.spans(shape, 0)],
        "param_specs": [spec_of(p) for p in jax.tree.leaves(params)],
        "out_param_specs": [spec_of(p) for p in jax.tree.leaves(new_params)],
        "acc_specs": None if acc is None else [spec_of(a) for a in jax.tree.leaves(acc)],
        "acc_local_bytes": None if acc is None else local_bytes(acc),
        "param_local_bytes": local_bytes(params),
      }
  return results


def replica_grads(loss, params, x, y, replicas):
  """Host reference: each replica's gradient of its own contiguous block of rows."""
  params = jax.device_get(params)
  x, y = np.asarray(x), np.asarray(y)
  rows = x.shape[0] // replicas
  return [
    jax.grad(loss)(params, x[r * rows : (r + 1) * rows], y[r * rows : (r + 1) * rows])
    for r in range(replicas)
  ]


def sgd_reference(params, gradient):
  updates, _ = optimizer().update(gradient, optimizer().init(params), params)
  return optax.apply_updates(jax.device_get(params), updates)


def max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def mean_of(trees, weights=None):
  weights = np.ones(len(trees)) if weights is None else np.asarray(weights, np.float64)
  total = float(np.sum(weights))
  return jax.tree.map(
    lambda *leaves: (
      sum(w * np.asarray(leaf, np.float64) for w, leaf in zip(weights, leaves)) / total
    ),
    *trees,
  )


def run_window(tx, loss, params, data, weights=None, fast=False, steps=K):
  """`steps` micro-steps (one window) through `tx` (or the fast path), jitted."""
  grad_fn = optaccum.parallel.per_replica(jax.grad(loss), axis_name=AXES)

  def step(params, state, x, y, weight):
    grads = grad_fn(params, x, y)
    if fast:
      return optaccum.apply_gradients(tx, grads, state, params, weight=weight)
    updates, state = tx.update(grads, state, params, weight=weight)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step)
  state = tx.init(params)
  for t, (x, y) in enumerate(data[:steps]):
    weight = None if weights is None else jnp.asarray(weights[t], jnp.float32)
    params, state = compiled(params, state, x, y, weight)
  return params, state


def features(kind, axis_type):
  """The guard, skip policies, per-replica weights, statistics, rounding, aux and keys."""
  shape, names = MESHES[kind]
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
  loss = make_loss(kind == "hsdp" and axis_type == AxisType.Explicit)
  host_loss = make_loss(False)
  replicas = shape[0]
  out = {}
  with jax.set_mesh(mesh):
    params = make_params(mesh, kind)
    data = make_data(mesh, kind)
    grads = [replica_grads(host_loss, params, x, y, replicas) for x, y in data[: K + 1]]

    # A NaN (and nothing else) in one row of one replica's block of micro-batch 1.
    bad = [list(d) for d in data]
    x_bad = np.asarray(bad[1][0]).copy()
    x_bad[ROWS - 1, 3] = np.nan
    bad[1][0] = jax.device_put(x_bad, data[1][0].sharding)
    bad = [tuple(d) for d in bad]
    tx = optaccum.accumulate(optimizer(), K, axis_name=AXES)
    for form in ("transformation", "fast path"):
      new, state = run_window(tx, loss, params, bad, fast=form == "fast path")
      out[f"guard/{form}"] = {
        "unchanged": max_diff(new, params),
        "skipped_windows": int(optaccum.status(state).num_skipped_windows),
      }
    skipping = optaccum.accumulate(optimizer(), K, axis_name=AXES, skip=optaccum.skip.not_finite)
    # The skipped micro-step is as if it never happened: the window takes a fifth.
    new, state = run_window(skipping, loss, params, bad, steps=K + 1)
    kept = [g for t, gs in enumerate(grads) if t != 1 for g in gs]
    out["skip_not_finite"] = {
      "diff": max_diff(new, sgd_reference(params, mean_of(kept))),
      "skipped": int(optaccum.status(state).num_skipped),
    }

    weights = np.random.RandomState(2).uniform(1, 5, size=(K, replicas)).astype(np.float32)
    new, _ = run_window(tx, loss, params, data, weights=weights)
    flat = [g for gs in grads[:K] for g in gs]
    out["replica_weights"] = max_diff(new, sgd_reference(params, mean_of(flat, weights.ravel())))

    with_stats = optaccum.accumulate(optimizer(), K, axis_name=AXES, statistics=True)
    _, state = run_window(with_stats, loss, params, data)
    stats = optaccum.status(state).statistics
    squared = np.mean(
      [sum(float(np.sum(np.square(leaf))) for leaf in jax.tree.leaves(g)) for g in flat]
    )
    out["statistics"] = {
      "num_micro_batches": int(stats.num_micro_batches),
      "micro_batch_squared_norm": float(stats.micro_batch_squared_norm),
      "expected_squared_norm": squared,
    }

    rounding = optaccum.accumulate(
      optimizer(), K, axis_name=AXES, accumulator=optaccum.stochastic_bfloat16(0)
    )
    new, state = run_window(rounding, loss, params, data)
    out["stochastic_bfloat16"] = {
      "diff": max_diff(new, sgd_reference(params, mean_of(flat))),
      "dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(state.acc_grads)}),
      "acc_specs": [spec_of(a) for a in jax.tree.leaves(state.acc_grads)],
    }

    def with_aux(params, x, y):
      value = loss(params, x, y)
      return value, {"pred": x[:, 0] * 2, "rows": jnp.asarray(x.shape[0], jnp.int32)}

    split = optaccum.microbatch(
      jax.value_and_grad(with_aux, has_aux=True),
      K,
      has_aux=True,
      axis_name=AXES,
      aux_reduction={"pred": "concat", "rows": "sum"},
    )
    (value, aux), _ = jax.jit(split)(params, *data[0])
    out["microbatch_aux"] = {
      "loss_diff": abs(float(value) - float(host_loss(jax.device_get(params), *data[0]))),
      "concat_in_order": bool(
        np.array_equal(np.asarray(aux["pred"]), np.asarray(data[0][0])[:, 0] * 2)
      ),
      "rows": int(aux["rows"]),
    }

    # Updates in another dtype than the gradients' (bfloat16 parameters, a
    # float32-emitting optimizer): the fallback carry keeps the Explicit shardings.
    to_float32 = optax.stateless(lambda u, p: jax.tree.map(lambda a: a.astype(jnp.float32), u))
    casting = optaccum.accumulate(optax.chain(optimizer(), to_float32), K, axis_name=AXES)
    low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    low_loss = lambda p, x, y: loss(jax.tree.map(lambda a: a.astype(jnp.float32), p), x, y)  # noqa: E731
    updates, _ = jax.jit(casting.update)(
      optaccum.parallel.per_replica(jax.grad(low_loss), axis_name=AXES)(low, *data[0]),
      casting.init(low),
      low,
    )
    out["other_update_dtypes"] = {
      "dtypes": sorted({str(u.dtype) for u in jax.tree.leaves(updates)}),
      "specs": [spec_of(u) for u in jax.tree.leaves(updates)],
      "param_specs": [spec_of(p) for p in jax.tree.leaves(params)],
    }

    # A leaf of 131 072 entries, sharded like the matrices (here over 'fsdp').
    big = {
      "w": jax.device_put(
        (np.random.RandomState(3).normal(size=(512, 256)) / 16).astype(np.float32),
        params["w1"].sharding,
      )
    }
    rng = np.random.RandomState(4)
    rows = data[0][0].sharding
    big_data = [
      tuple(jax.device_put(rng.normal(size=(ROWS, n)).astype(np.float32), rows) for n in (512, 256))
      for _ in range(K)
    ]

    def big_loss(params, x, y, gather=kind == "hsdp" and axis_type == AxisType.Explicit):
      w = jax.sharding.reshard(params["w"], P()) if gather else params["w"]
      return jnp.mean((x @ w - y) ** 2)

    new, _ = run_window(tx, big_loss, big, big_data)
    window_x = np.concatenate([np.asarray(x) for x, _ in big_data])
    window_y = np.concatenate([np.asarray(y) for _, y in big_data])
    gradient = jax.grad(lambda p, x, y: big_loss(p, x, y, gather=False))(
      jax.device_get(big), window_x, window_y
    )
    out["large_leaf"] = max_diff(new, sgd_reference(big, gradient))

    draws = optaccum.parallel.per_replica(
      lambda params, x, key: jax.random.uniform(key, ()), axis_name=AXES, key_arg=2
    )
    values = np.asarray(jax.jit(draws)(params, data[0][0], jax.random.key(0)))
    out["per_replica_keys"] = {"shape": list(values.shape), "distinct": len(set(values.tolist()))}
  return out


def plan_rows(kind="fsdp", axis_type=AxisType.Explicit, candidates=(1, 4)):
  """`planning.plan(..., axis_name="data")` on the mesh: each row's memory, by "form k"."""
  shape, axis_names = MESHES[kind]
  mesh = jax.make_mesh(shape, axis_names, axis_types=(axis_type,) * len(axis_names))
  with jax.set_mesh(mesh):
    params = make_params(mesh, kind)
    window = make_data(mesh, kind)[:K]
    batch = tuple(jnp.concatenate([d[i] for d in window]) for i in range(2))
    loss = make_loss(PARAM_AXIS[kind] is not None and axis_type == AxisType.Explicit)
    chosen = optaccum.planning.plan(
      jax.value_and_grad(loss),
      params,
      optimizer(),
      batch,
      budget="1GiB",
      candidates=list(candidates),
      axis_name="data",
    )
  rows = {
    f"{row.form} {row.k}": {"arguments": row.arguments, "total": row.total, "fits": row.fits}
    for row in chosen.rows
  }
  fields = ("microbatch", "accumulate", "microbatch_deferred", "accumulate_deferred")
  return {"rows": rows, "chosen": {name: getattr(chosen, name) for name in fields}}


FSDP_ROWS = {
  "reduce every micro-batch": ("accumulate, plain jit", "microbatch, plain jit"),
  "once per window (`axis_name`)": (
    "accumulate(axis_name) + per_replica",
    "apply_gradients(axis_name) + per_replica",
    "microbatch(axis_name)",
    "microbatch(axis_name, gather_dtype=bfloat16)",
  ),
}


FSDP_HEADER = (
  "| option | method | mesh | all-reduces over `data` (bytes) | all-gathers (bytes) "
  "| accumulator per device | parameters per device | largest difference from large batch |\n"
  "|---|---|---|---|---|---|---|---|"
)


def fsdp_rows(results):
  """docs/distributed.md's pure-FSDP rows, for the methods and meshes `results` holds."""
  rows = [*((o, n, f"`{n}`") for o, names in FSDP_ROWS.items() for n in names)]
  rows.append(("no accumulation", "large batch, no accumulation", "a k-times larger batch"))
  lines = []
  for option, name, label in rows:
    for case in ("fsdp/explicit", "fsdp/auto"):
      r = results.get(case, {}).get(name)
      if r is None:
        continue
      acc = "-" if r["acc_local_bytes"] is None else f"{r['acc_local_bytes']:,} B"
      lines.append(
        f"| {option} | {label} | {case.split('/')[1].capitalize()} "
        f"| {r['data_all_reduces']} ({r['data_bytes']:,}) "
        f"| {r['data_all_gathers']} ({r['data_gather_bytes']:,}) "
        f"| {acc} | {r['param_local_bytes']:,} B | {r['max_abs_diff']:.0e} |"
      )
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m tests.checks.plain_jit")
  parser.add_argument(
    "--full", action="store_true", help="every method (the docs' table) and both feature meshes"
  )
  parser.add_argument(
    "--fsdp-table", action="store_true", help="print docs/distributed.md's pure-FSDP table"
  )
  options = parser.parse_args(argv)
  full = options.full
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  if options.fsdp_table:
    names = tuple(methods(make_loss(False)))
    kinds = (AxisType.Explicit, AxisType.Auto)
    results = {f"fsdp/{t.name.lower()}": check("fsdp", t, names) for t in kinds}
    print("\n".join([FSDP_HEADER, *fsdp_rows(results)]))
    return
  names = tuple(methods(make_loss(False))) if full else ASSERTED
  results = {
    f"{kind}/{axis_type.name.lower()}": check(kind, axis_type, names)
    for kind in ("dp", "hsdp")
    for axis_type in (AxisType.Auto, AxisType.Explicit)
  }
  # Pure FSDP: the test asserts both options on Explicit (axis_name deferred; without it
  # a reduction per micro-batch into a sharded accumulator); Auto is measured for the docs.
  fsdp_names = (
    names
    if full
    else (*ASSERTED, "microbatch, plain jit", "microbatch(axis_name, gather_dtype=bfloat16)")
  )
  results["fsdp/explicit"] = check("fsdp", AxisType.Explicit, fsdp_names)
  results["plan fsdp/explicit"] = plan_rows()
  if full:
    results["fsdp/auto"] = check("fsdp", AxisType.Auto, names)
  results["features"] = {"hsdp/explicit": features("hsdp", AxisType.Explicit)}
  if full:
    results["features"]["dp/auto"] = features("dp", AxisType.Auto)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
