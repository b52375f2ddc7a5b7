"""A token-weighted language-model step: variable-length sequences, a padding mask.

Run: python examples/token_weighted_lm.py

Each micro-batch holds 4 padded sequences of different lengths, so the micro-
batches hold different numbers of real tokens. The loss of a micro-batch is the
mean over its real tokens; passing that token count as `weight` makes the
window's update the gradient of the mean over *all* the window's tokens: the
large-batch loss. Averaging the micro-batch means without weights would count a
token of a short micro-batch more than one of a long micro-batch; the example
shows how far that drifts.

A linen `TrainState.apply_gradients` cannot forward `weight`, so the step uses
`optaccum.flax.apply_train_state_gradients` (with NNX, `optimizer.update(model,
grads, weight=...)` forwards it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from flax.training.train_state import TrainState

import optaccum

VOCAB = 16  # token 0 is padding
MAX_LENGTH = 24
EVERY_K = 4
SEQUENCES_PER_MICRO_BATCH = 4
STEPS = 20  # optimizer steps


class BigramLm(linen.Module):
  """Predicts each next token from the current one."""

  @linen.compact
  def __call__(self, tokens):
    hidden = linen.Embed(VOCAB, 32)(tokens)
    return linen.Dense(VOCAB)(jax.nn.gelu(linen.Dense(32)(hidden)))


def make_batches(rng):
  """STEPS windows of padded token sequences from a random Markov chain."""
  transitions = rng.dirichlet(np.full(VOCAB - 1, 0.2), size=VOCAB - 1)
  num = STEPS * EVERY_K * SEQUENCES_PER_MICRO_BATCH
  lengths = rng.integers(4, MAX_LENGTH + 1, size=num)
  tokens = np.zeros((num, MAX_LENGTH), np.int32)
  for row, length in zip(tokens, lengths):
    row[0] = rng.integers(1, VOCAB)
    for t in range(1, length):
      row[t] = 1 + rng.choice(VOCAB - 1, p=transitions[row[t - 1] - 1])
  return tokens.reshape(STEPS, EVERY_K * SEQUENCES_PER_MICRO_BATCH, MAX_LENGTH)


def loss_and_tokens(params, apply_fn, tokens):
  """Mean next-token cross-entropy over the real (unpadded) targets, and their count."""
  logits = apply_fn(params, tokens[:, :-1])
  targets = tokens[:, 1:]
  mask = (targets != 0).astype(jnp.float32)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  num_tokens = jnp.sum(mask)
  return jnp.sum(per_token * mask) / num_tokens, num_tokens


@jax.jit
def mean_loss_step(state, tokens):
  """One step on the gradient of the tokens' mean loss, with no weight."""
  grads, _ = jax.grad(loss_and_tokens, has_aux=True)(state.params, state.apply_fn, tokens)
  return state.apply_gradients(grads=grads)


window_loss = jax.jit(loss_and_tokens, static_argnums=1)


@jax.jit
def weighted_micro_step(state, tokens):
  grads, num_tokens = jax.grad(loss_and_tokens, has_aux=True)(state.params, state.apply_fn, tokens)
  return optaccum.flax.apply_train_state_gradients(state, grads=grads, weight=num_tokens)


def main():
  windows = make_batches(np.random.default_rng(0))
  model = BigramLm()
  params = model.init(jax.random.key(0), windows[0])
  inner = optax.adam(1e-2)

  def new_state(tx):
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  reference = new_state(inner)
  weighted = new_state(optaccum.accumulate(inner, EVERY_K))
  unweighted = new_state(optaccum.accumulate(inner, EVERY_K))
  for step, window in enumerate(windows, start=1):
    reference = mean_loss_step(reference, window)
    micro_batches = np.split(window, EVERY_K)
    for tokens in micro_batches:
      weighted = weighted_micro_step(weighted, tokens)
      # What not to do: every micro-batch's mean counts the same, whatever its tokens.
      unweighted = mean_loss_step(unweighted, tokens)
    if step % 5 == 0:
      counts = [int(np.sum(tokens[:, 1:] != 0)) for tokens in micro_batches]
      loss, _ = window_loss(weighted.params, model.apply, window)
      print(
        f"gradient step {step:2d}: window loss {float(loss):.3f}, tokens per micro-batch {counts}"
      )

  def largest_difference(state):
    pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params))
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)

  for name, state in [("weighted by tokens", weighted), ("unweighted (wrong)", unweighted)]:
    print(f"{name}: largest difference from large batch {largest_difference(state):.1e}")
  assert largest_difference(weighted) < 1e-5


if __name__ == "__main__":
  main()
