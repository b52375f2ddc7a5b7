"""The GPU check: every form of accumulation on a decoder LM as large as the device holds.

Run (one GPU, under 5 minutes; `--quick` runs a tiny model on CPU in seconds):

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.gpu [--quick] [--out DIR]

Without preallocation the allocator's `peak_bytes_in_use` counts what the
programs use rather than the 75% of memory JAX reserves up front.

One process trains, side by side, one batch of B sequences per optimizer step
(AdamW) in every form:

* unsplit: one step on the whole batch (the reference);
* in one step, k micro-batches: `optaccum.microbatch` and
  `optax.microbatching.microbatch`, then AdamW;
* across k steps, k jitted calls per window: `optaccum.apply_gradients`,
  `optaccum.accumulate` (+ `optax.apply_updates`) and `optax.MultiSteps`.

The forms run in three groups, each with the unsplit step again as its
reference: k micro-batches with float32 accumulators, k micro-batches with
bfloat16 accumulators (`accumulator=jnp.bfloat16` in one step,
`optaccum.stochastic_bfloat16` across steps), and k = 1 (the machinery's own
cost against the plain step). A group keeps every member's parameters and state
on the device at once, so the model is sized for the largest group. Within a
group, rounds are interleaved (each round runs one window of every form in a
rotating order) and each form's time is the median over rounds, per example.

Memory per form: XLA's compiled memory analysis (temporaries, arguments,
outputs) and, where the device reports it, the allocator's process-wide
`peak_bytes_in_use` after the form's first window, the forms of a group taking
their first window in increasing order of compiled temporaries (the counter
never goes down, so each reading covers the forms before it). Every form trains
its own copy of the parameters on the same data and the table gives the largest
parameter difference from its group's unsplit step after the same windows.

The model's size comes from the device's memory (`memory_stats()["bytes_limit"]`):
the largest of a ladder of sizes whose state and activations fit, checked
against the compiled programs before anything is allocated. Without memory
statistics (CPU) a fixed small size is used. Writes `OUT/RESULTS-gpu.md` (default
OUT: a temporary directory) and prints it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import microbatching

import optaccum
from benchmarks import _measure

COMMAND = "XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.gpu"
LEARNING_RATE = 1e-3
UNSPLIT = "unsplit (large batch)"
FORMS = (
  "optaccum.microbatch",
  "optax.microbatching.microbatch",
  "optaccum.apply_gradients",
  "optaccum.accumulate",
  "optax.MultiSteps",
)
# The share of the device's memory the model is sized for (estimated, then
# checked against the compiled programs), leaving room for XLA's own buffers.
ESTIMATE_SHARE, COMPILED_SHARE = 0.6, 0.85
_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Config:
  """The decoder LM's sizes and one optimizer step's batch of sequences, split k ways."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  seq_len: int
  batch: int
  k: int

  @property
  def num_params(self) -> int:
    d = self.d_model
    per_layer = 2 * d + 3 * d * d + d * d + 8 * d * d
    return (2 * self.vocab_size + self.seq_len + 1) * d + self.num_layers * per_layer


QUICK = Config(vocab_size=128, d_model=32, num_layers=1, num_heads=2, seq_len=16, batch=8, k=4)
CPU = Config(vocab_size=512, d_model=64, num_layers=2, num_heads=4, seq_len=64, batch=16, k=8)


def ladder(k: int) -> list[Config]:
  """Candidate GPU sizes, largest first: width d, d / 64 layers, 128-wide heads."""
  sizes = []
  for d_model in (2560, 2048, 1792, 1536, 1280, 1024, 768, 512, 256):
    for batch in (64, 32, 16):
      layers, heads = d_model // 64, max(d_model // 128, 1)
      sizes.append(Config(32768, d_model, layers, heads, 512, batch, k))
  return sizes


# --- The model --------------------------------------------------------------------------------


def init_params(config: Config, dtype: Any, seed: int = 0) -> dict[str, Any]:
  """A pre-norm decoder: embeddings, `num_layers` stacked blocks (scanned), an untied head."""
  d, layers = config.d_model, config.num_layers
  keys = iter(jax.random.split(jax.random.key(seed), 7))

  def normal(shape: tuple[int, ...], scale: float) -> jax.Array:
    return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(dtype)

  return {
    "embed": normal((config.vocab_size, d), 0.02),
    "positions": normal((config.seq_len, d), 0.02),
    "layers": {
      "attention_norm": jnp.ones((layers, d), dtype),
      "qkv": normal((layers, d, 3 * d), d**-0.5),
      "out": normal((layers, d, d), (2 * layers * d) ** -0.5),
      "mlp_norm": jnp.ones((layers, d), dtype),
      "up": normal((layers, d, 4 * d), d**-0.5),
      "down": normal((layers, 4 * d, d), (8 * layers * d) ** -0.5),
    },
    "final_norm": jnp.ones((d,), dtype),
    "head": normal((d, config.vocab_size), d**-0.5),
  }


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  wide = x.astype(jnp.float32)
  normed = wide * jax.lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + 1e-6)
  return normed.astype(x.dtype) * scale


def _block(num_heads: int, x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
  batch, seq, d = x.shape
  qkv = _rms_norm(x, layer["attention_norm"]) @ layer["qkv"]
  q, k, v = jnp.split(qkv.reshape(batch, seq, 3 * num_heads, d // num_heads), 3, axis=2)
  attended = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(batch, seq, d)
  x = x + attended @ layer["out"]
  hidden = jax.nn.gelu(_rms_norm(x, layer["mlp_norm"]) @ layer["up"])
  return x + hidden @ layer["down"]


def make_loss(config: Config) -> Callable[[Any, jax.Array], jax.Array]:
  """`loss(params, tokens[batch, seq])`: the mean next-token cross-entropy."""

  def loss(params: Any, tokens: jax.Array) -> jax.Array:
    x = params["embed"][tokens] + params["positions"][: tokens.shape[1]]
    x, _ = jax.lax.scan(
      lambda x, layer: (_block(config.num_heads, x, layer), None), x, params["layers"]
    )
    logits = (_rms_norm(x, params["final_norm"]) @ params["head"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  return loss


def make_tokens(config: Config) -> jax.Array:
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, config.vocab_size, (config.batch, config.seq_len)), jnp.int32)


# --- The forms --------------------------------------------------------------------------------

Step = Callable[[Any, Any, jax.Array], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Form:
  """One way to train on the batch: an init, one jitted step, and its calls per window.

  Attributes:
    name: the form (`UNSPLIT` or one of `FORMS`).
    k: micro-batches per optimizer step.
    accumulator: what the micro-batches are summed in, in words.
    group: the group it is measured in.
    init: `params -> state`.
    step: `(params, state, batch) -> (params, state)`.
    calls: the batch of each call of one window: None for the whole batch, i for
      micro-batch i.
  """

  name: str
  k: int
  accumulator: str
  group: str
  init: Callable[[Any], Any]
  step: Step
  calls: tuple[int | None, ...]

  @property
  def key(self) -> str:
    return f"{self.name} | k={self.k} | {self.accumulator}"


def _optimizer_step(inner: optax.GradientTransformation, grad_fn: Any) -> Step:
  def step(params: Any, state: Any, batch: jax.Array) -> tuple[Any, Any]:
    _, grads = grad_fn(params, batch)
    updates, state = inner.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _optax_mean(dtype: Any, k: int) -> microbatching.Accumulator:
  """Optax's MEAN, summing in `dtype` (its own sums in the gradient's dtype)."""

  def init(shapes: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, dtype), shapes)

  def update(carry: Any, value: Any, _: Any) -> Any:
    return jax.tree.map(lambda c, v: c + v.astype(dtype), carry, value)

  def finalize(carry: Any) -> Any:
    return jax.tree.map(lambda c: c / jnp.asarray(k, dtype), carry)

  def aggregate(values: Any) -> Any:
    return jax.tree.map(lambda v: jnp.mean(v, axis=0), values)

  return microbatching.Accumulator(init, update, finalize, aggregate)


def _cast_back(fn: Any, dtype: Any) -> Any:
  """`fn`'s gradients cast to the parameters' dtype (as optaccum.microbatch returns them)."""

  def wrapped(params: Any, batch: jax.Array) -> tuple[Any, Any]:
    loss, grads = fn(params, batch)
    return loss.astype(jnp.float32), jax.tree.map(lambda g: g.astype(dtype), grads)

  return wrapped


def forms_of_group(group: str, k: int, batch: int, grad_fn: Any, param_dtype: Any) -> list[Form]:
  """The unsplit step, then the five forms, at `k` micro-batches with accumulators of `group`.

  Args:
    group: "float32", "bfloat16" (k micro-batches, accumulators of that dtype) or
      "k=1" (float32 accumulators, one micro-batch).
    k: micro-batches per optimizer step for the first two groups.
    batch: sequences per optimizer step.
    grad_fn: `(params, tokens) -> (loss, grads)`.
    param_dtype: the parameters' dtype (what optax.MultiSteps sums in).

  Returns:
    The group's forms, unsplit first.
  """
  inner = optax.adamw(LEARNING_RATE)
  k = 1 if group == "k=1" else k
  dtype = jnp.bfloat16 if group == "bfloat16" else jnp.float32
  in_step = "bfloat16" if group == "bfloat16" else "float32"
  across = "bfloat16, stochastic rounding" if group == "bfloat16" else "float32"
  accumulator = optaccum.stochastic_bfloat16(0) if group == "bfloat16" else jnp.float32
  tx = optaccum.accumulate(inner, k, accumulator=accumulator)
  whole: tuple[int | None, ...] = (None,)
  micro = tuple(range(k)) if k > 1 else whole
  optax_split = microbatching.microbatch(
    grad_fn, argnums=1, microbatch_size=batch // k, accumulator=_optax_mean(dtype, k)
  )

  def apply_gradients(params: Any, state: Any, batch: jax.Array) -> tuple[Any, Any]:
    _, grads = grad_fn(params, batch)
    return optaccum.apply_gradients(tx, grads, state, params)

  forms = [
    Form(UNSPLIT, 1, "–", group, inner.init, _optimizer_step(inner, grad_fn), whole),
    Form(
      FORMS[0],
      k,
      in_step,
      group,
      inner.init,
      _optimizer_step(inner, optaccum.microbatch(grad_fn, k, accumulator=dtype)),
      whole,
    ),
    Form(
      FORMS[1],
      k,
      in_step,
      group,
      inner.init,
      _optimizer_step(inner, _cast_back(optax_split, param_dtype)),
      whole,
    ),
    Form(FORMS[2], k, across, group, tx.init, apply_gradients, micro),
    Form(FORMS[3], k, across, group, tx.init, _optimizer_step(tx, grad_fn), micro),
  ]
  if group != "bfloat16":  # MultiSteps sums in the parameters' dtype, with no option.
    multi_steps = optax.MultiSteps(inner, k).gradient_transformation()
    label = f"{jnp.dtype(param_dtype).name} (the parameters')"
    forms.append(
      Form(
        FORMS[4], k, label, group, multi_steps.init, _optimizer_step(multi_steps, grad_fn), micro
      )
    )
  return forms


GROUPS = ("float32", "bfloat16", "k=1")


def all_forms(config: Config, param_dtype: Any) -> list[Form]:
  grad_fn = jax.value_and_grad(make_loss(config))
  return [
    form
    for group in GROUPS
    for form in forms_of_group(group, config.k, config.batch, grad_fn, param_dtype)
  ]


# --- Sizing -----------------------------------------------------------------------------------


def memory_limit(device: Any) -> int | None:
  """The device's usable bytes, where it reports memory statistics (GPUs do, CPUs do not)."""
  stats = device.memory_stats()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _tree_bytes(tree: Any) -> int:
  return sum(
    math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
  )


def live_bytes(forms: list[Form], abstract_params: Any) -> dict[str, int]:
  """Per group, the bytes of every member's parameters and state (from `jax.eval_shape`)."""
  param_bytes = _tree_bytes(abstract_params)
  totals = dict.fromkeys(GROUPS, 0)
  for form in forms:
    totals[form.group] += param_bytes + _tree_bytes(jax.eval_shape(form.init, abstract_params))
  return totals


def estimated_bytes(config: Config, param_dtype: Any) -> int:
  """The largest group's state plus the unsplit step's gradients and activations, estimated.

  Activations kept for the backward pass, per token and layer: about 16 d
  values (norms, q/k/v, attention output, MLP in and out) and 2 per head and
  key position (attention logits and probabilities); the head's logits, their
  softmax and its gradient in float32; all times 1.5 for what the estimate
  misses. Checked afterwards against the compiled programs.
  """
  abstract = jax.eval_shape(lambda: init_params(config, param_dtype))
  live = max(live_bytes(all_forms(config, param_dtype), abstract).values())
  itemsize = jnp.dtype(param_dtype).itemsize
  tokens = config.batch * config.seq_len
  per_token = config.num_layers * (16 * config.d_model + 2 * config.num_heads * config.seq_len)
  activations = tokens * (per_token * itemsize + 3 * config.vocab_size * 4)
  return live + 3 * _tree_bytes(abstract) + int(1.5 * activations)


def choose_config(limit: int | None, k: int, param_dtype: Any, quick: bool) -> Config:
  """QUICK with `quick`, CPU without memory statistics, else the largest ladder size that fits."""
  if quick:
    return dataclasses.replace(QUICK, k=min(k, QUICK.batch))
  if limit is None:
    return dataclasses.replace(CPU, k=min(k, CPU.batch))
  for config in ladder(k):
    if estimated_bytes(config, param_dtype) <= ESTIMATE_SHARE * limit:
      return config
  return ladder(k)[-1]


# --- Measuring --------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  """What one form measured."""

  name: str
  k: int
  accumulator: str
  group: str
  calls: int
  seconds_per_example: float
  memory: dict[str, int]
  peak_bytes_in_use: int | None
  max_param_difference: float


def compile_all(
  forms: list[Form], abstract_params: Any, tokens: jax.Array, k: int, options: Any
) -> dict[str, Any]:
  """Lowers every form's step from shapes alone, then compiles them on a thread pool."""
  micro_tokens = jax.ShapeDtypeStruct((tokens.shape[0] // k, *tokens.shape[1:]), tokens.dtype)
  whole_tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
  lowered = {}
  for form in forms:
    if form.key in lowered:
      continue
    state = jax.eval_shape(form.init, abstract_params)
    batch = whole_tokens if form.calls[0] is None else micro_tokens
    lowered[form.key] = jax.jit(form.step, donate_argnums=(0, 1)).lower(
      abstract_params, state, batch
    )
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    futures = {key: pool.submit(low.compile, options) for key, low in lowered.items()}
    return {key: future.result() for key, future in futures.items()}


def fits(
  forms: list[Form], executables: dict[str, Any], abstract_params: Any, limit: int | None
) -> bool:
  """Whether every group's arguments and largest temporaries, and the initial parameters, fit."""
  if limit is None:
    return True
  for group in GROUPS:
    members = [_measure.memory_of(executables[f.key]) for f in forms if f.group == group]
    need = sum(m["argument"] for m in members) + max(m["temp"] for m in members)
    need += _tree_bytes(abstract_params)
    if need > COMPILED_SHARE * limit:
      return False
  return True


def _largest_difference(params: Any, reference: Any) -> float:
  return max(
    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference))
  )


@jax.jit
def _copy(tree: Any) -> Any:
  """A copy of every leaf (each form trains, and donates, its own)."""
  return jax.tree.map(jnp.copy, tree)


def _allocator(device: Any, statistic: str) -> int | None:
  """`device.memory_stats()[statistic]`, or None where the device keeps no statistics."""
  stats = device.memory_stats()
  return int(stats[statistic]) if stats and statistic in stats else None


@dataclasses.dataclass
class GroupResult:
  """One group's rows, each form's final parameters (host), windows trained, bytes in use."""

  rows: list[Row]
  final_params: dict[str, Any]
  windows: int
  bytes_in_use_before: int | None


def measure_group(
  forms: list[Form],
  executables: dict[str, Any],
  params: Any,
  tokens: jax.Array,
  k: int,
  rounds: int | None,
  seconds: float,
  options: dict[str, Any] | None,
) -> GroupResult:
  """Trains every form of one group on the same windows, interleaved, and times them.

  Args:
    forms: the group, unsplit first.
    executables: compiled steps by `Form.key`.
    params: initial parameters (copied for each form).
    tokens: the batch.
    k: micro-batches of the group's across-steps forms.
    rounds: timed rounds, or None to fit as many as `seconds` allows (3 to 15).
    seconds: the time this group may take, for `rounds=None`.
    options: XLA options for compiling the states' inits.

  Returns:
    One row per form, each form's final parameters, the number of windows every
    form trained, and the allocator's bytes in use (the group's parameters and
    states) before the first window.
  """
  device = jax.devices()[0]
  micro = [tokens[i * (tokens.shape[0] // k) : (i + 1) * (tokens.shape[0] // k)] for i in range(k)]
  live, inits = {}, {}
  for form in forms:
    copy = _copy(params)
    if form.init not in inits:  # forms of one optimizer share its init
      lowered = jax.jit(form.init).lower(copy)
      inits[form.init] = lowered.compile(options) if options else lowered.compile()
    live[form.key] = [copy, inits[form.init](copy)]

  def window(form: Form) -> float:
    holder, run = live[form.key], executables[form.key]

    def train() -> Any:
      for index in form.calls:
        holder[0], holder[1] = run(holder[0], holder[1], tokens if index is None else micro[index])
      return holder

    return _measure.timed(train)

  peaks, in_use = {}, _allocator(device, "bytes_in_use")
  started = time.perf_counter()
  by_temp = sorted(forms, key=lambda f: _measure.memory_of(executables[f.key])["temp"])
  for form in by_temp:
    window(form)
    peaks[form.key] = _allocator(device, "peak_bytes_in_use")
  if rounds is None:
    per_round = time.perf_counter() - started
    rounds = int(min(max(seconds / max(per_round, 1e-9), 3), 15))
  medians = _measure.interleaved_medians(
    {f.key: functools.partial(window, f) for f in forms}, rounds
  )
  final = {key: jax.device_get(holder[0]) for key, holder in live.items()}
  reference = final[forms[0].key]
  rows = [
    Row(
      name=form.name,
      k=form.k,
      accumulator=form.accumulator,
      group=form.group,
      calls=len(form.calls),
      seconds_per_example=medians[form.key] / tokens.shape[0],
      memory=_measure.memory_of(executables[form.key]),
      peak_bytes_in_use=peaks[form.key],
      max_param_difference=_largest_difference(final[form.key], reference),
    )
    for form in forms
  ]
  return GroupResult(rows, final, rounds + 1, in_use)


# --- Report -----------------------------------------------------------------------------------

HEADER = (
  "| form | k | accumulator | calls / window | time / example (ms) | vs unsplit "
  "| compiled temp (MiB) | arguments (MiB) | outputs (MiB) | peak in use (MiB) "
  "| max abs param difference vs unsplit |"
)


def group_title(group: str, k: int) -> str:
  if group == "k=1":
    return "k = 1: the machinery's cost against the plain step"
  return f"k = {k}, {group} accumulators"


def table(rows: list[Row]) -> str:
  """One group's rows as markdown, its unsplit step first."""
  unsplit = rows[0].seconds_per_example
  lines = [HEADER, "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    peak = "n/a" if row.peak_bytes_in_use is None else f"{row.peak_bytes_in_use / _MIB:.1f}"
    lines.append(
      f"| {row.name} | {row.k} | {row.accumulator} | {row.calls} | "
      f"{row.seconds_per_example * 1e3:.4g} | {row.seconds_per_example / unsplit:.2f}x | "
      f"{row.memory['temp'] / _MIB:.2f} | {row.memory['argument'] / _MIB:.2f} | "
      f"{row.memory['output'] / _MIB:.2f} | {peak} | {row.max_param_difference:.1e} |"
    )
  return "\n".join(lines)


@dataclasses.dataclass
class Report:
  """What one run measured, and what the test needs to check its training."""

  markdown: str
  config: Config
  param_dtype: str
  rows: list[Row]
  windows: dict[str, int]
  initial_params: Any
  tokens: np.ndarray
  final_params: dict[str, Any]
  path: Path


def quick_compiler_options(device: Any) -> dict[str, Any]:
  """XLA's lowest optimization level; on CPU, also its older, faster-compiling fusion codegen.

  Sixteen programs compile in a quick run: on a loaded 2-core machine this
  takes them from about 45 s to about 15 s.
  """
  options: dict[str, Any] = {"xla_backend_optimization_level": 0}
  if device.platform == "cpu" and _cpu_has_fusion_emitters_option():
    options["xla_cpu_use_fusion_emitters"] = False
  return options


@functools.cache
def _cpu_has_fusion_emitters_option() -> bool:
  """Whether XLA:CPU takes `xla_cpu_use_fusion_emitters`: jax 0.12's refuses it
  ("No such compile option"), having no older codegen to fall back to."""
  try:
    jax.jit(lambda x: x).lower(0.0).compile({"xla_cpu_use_fusion_emitters": False})
  except jax.errors.JaxRuntimeError:
    return False
  return True


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--quick", action="store_true", help="a tiny model, 2 rounds (CPU, seconds)")
  parser.add_argument("--out", type=Path, help="directory for RESULTS-gpu.md (default: a temp dir)")
  parser.add_argument(
    "--k", type=int, default=8, help="micro-batches per step (default 8; quick 4)"
  )
  parser.add_argument("--rounds", type=int, help="timed rounds per group (default: 2 quick, fit)")
  parser.add_argument(
    "--param-dtype", choices=("float32", "bfloat16"), default="float32", help="default float32"
  )
  parser.add_argument(
    "--budget-s", type=float, default=240.0, help="seconds for the whole run (default 240)"
  )
  args = parser.parse_args(argv)
  if args.k < 1:
    parser.error(f"--k must be at least 1, got {args.k}")
  if args.rounds is not None and args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  return args


def _compile_fitting(
  args: argparse.Namespace, limit: int | None, param_dtype: Any, options: Any
) -> tuple[Config, list[Form], dict[str, Any]]:
  """The chosen size and its compiled forms, stepping down the ladder until they fit."""
  k = min(args.k, 4) if args.quick else args.k
  chosen = choose_config(limit, k, param_dtype, args.quick)
  sizes = ladder(k)
  candidates = sizes[sizes.index(chosen) :] if chosen in sizes else [chosen]
  for config in candidates:
    abstract = jax.eval_shape(lambda c=config: init_params(c, param_dtype))
    forms = all_forms(config, param_dtype)
    executables = compile_all(forms, abstract, make_tokens(config), config.k, options)
    if fits(forms, executables, abstract, limit):
      break
    print(f"{config}: the compiled programs do not fit in memory; trying the next size")
  return config, forms, executables


def header(
  command: str,
  config: Config,
  param_dtype: Any,
  limit: int | None,
  windows: dict[str, int],
  seconds: tuple[float, float],
  quick: bool,
) -> str:
  """The section's title, command, device, model and how the table was measured."""
  device = jax.devices()[0]
  memory = "n/a (no memory statistics)" if limit is None else f"{limit / 2**30:.1f} GiB usable"
  rounds = ", ".join(f"{group} {count - 1}" for group, count in windows.items())
  preallocate = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "unset")
  return (
    "## GPU check\n\n"
    + ("**QUICK RUN: a tiny model, not a measurement.**\n\n" if quick else "")
    + f"`{command}`\n\n"
    f"- device: {device.device_kind} ({device.platform}), {len(jax.devices())} device(s), "
    f"memory {memory}, XLA_PYTHON_CLIENT_PREALLOCATE={preallocate}; "
    f"jax {jax.__version__}, optax {optax.__version__}, "
    f"optaccum {optaccum.__version__}; load after: {_measure.load_average()}\n"
    f"- model: decoder LM, {config.num_params / 1e6:.2f}M {jnp.dtype(param_dtype).name} params "
    f"(vocab {config.vocab_size}, d_model {config.d_model}, {config.num_layers} layer(s) of "
    f"{config.num_heads} heads, seq {config.seq_len}); batch {config.batch} sequences "
    f"({config.batch * config.seq_len} tokens) per AdamW({LEARNING_RATE}) step, k = {config.k} "
    f"(micro-batch {config.batch // config.k})\n"
    f"- rounds per group: {rounds} (interleaved, medians, after one warm-up window); "
    f"compile {seconds[0]:.0f} s, total {seconds[1]:.0f} s\n"
    "- time / example: the median window over the batch; memory: XLA's compiled memory "
    "analysis; peak in use: the allocator's process-wide peak after the form's first "
    "window, the forms taking it in increasing order of temporaries; param difference: "
    "after the same windows on the same data. optax.MultiSteps sums in the parameters' "
    "dtype (it has no accumulator option), so it has no bfloat16 row of its own.\n"
  )


def main(argv: list[str] | None = None) -> Report:
  """Sizes the model, compiles, measures every group, writes and prints the table."""
  started = time.perf_counter()
  args = _parse(argv)
  command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
  param_dtype = jnp.dtype(args.param_dtype)
  limit = memory_limit(jax.devices()[0])
  options = quick_compiler_options(jax.devices()[0]) if args.quick else None
  config, forms, executables = _compile_fitting(args, limit, param_dtype, options)
  compiled_s = time.perf_counter() - started
  params = jax.jit(lambda: init_params(config, param_dtype))()
  tokens = make_tokens(config)
  rows: list[Row] = []
  final: dict[str, Any] = {}
  windows: dict[str, int] = {}
  sections: list[str] = []
  for index, group in enumerate(GROUPS):
    members = [f for f in forms if f.group == group]
    remaining = args.budget_s - (time.perf_counter() - started)
    result = measure_group(
      members,
      executables,
      params,
      tokens,
      members[-1].k,
      args.rounds or (2 if args.quick else None),
      remaining / (len(GROUPS) - index),
      options,
    )
    rows += result.rows
    final |= result.final_params
    windows[group] = result.windows
    in_use = result.bytes_in_use_before
    before = (
      "" if in_use is None else f"In use before the first window: {in_use / _MIB:.1f} MiB.\n\n"
    )
    sections.append(f"### {group_title(group, config.k)}\n\n{before}{table(result.rows)}\n")
    print(f"{group_title(group, config.k)}: {windows[group] - 1} rounds", flush=True)
  seconds = (compiled_s, time.perf_counter() - started)
  markdown = "\n".join(
    [header(command, config, param_dtype, limit, windows, seconds, args.quick), *sections]
  )
  out = args.out or Path(tempfile.gettempdir()) / "optaccum-gpu-check"
  out.mkdir(parents=True, exist_ok=True)
  path = out / "RESULTS-gpu.md"
  path.write_text(markdown)
  print(markdown)
  print(f"wrote {path}")
  return Report(
    markdown=markdown,
    config=config,
    param_dtype=param_dtype.name,
    rows=rows,
    windows=windows,
    initial_params=jax.device_get(params),
    tokens=np.asarray(tokens),
    final_params=final,
    path=path,
  )


if __name__ == "__main__":
  main()
