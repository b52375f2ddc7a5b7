"""Mid-window checkpoints of `accumulate(axis_name=...)` under `jax.pmap`, on 4 CPU devices.

Run by tests/test_checkpoint.py in the suite's 8-device child (`eight_devices` in
tests/conftest.py; `pmap` takes the first 4 devices), or by hand:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.checks.pmap_checkpoint [DIR]
Saves into DIR, or into a temporary folder it removes. Prints one JSON line. Two
ways to hold the state: declared replicated (`in_axes=None`, `out_axes=None`),
where in the middle of a window each device keeps its own partial sum in an
array that claims to be one value; and kept per device (`out_axes=0`, a leading
device axis). The first must refuse a mid-window save; both must resume bit for
bit from a save they accept.
"""

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaccum

DEVICES = 4
EVERY_K = 4
MICRO_STEPS = 12


def micro_batches(step):
  """One micro-batch per device: [devices, rows, features], and targets."""
  rng = np.random.default_rng(step)
  x = rng.normal(size=(DEVICES, 8, 3)).astype(np.float32)
  return x, rng.normal(size=(DEVICES, 8)).astype(np.float32)


def fresh():
  tx = optaccum.accumulate(optax.adam(0.05), EVERY_K, axis_name="devices")
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  return tx, (params, tx.init(params))


def make_step(tx, per_device):
  def step(state, x, y):
    params, opt_state = state
    loss = lambda p: jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))  # noqa: E731
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  axes = (0 if per_device else None, 0, 0), 0 if per_device else None
  return jax.pmap(
    step,
    axis_name="devices",
    in_axes=axes[0],
    out_axes=axes[1],
    devices=jax.devices()[:DEVICES],
  )


def train(step, state, steps):
  for i in steps:
    state = step(state, *micro_batches(i))
  return state


def per_device(state):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (DEVICES, *jnp.shape(x))), state)


def params_of(state, per_device):
  params = state[0]
  return {k: np.asarray(v[0] if per_device else v).tolist() for k, v in params.items()}


def replicated(directory):
  """Declared replicated: a mid-window save is refused; one at a window's end resumes."""
  tx, state = fresh()
  step = make_step(tx, per_device=False)
  uninterrupted = params_of(train(step, state, range(MICRO_STEPS)), False)
  state = train(step, fresh()[1], range(6))
  try:
    optaccum.checkpoint.save(f"{directory}/replicated_mid", state, k=EVERY_K)
    refusal = None
  except ValueError as error:
    refusal = str(error)
  state = train(step, fresh()[1], range(8))  # two windows: the sums are gone
  optaccum.checkpoint.save(f"{directory}/replicated_end", state, k=EVERY_K)
  restored = optaccum.checkpoint.restore(f"{directory}/replicated_end", fresh()[1], k=EVERY_K)
  resumed = params_of(train(step, restored, range(8, MICRO_STEPS)), False)
  return {"refusal": refusal, "resumed_equal": resumed == uninterrupted}


def kept_per_device(directory):
  """A leading device axis: every device's partial sum is saved, and resumes mid-window."""
  tx, state = fresh()
  step = make_step(tx, per_device=True)
  uninterrupted = params_of(train(step, per_device(state), range(MICRO_STEPS)), True)
  state = train(step, per_device(fresh()[1]), range(6))
  sums = np.asarray(state[1].acc_grads["w"])
  optaccum.checkpoint.save(f"{directory}/per_device_mid", state, k=EVERY_K)
  target = per_device(fresh()[1])
  restored = optaccum.checkpoint.restore(f"{directory}/per_device_mid", target, k=EVERY_K)
  resumed = params_of(train(step, restored, range(6, MICRO_STEPS)), True)
  return {
    "devices_differ": not all(np.array_equal(sums[0], s) for s in sums[1:]),
    "resumed_equal": resumed == uninterrupted,
  }


def main():
  assert jax.device_count() >= DEVICES, jax.devices()
  with tempfile.TemporaryDirectory(prefix="pmap-checkpoint-") as scratch:
    directory = sys.argv[1] if len(sys.argv) > 1 else scratch
    results = {"replicated": replicated(directory), "per_device": kept_per_device(directory)}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
