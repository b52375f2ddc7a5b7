"""End-to-end training of a small decoder-only transformer language model.

A Flax (linen) model: token embedding plus learned positions, pre-norm blocks
of causal self-attention and an MLP, and an untied LM head, trained on
synthetic tokens with the mean next-token cross-entropy. Two configurations at
a fixed micro-batch:

* compute-heavy: a small vocabulary and long sequences; the forward and
  backward passes dominate, and every method costs about the same;
* parameter-heavy: a large vocabulary, short sequences and a small
  micro-batch; most parameters sit in the embedding and the head, and the
  optimizer's memory traffic shows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._methods import Workload


@dataclasses.dataclass(frozen=True)
class LanguageModelConfig:
  """Sizes of the model and of one micro-batch."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  seq_len: int
  micro_batch: int


COMPUTE_HEAVY = LanguageModelConfig(512, 256, 2, 4, 128, 8)
PARAMETER_HEAVY = LanguageModelConfig(32768, 128, 1, 4, 16, 2)
QUICK_COMPUTE_HEAVY = LanguageModelConfig(64, 32, 1, 2, 16, 2)
QUICK_PARAMETER_HEAVY = LanguageModelConfig(2048, 16, 1, 2, 8, 2)


class Block(nn.Module):
  """A pre-norm transformer block: causal self-attention, then an MLP."""

  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + nn.SelfAttention(self.num_heads, qkv_features=self.d_model)(nn.LayerNorm()(x), causal)
    hidden = nn.gelu(nn.Dense(4 * self.d_model)(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d_model)(hidden)


class LanguageModel(nn.Module):
  """Tokens `[batch, seq]` to next-token logits `[batch, seq, vocab]`."""

  config: LanguageModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    config = self.config
    x = nn.Embed(config.vocab_size, config.d_model)(tokens)
    positions = self.param(
      "positions", nn.initializers.normal(0.02), (config.seq_len, config.d_model)
    )
    x = x + positions[: tokens.shape[1]]
    for _ in range(config.num_layers):
      x = Block(config.d_model, config.num_heads)(x)
    return nn.Dense(config.vocab_size)(nn.LayerNorm()(x))


def workload(key: str, title: str, config: LanguageModelConfig, every_k: int) -> Workload:
  """A window of k synthetic micro-batches for `config`, and the model's gradient."""
  model = LanguageModel(config)
  rng = np.random.default_rng(0)
  shape = (every_k, config.micro_batch, config.seq_len)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens[0])["params"]

  def loss(params: Any, batch: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean()

  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  embedding_and_head = 2 * config.vocab_size * config.d_model
  description = (
    f"{num_params / 1e6:.2f}M float32 params ({embedding_and_head / num_params:.0%} in "
    f"embedding and head): vocab {config.vocab_size}, d_model {config.d_model}, "
    f"{config.num_layers} block(s) of {config.num_heads} heads, seq {config.seq_len}, "
    f"micro-batch {config.micro_batch} ({config.micro_batch * config.seq_len} tokens); "
    f"adamw, k={every_k}"
  )
  return Workload(
    key=key,
    title=title,
    description=description,
    params=params,
    micro_batches=[tokens[i] for i in range(every_k)],
    whole_batch=jnp.reshape(tokens, (-1, config.seq_len)),
    grad_fn=jax.value_and_grad(loss),
    with_model=True,
  )
