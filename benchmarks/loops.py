"""optaccum.microbatch beside the in-step accumulation loops of other JAX trainers.

Each peer's loop is written here from its published description and returns
a gradient function with the signature of `optaccum.microbatch(grad_fn, k)`:
`(params, batch) -> (loss, grads)`, the mean over the batch. t5x's and
MaxText's are built, as theirs are, from the loss function (they scale the
loss before differentiating it), the others from `grad_fn`. Every one feeds
the same AdamW step (`benchmarks.peers._one_step`):

* t5x, `trainer.accumulate_grads_microbatched`: a `lax.fori_loop` over k
  contiguous micro-batches (`dynamic_slice`), summing the gradients into
  float32 zeros; t5x's loss is already divided by the whole batch's
  normalizing factor, so the sum is returned as it is (here: the gradient of
  each micro-batch's mean loss divided by k).
* MaxText, `gradient_accumulation_loss_and_grad`: the batch reshaped to
  `[k, B / k, ...]` (micro-batch i holds rows i, i + k, ...), a `lax.scan`
  whose carry holds the summed gradients, the summed loss, the total weight
  and the parameters; the loss differentiated is a sum over tokens (here:
  each micro-batch's mean loss times its number of examples, its weight), and
  the sums are divided by the total weight at the end, zero where it is zero.
* levanter, `grad_accum.microbatched`: the batch reshaped to `[k, B / k, ...]`,
  a `hax.fold` (a `lax.scan`) adding the function's whole output, loss and
  gradients, into zeros of its shape, then divided by k.
* big_vision, `utils.accumulate_gradient`: the first micro-batch outside the
  loop (its loss and gradients start the sums), a `lax.fori_loop` from 1 to k
  over `dynamic_slice`s, then loss and gradients divided by k.
* `optax.microbatching.microbatch(grad_fn, argnums=1, microbatch_size=B / k,
  accumulator=MEAN)`, as in `benchmarks.peers`.

Sharding annotations, dropout keys, metrics other than the loss and the
parameters' bfloat16 cast (MaxText's ZeRO-1 mode) are left out: the workloads
run on one device without dropout.

For each workload and k, one process compiles every method (the large batch,
`optaccum.microbatch` and the five loops), trains each from the same
parameters (donated) on the same batch, and reports the compiled temporaries
(XLA's memory analysis), the time per step (median of interleaved rounds, as
a ratio to the fastest peer loop), the trace and compile time (median of
interleaved compilations, as a ratio to the large batch's) and the largest
parameter difference from the large batch after the same steps.

Run: python -m benchmarks.loops [--quick] [--rounds N] [--steps S]
[--compile-rounds C] [--workloads mlp,lm,lm-params]. Prints markdown
tables, then everything as one JSON line. `--quick` runs tiny sizes of the
MLP and the LM, k = 2, one round, marked as not being measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from optax import microbatching

import optaccum
from benchmarks import _measure, lm, peers
from benchmarks._methods import GradFn, Method, Workload

LossFn = Callable[[Any, Any], jax.Array]

REFERENCE = "large batch"
OURS = "optaccum.microbatch"
# The methods must train the same thing: the largest parameter difference from
# the large batch after all steps, float32 rounding apart (Adam scales it up).
TOLERANCE = 1e-2
# peers.LM is activation-heavy too (77 MiB of temporaries beside 2 MiB of
# parameters): a large vocabulary and short sequences put most of the memory in
# the embedding and the head, at k = 8 lm.PARAMETER_HEAVY's micro-batch of 2.
LM_PARAMS = dataclasses.replace(lm.PARAMETER_HEAVY, micro_batch=16)
WORKLOADS = ("mlp", "lm", "lm-params")


# --- The peers' loops -------------------------------------------------------------------


def _rows(batch: Any) -> int:
  return int(jax.tree.leaves(batch)[0].shape[0])


def _block(batch: Any, index: jax.Array, size: int) -> Any:
  """Rows `index * size` to `(index + 1) * size` of every leaf: t5x's `get_microbatch`."""
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, index * size, size), batch)


def _float32_zeros(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def t5x(loss_fn: LossFn, k: int) -> GradFn:
  """t5x's `accumulate_grads_microbatched`: a fori_loop summing gradients of pre-scaled losses."""
  # t5x divides the loss by the whole batch's normalizing factor, before the
  # backward pass: a micro-batch's mean loss over k.
  grad_fn = jax.value_and_grad(lambda params, batch: loss_fn(params, batch) / k)

  def split_fn(params: Any, batch: Any) -> tuple[Any, Any]:
    size = _rows(batch) // k

    def body(index: jax.Array, sums: Any) -> Any:
      return jax.tree.map(jnp.add, sums, grad_fn(params, _block(batch, index, size)))

    return jax.lax.fori_loop(0, k, body, (jnp.zeros((), jnp.float32), _float32_zeros(params)))

  return split_fn


def maxtext(loss_fn: LossFn, k: int) -> GradFn:
  """MaxText's gradient accumulation: a scan over `[k, B / k, ...]`, the mean by total weight."""

  def summed_loss(params: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
    # MaxText differentiates the sum of the micro-batch's token losses (here its
    # mean times its rows) and counts the tokens as its weight.
    weight = jnp.float32(_rows(batch))
    return loss_fn(params, batch) * weight, weight

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def split_fn(params: Any, batch: Any) -> tuple[Any, Any]:
    def strided(x: jax.Array) -> jax.Array:
      return jnp.swapaxes(jnp.reshape(x, (x.shape[0] // k, k, *x.shape[1:])), 0, 1)

    def body(carry: dict[str, Any], micro_batch: Any) -> tuple[dict[str, Any], None]:
      (loss, weight), grads = grad_fn(carry["params"], micro_batch)
      return {
        "loss": carry["loss"] + loss,
        "grad": jax.tree.map(jnp.add, carry["grad"], grads),
        "total_weights": carry["total_weights"] + weight,
        "params": carry["params"],
      }, None

    zero = jnp.zeros((), jnp.float32)
    init = {
      "loss": zero,
      "grad": jax.tree.map(jnp.zeros_like, params),
      "total_weights": zero,
      "params": params,
    }
    sums, _ = jax.lax.scan(body, init, jax.tree.map(strided, batch), length=k)
    total = sums["total_weights"]
    has_weights, denominator = total > 0, jnp.maximum(total, 1.0)

    def mean(x: jax.Array) -> jax.Array:
      return jnp.where(has_weights, x / denominator, jnp.zeros_like(x))

    return mean(sums["loss"]), jax.tree.map(mean, sums["grad"])

  return split_fn


def levanter(grad_fn: GradFn, k: int) -> GradFn:
  """levanter's `microbatched`: a fold adding the whole output into zeros, then divided by k."""

  def split_fn(params: Any, batch: Any) -> tuple[Any, Any]:
    shapes = jax.eval_shape(grad_fn, params, batch)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    blocks = jax.tree.map(lambda x: jnp.reshape(x, (k, x.shape[0] // k, *x.shape[1:])), batch)

    def body(acc: Any, micro_batch: Any) -> tuple[Any, None]:
      return jax.tree.map(jnp.add, acc, grad_fn(params, micro_batch)), None

    sums, _ = jax.lax.scan(body, zeros, blocks)
    return jax.tree.map(lambda x: x / k, sums)

  return split_fn


def big_vision(grad_fn: GradFn, k: int) -> GradFn:
  """big_vision's `accumulate_gradient`: the first micro-batch starts the sums, then a fori_loop."""

  def split_fn(params: Any, batch: Any) -> tuple[Any, Any]:
    size = _rows(batch) // k
    first = grad_fn(params, jax.tree.map(lambda x: x[:size], batch))

    def body(index: jax.Array, sums: Any) -> Any:
      return jax.tree.map(jnp.add, sums, grad_fn(params, _block(batch, index, size)))

    sums = jax.lax.fori_loop(1, k, body, first)
    return jax.tree.map(lambda x: x / k, sums)

  return split_fn


def optax_loop(grad_fn: GradFn, k: int, batch: int) -> GradFn:
  """`optax.microbatching.microbatch` of a batch of `batch` rows, as `benchmarks.peers` runs it."""
  return microbatching.microbatch(
    grad_fn, argnums=1, microbatch_size=batch // k, accumulator=peers.MEAN
  )


PEERS = (
  "t5x accumulate_grads_microbatched",
  "MaxText gradient accumulation",
  "levanter microbatched",
  "big_vision accumulate_gradient",
  "optax.microbatching.microbatch",
)


def methods(workload: Workload) -> list[Method]:
  """The large batch, `optaccum.microbatch` and the peers' loops, each in one AdamW step."""
  grad_fn, k = workload.grad_fn, len(workload.micro_batches)
  # t5x and MaxText take the loss and scale it before differentiating; the
  # workloads' grad_fn is `jax.value_and_grad(loss)`, which keeps `loss`.
  loss_fn = inspect.unwrap(grad_fn)
  if loss_fn is grad_fn:
    raise TypeError(
      f"`methods(workload=...)` needs a grad_fn made by jax.value_and_grad, got {grad_fn!r}."
    )
  loops = (
    t5x(loss_fn, k),
    maxtext(loss_fn, k),
    levanter(grad_fn, k),
    big_vision(grad_fn, k),
    optax_loop(grad_fn, k, _rows(workload.whole_batch)),
  )
  inner = peers._make_inner()
  return [
    peers._one_step(REFERENCE, "reference", inner, grad_fn),
    peers._one_step(OURS, "optaccum", inner, optaccum.microbatch(grad_fn, k)),
    *(peers._one_step(name, "peer", inner, loop) for name, loop in zip(PEERS, loops)),
  ]


# --- Measuring --------------------------------------------------------------------------


def _compile(program: Any, args: tuple, options: dict[str, Any] | None) -> tuple[Any, float]:
  """The program traced and compiled afresh, and the seconds that took."""
  start = time.perf_counter()
  # A new function object: jax.jit would otherwise reuse the earlier trace.
  # optax's adamw fails strict dtype promotion (tests turn it on): the default.
  with jax.numpy_dtype_promotion("standard"):
    lowered = jax.jit(functools.partial(program), donate_argnums=(0, 1)).lower(*args)
  compiled = lowered.compile(options) if options else lowered.compile()
  return compiled, time.perf_counter() - start


def _recording(samples: dict[str, list[float]], name: str, run: Callable[[], float]) -> Any:
  def recorded() -> float:
    seconds = run()
    samples[name].append(seconds)
    return seconds

  return recorded


def measure(
  workload: Workload,
  rounds: int,
  steps: int,
  compile_rounds: int,
  options: dict[str, Any] | None,
) -> list[dict[str, Any]]:
  """Compiles and times every method, interleaved, and compares its parameters.

  Every method trains its own copy of the parameters (donated) on the whole
  batch: a warm-up window, then one window per round, each of `steps` steps;
  the time per step is the median over rounds of a window's time over
  `steps`. Compilations (trace + compile) run in interleaved rounds too.
  """
  table = methods(workload)
  batch = workload.whole_batch
  live: dict[str, list[Any]] = {}
  for method in table:
    params = jax.tree.map(jnp.copy, workload.params)
    live[method.name] = [params, jax.jit(method.init)(params)]
  executables: dict[str, Any] = {}

  def compile_method(method: Method) -> float:
    (program,) = method.programs.values()
    executables[method.name], seconds = _compile(program, (*live[method.name], batch), options)
    return seconds

  compile_samples: dict[str, list[float]] = {m.name: [] for m in table}
  compile_s = _measure.interleaved_medians(
    {
      m.name: _recording(compile_samples, m.name, functools.partial(compile_method, m))
      for m in table
    },
    compile_rounds,
  )

  def window(method: Method) -> float:
    holder, run = live[method.name], executables[method.name]

    def train() -> Any:
      for _ in range(steps):
        holder[0], holder[1] = run(holder[0], holder[1], batch)
      return holder

    return _measure.timed(train) / steps

  for method in table:
    window(method)
  step_samples: dict[str, list[float]] = {m.name: [] for m in table}
  seconds = _measure.interleaved_medians(
    {m.name: _recording(step_samples, m.name, functools.partial(window, m)) for m in table},
    rounds,
  )
  reference = live[REFERENCE][0]
  rows = []
  for method in table:
    difference = peers._largest_difference(live[method.name][0], reference)
    if not difference["max_param_difference"] < TOLERANCE:
      raise RuntimeError(
        f"{method.name} trained something else than the large batch on {workload.key}, k="
        f"{len(workload.micro_batches)}: largest parameter difference {difference}, "
        f"tolerance {TOLERANCE}."
      )
    rows.append(
      {
        "method": method.name,
        "family": method.family,
        "temp_bytes": _measure.memory_of(executables[method.name])["temp"],
        "seconds": seconds[method.name],
        "seconds_per_round": step_samples[method.name],
        "compile_s": compile_s[method.name],
        "compile_s_per_round": compile_samples[method.name],
        **difference,
        "steps": (rounds + 1) * steps,
      }
    )
  return rows


# --- Reading the rows -------------------------------------------------------------------


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """`optaccum.microbatch` against the peers' loops at one k.

  Time: the per-round ratio of its step time to the fastest peer's (by
  median) in the same round; "ahead" where every round is below 1, "behind"
  where every round is above, else "parity".
  """
  by_name = {row["method"]: row for row in rows}
  ours, reference = by_name[OURS], by_name[REFERENCE]
  loops = [by_name[name] for name in PEERS]
  fastest = min(loops, key=lambda row: row["seconds"])
  leanest = min(loops, key=lambda row: row["temp_bytes"])
  per_round = [a / b for a, b in zip(ours["seconds_per_round"], fastest["seconds_per_round"])]
  if max(per_round) < 1:
    time_verdict = "ahead"
  elif min(per_round) > 1:
    time_verdict = "behind"
  else:
    time_verdict = "parity"
  return {
    "fastest_peer": fastest["method"],
    "time_vs_fastest_peer": ours["seconds"] / fastest["seconds"],
    "time_vs_fastest_peer_per_round": per_round,
    "time": time_verdict,
    "leanest_peer": leanest["method"],
    "temp_vs_leanest_peer": ours["temp_bytes"] / leanest["temp_bytes"],
    "temp_bytes_over_leanest_peer": ours["temp_bytes"] - leanest["temp_bytes"],
    "leanest": ours["temp_bytes"] <= leanest["temp_bytes"],
    "compile_vs_large_batch": ours["compile_s"] / reference["compile_s"],
  }


def table(rows_by_k: dict[int, list[dict[str, Any]]]) -> str:
  """One row per (k, method), then one verdict line per k."""
  lines = [
    "| k | method | temporaries (MiB) | temp vs leanest peer | ms / step | time vs fastest peer "
    "| trace + compile (s) | compile vs large batch | max abs param difference |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for k, rows in rows_by_k.items():
    by_name = {row["method"]: row for row in rows}
    leanest = min(by_name[name]["temp_bytes"] for name in PEERS)
    fastest = min(by_name[name]["seconds"] for name in PEERS)
    reference = by_name[REFERENCE]
    for row in rows:
      lines.append(
        f"| {k} | {row['method']} | {row['temp_bytes'] / 2**20:.2f} | "
        f"{row['temp_bytes'] / leanest:.2f}x | {row['seconds'] * 1e3:.1f} | "
        f"{row['seconds'] / fastest:.2f}x | {row['compile_s']:.2f} | "
        f"{row['compile_s'] / reference['compile_s']:.2f}x | {row['max_param_difference']:.1e} |"
      )
  lines.append("")
  for k, rows in rows_by_k.items():
    found = verdict(rows)
    spread = found["time_vs_fastest_peer_per_round"]
    lines.append(
      f"- k={k}: temporaries {found['temp_bytes_over_leanest_peer']:+d} bytes "
      f"({found['temp_vs_leanest_peer']:.3f}x) against the leanest peer's "
      f"({found['leanest_peer']}): {'leanest' if found['leanest'] else '**not leanest**'}; "
      f"time {found['time_vs_fastest_peer']:.3f}x the fastest peer's ({found['fastest_peer']}), "
      f"per round {min(spread):.2f}-{max(spread):.2f}x (median "
      f"{statistics.median(spread):.2f}x): {found['time']}; trace + compile "
      f"{found['compile_vs_large_batch']:.2f}x the large batch's."
    )
  return "\n".join(lines)


# --- Command line -----------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.loops", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--quick", action="store_true", help="tiny sizes, k=2, one round (tests)")
  parser.add_argument("--rounds", type=int, help="timed rounds (default: 1 quick, 7 full)")
  parser.add_argument("--steps", type=int, help="steps per timed window (default: 1 quick, 5 full)")
  parser.add_argument(
    "--compile-rounds", type=int, help="compilations per method (default: 1 quick, 3 full)"
  )
  parser.add_argument(
    "--workloads",
    help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all; quick: mlp, lm)",
  )
  args = parser.parse_args(argv)
  if args.workloads is not None:
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for key in args.workloads:
      if key not in WORKLOADS or (args.quick and key == "lm-params"):
        choices = "mlp, lm" if args.quick else ", ".join(WORKLOADS)
        parser.error(f"--workloads: unknown workload {key!r}; choose from {choices}")
  for flag in ("rounds", "steps", "compile_rounds"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
  return args


def _lm_params(k: int) -> Workload:
  workload = peers.lm_workload(LM_PARAMS, k)
  return dataclasses.replace(workload, key="lm-params", title="(c) Transformer LM, parameter-heavy")


def _workloads(quick: bool, keys: list[str] | None) -> list[Callable[[int], Workload]]:
  """peers' MLP and LM, and a parameter-heavy LM in a full run only (its compiles are slow)."""
  makers: dict[str, Callable[[int], Workload]]
  if quick:
    makers = {
      "mlp": functools.partial(peers.mlp_workload, peers.QUICK_MLP),
      "lm": functools.partial(peers.lm_workload, peers.QUICK_LM),
    }
  else:
    makers = {
      "mlp": functools.partial(peers.mlp_workload, peers.MLP),
      "lm": functools.partial(peers.lm_workload, peers.LM),
      "lm-params": _lm_params,
    }
  return [makers[key] for key in (keys or makers)]


def run(
  quick: bool,
  rounds: int,
  steps: int,
  compile_rounds: int,
  keys: list[str] | None = None,
  command: str = "python -m benchmarks.loops",
) -> tuple[str, dict[str, Any]]:
  """Measures every workload at every k: the markdown tables, and what they hold."""
  ks = peers.QUICK_KS if quick else peers.KS
  options = {"xla_backend_optimization_level": 0} if quick else None
  load_before = _measure.load_average()
  report: dict[str, Any] = {
    "command": command,
    "quick": quick,
    "rounds": rounds,
    "steps": steps,
    "compile_rounds": compile_rounds,
    "machine": _measure.machine_description(),
    "workloads": {},
  }
  parts = []
  for make in _workloads(quick, keys):
    rows_by_k = {}
    for k in ks:
      workload = make(k)
      rows_by_k[k] = measure(workload, rounds, steps, compile_rounds, options)
    part = f"### {workload.title}\n\n{workload.description}\n\n{table(rows_by_k)}\n"
    print(part, flush=True)
    parts.append(part)
    report["workloads"][workload.key] = {
      "title": workload.title,
      "description": workload.description,
      "rows": {str(k): rows for k, rows in rows_by_k.items()},
      "verdicts": {str(k): verdict(rows) for k, rows in rows_by_k.items()},
    }
  report["load"] = [load_before, _measure.load_average()]
  return "\n".join(parts), report


SECTION_TITLE = (
  "## In-step loops: optaccum.microbatch beside t5x, MaxText, levanter, big_vision and optax"
)


def section(markdown: str, report: dict[str, Any]) -> str:
  """`run`'s tables as a RESULTS.md section: what was run, then the tables."""
  return (
    f"{SECTION_TITLE}\n\n`{report['command']}` (benchmarks/loops.py: each peer's loop written "
    f"from its published description); {report['rounds']} timed rounds of {report['steps']} "
    f"steps, {report['compile_rounds']} compilations per method, interleaved, medians; "
    f"load before {report['load'][0]}, after {report['load'][1]}.\n\n{markdown}"
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures, prints markdown and one JSON line; returns what the JSON holds."""
  args = _parse(argv)
  rounds = args.rounds or (1 if args.quick else 7)
  steps = args.steps or (1 if args.quick else 5)
  compile_rounds = args.compile_rounds or (1 if args.quick else 3)
  command = " ".join(["python -m benchmarks.loops", *(sys.argv[1:] if argv is None else argv)])
  started = time.perf_counter()
  if args.quick:
    print("QUICK RUN: tiny sizes, not a measurement.\n")
  print(f"`{command}`; {_measure.machine_description()}; load before: {_measure.load_average()}\n")
  _, report = run(args.quick, rounds, steps, compile_rounds, args.workloads, command)
  print(f"load after: {report['load'][1]}; {time.perf_counter() - started:.0f} s")
  print(json.dumps(report, default=str))
  return report


if __name__ == "__main__":
  main()
