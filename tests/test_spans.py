"""Profiler spans: each form names its parts in the compiled program's op_name metadata.

A `jax.profiler` trace shows XLA ops by these names, so a training step reads as
the window it is. The across-replica reduction's span is checked on 8 devices in
tests/test_plain_jit.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaccum


def _op_names(compiled_text: str, opcode: str) -> list[str]:
  """The op_name of each `opcode` instruction in a compiled program's text."""
  pattern = re.compile(rf"^\s*(?:ROOT )?%\S+ = .* {re.escape(opcode)}\(")
  names = []
  for line in compiled_text.splitlines():
    if pattern.search(line):
      found = re.search(r'op_name="([^"]*)"', line)
      names.append(found.group(1) if found else "")
  return names


def _loss(w, x):
  return jnp.mean(jnp.tanh(x @ w) ** 2)


def test_microbatch_names_each_micro_batch_its_add_and_the_close():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 256)), jnp.float32)
  w = jnp.zeros((256, 128), jnp.float32)
  split = optaccum.microbatch(jax.value_and_grad(_loss), 4)
  text = jax.jit(split).lower(w, x).compile().as_text()
  # The forward and backward matmuls all run inside the micro-batch's span.
  dots = _op_names(text, "dot")
  assert dots and all("optaccum.micro_batch" in name for name in dots), dots
  assert "optaccum.window_add" in text
  assert "optaccum.window_close" in text


def test_accumulate_names_the_add_and_runs_the_inner_optimizer_in_the_close():
  params = {"w": jnp.zeros((300, 400), jnp.float32)}  # 120k entries
  tx = optaccum.accumulate(optax.adam(1e-3), k=4)
  state = tx.init(params)
  for form in ("update", "apply_gradients"):
    if form == "update":
      step = jax.jit(tx.update)
    else:
      step = jax.jit(lambda g, s, p: optaccum.apply_gradients(tx, g, s, p))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam fails strict promotion
      text = step.lower(params, state, params).compile().as_text()
    # Adam's square roots run only where a window closes.
    roots = _op_names(text, "sqrt") + _op_names(text, "rsqrt")
    assert roots and all("optaccum.window_close" in name for name in roots), (form, roots)
    assert "optaccum.window_add" in text, form
