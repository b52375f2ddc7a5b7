"""Sharded accumulators on 8 CPU devices: output shardings and the collectives XLA compiles.

Run by tests/test_sharding.py in a process of its own, or by hand:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.checks.sharding [--auto-mesh]
Prints one JSON line of measurements; the test asserts on them. `--auto-mesh`
adds the Auto-mesh micro-batching measurement quoted in docs/distributed.md
(not asserted: it is XLA's choice, not optaccum's).
"""

import contextlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaccum
from tests import hlo

OTHER_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def specs(tree):
  """Each leaf's PartitionSpec, without trailing Nones (P() and P(None,) are one layout)."""

  def spec(x):
    parts = list(x.sharding.spec)
    while parts and parts[-1] is None:
      parts.pop()
    return str(P(*parts))

  return [spec(x) for x in jax.tree.leaves(tree)]


def make_params(mesh, layout):
  """A small MLP's parameters: replicated, or its matrices sharded FSDP-style by rows."""
  params = {"w1": jnp.ones((32, 64)) / 32, "w2": jnp.ones((64, 16)) / 64, "b": jnp.ones((16,))}
  rows = P("fsdp") if layout == "fsdp" else P()
  spec = {"w1": rows, "w2": rows, "b": P()}
  return jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, spec)


def loss(params, x):
  # Under explicit sharding an FSDP model gathers its weights itself.
  params = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params)
  h = jnp.tanh(x @ params["w1"])
  return jnp.mean((h @ params["w2"] + params["b"]) ** 2)


def other_collectives(text):
  return {op: len(hlo.collectives(text, (op,))) for op in OTHER_COLLECTIVES}


def check_accumulate(axis_type, layout):
  """The cross-step transformation: init and one jitted update on sharded params."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
  context = jax.set_mesh(mesh) if axis_type == AxisType.Explicit else contextlib.nullcontext()
  with context:
    params = make_params(mesh, layout)
    tx = optaccum.accumulate(optax.sgd(0.1, momentum=0.9), k=4)
    state = tx.init(params)
    jit_state = jax.jit(tx.init)(params) if axis_type == AxisType.Explicit else None

    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    grads = jax.tree.map(lambda p: p * 0.5, params)
    compiled = jax.jit(step).lower(grads, state, params).compile()
    new_params, new_state = compiled(grads, state, params)
    text = compiled.as_text()
  reduces = hlo.collectives(text, ("all-reduce",))
  return {
    "param_specs": specs(params),
    "init_acc_specs": specs(state.acc_grads),
    "jit_init_acc_specs": None if jit_state is None else specs(jit_state.acc_grads),
    "step_param_specs": specs(new_params),
    "step_acc_specs": specs(new_state.acc_grads),
    "step_momentum_specs": specs(new_state.inner_opt_state),
    "other_collectives": other_collectives(text),
    "all_reduce_bytes": [c.bytes for c in reduces],
  }


def while_carry(text):
  """The shapes in the tuple of the program's loops (the scan's carry among them)."""
  return [line.split(" while(")[0] for line in text.splitlines() if " while(" in line]


def check_microbatch(layout, num_microbatches=4):
  """`microbatch` under explicit sharding: the unsplit step and the split one compared."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = make_params(mesh, layout)
    x = jax.device_put(
      jax.random.normal(jax.random.key(0), (64, 32)), NamedSharding(mesh, P("fsdp"))
    )
    grad_fn = jax.value_and_grad(loss)
    split_fn = optaccum.microbatch(grad_fn, num_microbatches)
    unsplit = jax.jit(grad_fn).lower(params, x).compile()
    split = jax.jit(split_fn).lower(params, x).compile()
    (value, grads), (ref_value, ref_grads) = split(params, x), unsplit(params, x)
  diff = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves((value, grads)), jax.tree.leaves((ref_value, ref_grads)))
  )
  return {
    "param_specs": specs(params),
    "grad_specs": specs(grads),
    "unsplit_grad_specs": specs(ref_grads),
    "local_grad_shapes": [
      list(s.data.shape) for g in jax.tree.leaves(grads) for s in g.addressable_shards[:1]
    ],
    "carry": while_carry(split.as_text()),
    "all_gather": {
      "unsplit": hlo.summary(unsplit.as_text(), "all-gather"),
      "split": hlo.summary(split.as_text(), "all-gather"),
    },
    "all_reduce": {
      "unsplit": hlo.summary(unsplit.as_text(), "all-reduce"),
      "split": hlo.summary(split.as_text(), "all-reduce"),
    },
    "other_collectives": {
      "unsplit": other_collectives(unsplit.as_text()),
      "split": other_collectives(split.as_text()),
    },
    "max_abs_diff": diff,
  }


def auto_mesh_microbatch(num_microbatches=4):
  """Measured, not asserted: FSDP `microbatch` on an Auto mesh, where XLA picks the layouts."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  params = make_params(mesh, "fsdp")
  x = jax.device_put(jax.random.normal(jax.random.key(0), (64, 32)), NamedSharding(mesh, P("fsdp")))

  def auto_loss(params, x):
    h = jnp.tanh(x @ params["w1"])
    return jnp.mean((h @ params["w2"] + params["b"]) ** 2)

  grad_fn = jax.value_and_grad(auto_loss)
  texts = {
    "unsplit": jax.jit(grad_fn).lower(params, x).compile().as_text(),
    "split": jax.jit(optaccum.microbatch(grad_fn, num_microbatches))
    .lower(params, x)
    .compile()
    .as_text(),
  }
  return {name: other_collectives(text) for name, text in texts.items()}


def main():
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  results = {
    "jax": jax.__version__,
    "accumulate": {
      f"{axis_type.name.lower()}/{layout}": check_accumulate(axis_type, layout)
      for axis_type in (AxisType.Auto, AxisType.Explicit)
      for layout in ("fsdp", "replicated")
    },
    "microbatch": {layout: check_microbatch(layout) for layout in ("fsdp", "replicated")},
  }
  if "--auto-mesh" in sys.argv[1:]:
    results["auto_mesh_microbatch"] = auto_mesh_microbatch()
  print(json.dumps(results))


if __name__ == "__main__":
  main()
