"""The values behind the float32 bounds of tests/test_batch_norm.py, printed.

docs/flax.md ("What can be equal, and what cannot") quotes them; the tests assert
bounds around them. On the test module's own models and data:

- the 131 072-feature layer (momentum 0, 0.9, 0.999): the largest error of the
  merged, the window's and flax's large-batch running statistics, relative to each
  leaf's largest value, against float64 NumPy;
- the test model's 3 windows: the all-layer relative error of the merged and of
  k chained micro-batch updates' statistics against the large batch's;
- the relative difference of the micro-batch-normalized gradient from the large
  batch's.

Deterministic (XLA's CPU arithmetic, fixed seeds).

Run: python -m tests.checks.batch_norm_bounds
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen

import optaccum
from tests import test_batch_norm as model


def _worst(actual, expected, name: str) -> float:
  a, b = np.asarray(actual[name], np.float64), np.asarray(expected[name], np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def wide_layer(momentum: float) -> str:
  x, old = model.wide_inputs()
  layer = linen.BatchNorm(use_running_average=False, momentum=momentum, use_scale=False)
  layer = layer.clone(use_bias=False)

  def new_stats(x):
    _, updates = layer.apply({"batch_stats": old}, x, mutable=["batch_stats"])
    return updates["batch_stats"]

  stacked = jax.jit(jax.vmap(new_stats))(jnp.reshape(x, (model.EVERY_K, -1, model.WIDE)))
  window = optaccum.flax.BatchStatsWindow.create(old)
  for i in range(model.EVERY_K):
    window = window.add(jax.tree.map(lambda leaf, i=i: leaf[i], stacked))
  closed, _ = window.close(old, momentum=momentum)
  merged = optaccum.flax.merge_batch_stats(stacked, momentum=momentum)
  large = jax.jit(new_stats)(x)
  expected = model.numpy_layer_statistics(x, old, momentum)
  parts = [
    f"{label} mean {_worst(stats, expected, 'mean'):.1e} var {_worst(stats, expected, 'var'):.1e}"
    for label, stats in (("merge", merged), ("window", closed), ("flax large-batch", large))
  ]
  return f"wide layer, momentum {momentum}: " + "; ".join(parts)


def main() -> None:
  for momentum in (0.0, 0.9, 0.999):
    print(wide_layer(momentum))
  for i, window in enumerate(model.window_statistics()):
    merged, chained, large = window["merged"], window["chained"], window["large"]
    print(
      f"window {i + 1}: merged vs large mean {model.relative_error(merged, large, 'mean'):.1e} "
      f"var {model.relative_error(merged, large, 'var'):.1e}; chained vs large mean "
      f"{model.relative_error(chained, large, 'mean'):.2g} "
      f"var {model.relative_error(chained, large, 'var'):.2g}"
    )
  params, start = model.initial_variables()
  xs, ys = model.make_windows()
  _, large_grads = model.large_batch_step(params, xs[0], ys[0], start)
  _, split_grads = model.microbatch_step(params, xs[0], ys[0], batch_stats=start)
  difference = optax.tree.norm(jax.tree.map(jnp.subtract, split_grads, large_grads))
  print(
    "gradient difference, micro-batch-normalized vs large batch: "
    f"{float(difference / optax.tree.norm(large_grads)):.2f} of the large batch's norm"
  )


if __name__ == "__main__":
  main()
