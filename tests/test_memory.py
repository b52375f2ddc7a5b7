"""Memory the compiled step needs, from XLA's compiled memory analysis (no timings).

The comments in the core that say "written into the accumulator's buffer" or "no
parameter-sized temporary" are checked here, on a 1M-parameter layer, against
the temporaries of a plain SGD step on the same gradient (the gradient itself
and the backward pass's scratch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import optaccum

PARAMS = {"w": jnp.zeros((1000, 1000), jnp.float32), "b": jnp.zeros(1000, jnp.float32)}
PARAM_BYTES = 4 * (1000 * 1000 + 1000)
X = jnp.ones((4, 1000), jnp.float32)


def _loss(params, x):
  return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]))


def _temp_bytes(fn, *args, donate):
  with jax.numpy_dtype_promotion("standard"):  # optax's adam fails strict promotion
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@functools.cache  # one baseline for every case
def _plain_temp():
  def plain(params, x):
    grads = jax.grad(_loss)(params, x)
    return jax.tree.map(lambda p, g: p - g, params, grads)

  return _temp_bytes(plain, PARAMS, X, donate=(0,))


@pytest.mark.parametrize("inner", [optax.adam(1e-3), optax.sgd(0.1, momentum=0.9)])
def test_transformation_writes_updates_into_the_accumulators_buffer(inner):
  tx = optaccum.accumulate(inner, k=4)

  def train(params, state, x):
    grads = jax.grad(_loss)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  extra = _temp_bytes(train, PARAMS, tx.init(PARAMS), X, donate=(0, 1)) - _plain_temp()
  # A fresh tree of updates (or of zeros), or a copy of the gradients to hold
  # them, would be one more parameter-sized buffer. Measured: 0.4 KB.
  assert extra < PARAM_BYTES / 8, extra


@pytest.mark.parametrize("skip", [None, optaccum.skip.not_finite])
def test_fast_path_needs_no_parameter_sized_temporary(skip):
  tx = optaccum.accumulate(optax.adam(1e-3), k=4, skip=skip)

  def train(params, state, x):
    grads = jax.grad(_loss)(params, x)
    return optaccum.apply_gradients(tx, grads, state, params)

  extra = _temp_bytes(train, PARAMS, tx.init(PARAMS), X, donate=(0, 1)) - _plain_temp()
  # Measured: 0.4 KB by default; 0.99 MB (a quarter of the parameters) with the
  # per-micro-batch count of skip_not_finite.
  assert extra < (PARAM_BYTES / 8 if skip is None else PARAM_BYTES / 2), extra


def test_a_bfloat16_accumulator_saves_its_two_bytes_per_parameter_in_the_fast_path():
  # A whole train step (gradient, accumulation, AdamW) of four 262 144-entry layers
  # with a small micro-batch, as `python -m benchmarks.accumulator_cost` measures at
  # 8.4M: the fast path's temporaries stay those of float32, so the step holds 2 bytes
  # per parameter less. The transformation must hand `apply_updates` float32 updates
  # that a bfloat16 accumulator cannot hold: here its temporaries grow by nearly what
  # the accumulator saves (measured: 2 097 024 bytes against 2 097 152; 24 MiB against
  # 16 MiB at 8.4M; with only two such layers XLA found room for them and they did
  # not grow), as docs/precision_and_statistics.md says.
  from benchmarks import accumulator_cost

  with jax.numpy_dtype_promotion("standard"):  # optax's adamw fails strict promotion
    rows = accumulator_cost.train_step_memory(width=512, depth=4, batches=(8,))
  memory = {(row["form"], row["accumulator"]): row for row in rows}
  accumulator_saving = 4 * 512 * 512 * 4 // 2

  def grown(form, column):
    return memory[form, "bfloat16"][column] - memory[form, "float32"][column]

  assert grown("apply_gradients", "argument") == -accumulator_saving
  assert grown("apply_gradients", "temp") == 0
  assert grown("accumulate + apply_updates", "argument") == -accumulator_saving
  assert grown("accumulate + apply_updates", "temp") > 0.9 * accumulator_saving
