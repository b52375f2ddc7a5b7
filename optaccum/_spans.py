"""Profiler spans: the names every form gives its parts in the compiled program.

Each is a `jax.named_scope`, so it lands in the op_name metadata of the
compiled program: a `jax.profiler` trace of a training step reads as the
window it is (a micro-batch's forward and backward pass, its add into the
window, the window's close with the inner optimizer, and the one cross-replica
reduction).
"""

MICRO_BATCH = "optaccum.micro_batch"
WINDOW_ADD = "optaccum.window_add"
WINDOW_CLOSE = "optaccum.window_close"
REDUCE = "optaccum.reduce"
