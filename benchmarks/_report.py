"""The benchmarks' report: markdown tables, the issue's targets, and a PNG chart."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence
from pathlib import Path

from benchmarks import compile_time
from benchmarks._measure import Result
from benchmarks._methods import DEFAULT_STRATEGY

# RESULTS.md keeps whatever follows this line when it is regenerated: the
# hand-written notes on how the numbers were investigated.
KEEP_MARKER = "<!-- Everything below this line is kept when the file is regenerated. -->"

_MIB = 2**20
_FAMILY_COLORS = {
  "reference": "#9e9e9e",
  "optaccum": "#1f77b4",
  "alternative": "#ff7f0e",
  "strategy": "#8fbbd9",
}


@dataclasses.dataclass(frozen=True)
class Section:
  """One workload's results."""

  key: str
  title: str
  description: str
  results: list[Result]
  every_k: int = 8


def _find(results: Sequence[Result], prefix: str) -> Result:
  return next(r for r in results if r.name.startswith(prefix))


def _plain(results: Sequence[Result]) -> Result:
  return _find(results, "plain")


def throughput(result: Result, results: Sequence[Result]) -> float:
  """Micro-steps per second relative to plain training (same micro-batch)."""
  return _plain(results).micro_step_s / result.micro_step_s


def limit_s(section: Section, form: str) -> float | None:
  """The least time a micro-step of `form` can take: a floor plus the optimizer over k.

  The floor is the gradient and `acc + g` ("fast": parameters written only
  when a window closes), plus, for a functional transformation whose caller
  writes the parameters on every micro-step ("transformation"), that write
  `p + where(emitted, u, 0)`, timed alone. None where they were not measured.
  """
  if form not in ("fast", "transformation"):
    return None
  try:
    floor = _find(section.results, "floor: ")
    write = _find(section.results, "parameter write")
  except StopIteration:
    return None
  plain = _plain(section.results)
  limit = floor.micro_step_s + (plain.micro_step_s - floor.micro_step_s) / section.every_k
  return limit + (write.micro_step_s if form == "transformation" else 0.0)


def vs_limit(result: Result, section: Section) -> float | None:
  """The limit's time over the method's: 1.0 is as fast as accumulation can be."""
  limit = limit_s(section, result.form)
  return None if limit is None else limit / result.micro_step_s


def workload_table(section: Section) -> str:
  """The markdown table of one workload."""
  results = section.results
  plain = _plain(results)
  with_first = any(r.non_emitting_s is not None for r in results)
  floor = _find(results, "floor") if with_first else None
  header = ["method", "ms / micro-step", "throughput vs plain", "vs limit"]
  if with_first:
    header += ["non-emitting micro-step (ms)", "vs floor"]
  header += ["temp (MiB)", "temp vs plain", "arguments (MiB)", "outputs (MiB)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    ratio = vs_limit(r, section)
    row = [r.name, f"{r.micro_step_s * 1e3:.2f}", f"{throughput(r, results):.2f}x"]
    row.append("–" if ratio is None else f"{ratio:.2f}x")
    if with_first:
      if r.non_emitting_s is None:
        row += ["–", "–"]
      else:
        row += [f"{r.non_emitting_s * 1e3:.2f}", f"{r.non_emitting_s / floor.non_emitting_s:.2f}x"]
    # Without a model plain training needs no temporaries to compare with.
    meaningful = plain.memory["temp"] >= _MIB
    row += [
      f"{r.memory['temp'] / _MIB:.1f}",
      f"{r.memory['temp'] / plain.memory['temp']:.3f}x" if meaningful else "–",
      f"{r.memory['argument'] / _MIB:.1f}",
      f"{r.memory['output'] / _MIB:.1f}",
    ]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def targets_table(section: Section) -> str:
  """The issue's targets, checked on the parameter-heavy LM."""
  results = section.results
  plain = _plain(results)
  fast = _find(results, "optaccum.apply_gradients (default")
  transform = _find(results, "optaccum.accumulate (default")
  multisteps = _find(results, "optax.MultiSteps")
  checks = []
  for name, result in (("apply_gradients", fast), ("accumulate", transform)):
    ratio = vs_limit(result, section)
    if ratio is not None:
      checks.append((f"{name} >= 0.85x of its limit", f"{ratio:.3f}x", ratio >= 0.85))
  checks += [
    (
      "apply_gradients throughput >= 1.00x plain",
      f"{throughput(fast, results):.3f}x",
      throughput(fast, results) >= 1.0,
    ),
    (
      "apply_gradients temp within 2% of plain",
      f"{fast.memory['temp'] / _MIB:.1f} vs {plain.memory['temp'] / _MIB:.1f} MiB "
      f"({fast.memory['temp'] / plain.memory['temp']:.3f}x)",
      fast.memory["temp"] <= 1.02 * plain.memory["temp"],
    ),
    (
      "accumulate throughput >= 0.93x plain",
      f"{throughput(transform, results):.3f}x "
      f"(optax.MultiSteps: {throughput(multisteps, results):.3f}x)",
      throughput(transform, results) >= 0.93,
    ),
    (
      "accumulate temp <= optax.MultiSteps temp",
      f"{transform.memory['temp'] / _MIB:.1f} vs {multisteps.memory['temp'] / _MIB:.1f} MiB",
      transform.memory["temp"] <= multisteps.memory["temp"],
    ),
  ]
  lines = ["| target | measured | met |", "|---|---|---|"]
  for target, measured, met in checks:
    lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
  return "\n".join(lines)


def strategies_table(sections: Sequence[Section]) -> str:
  """Throughput and temp of each branching strategy, per workload."""
  lines = [
    "| workload | strategy | apply_gradients vs plain | accumulate vs plain "
    "| apply_gradients temp (MiB) | accumulate temp (MiB) |",
    "|---|---|---|---|---|---|",
  ]
  default = DEFAULT_STRATEGY
  for section in sections:
    results = section.results
    for strategy in ("loop", "cond", "select"):
      label = "default" if strategy == default else f'strategy="{strategy}"'
      try:
        fast = _find(results, f"optaccum.apply_gradients ({label}")
        transform = _find(results, f"optaccum.accumulate ({label}")
      except StopIteration:
        continue
      lines.append(
        f"| {section.title} | {strategy}{' (default)' if strategy == default else ''} | "
        f"{throughput(fast, results):.2f}x | {throughput(transform, results):.2f}x | "
        f"{fast.memory['temp'] / _MIB:.1f} | {transform.memory['temp'] / _MIB:.1f} |"
      )
  return "\n".join(lines)


def compile_section(rows: Sequence[compile_time.Row], layers: int, every_k: int) -> str:
  """The compile-time section: its table and the target (within 1.5x of plain)."""
  plain = rows[0].trace_s + rows[0].compile_s
  floor = next(r.trace_s + r.compile_s for r in rows if r.name.startswith("floor"))
  checks = []
  for row in rows:
    if row.name.startswith("optaccum."):
      ratio = (row.trace_s + row.compile_s) / plain
      checks.append(f"{row.name} {ratio:.2f}x ({'met' if ratio <= 1.5 else '**not met**'})")
  return "\n".join(
    [
      "## Compile time",
      "",
      f"One jitted micro-step, {layers} layers of 16x16 + bias ({2 * layers} leaves), "
      f"clip_by_global_norm + adamw, k={every_k}, gradients given; medians of interleaved "
      "rounds (`python -m benchmarks.compile_time`). Target: trace + compile within 1.5x "
      f"of plain: {'; '.join(checks)}. The floor, a hand-written `acc + g` and one "
      f"`lax.cond` around the optimizer with no window guard: {floor / plain:.2f}x.",
      "",
      compile_time.table(list(rows)),
    ]
  )


def defaults_text() -> str:
  return (
    f'The default strategy is `"{DEFAULT_STRATEGY}"` on every backend. Only CPU is '
    "measured here; on GPU and TPU the default is **not measured** on this machine (no "
    "accelerator was available) and rests on the reasoning in `optaccum/_branching.py`. "
    "Override with `accumulate(..., strategy=...)`."
  )


def chart(sections: Sequence[Section], path: Path, title: str) -> None:
  """Per workload: bars of throughput relative to plain, and of compiled temporaries."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch

  sizes = [len(s.results) for s in sections]
  figure, axes = plt.subplots(
    len(sections),
    2,
    figsize=(13, 0.3 * sum(sizes) + 1.3 * len(sections) + 0.6),
    squeeze=False,
    gridspec_kw={"height_ratios": sizes},
  )
  for (left, right), section in zip(axes, sections):
    results = section.results[::-1]
    names = [r.name for r in results]
    colors = [_FAMILY_COLORS[r.family] for r in results]
    speed = [throughput(r, section.results) for r in results]
    memory = [r.memory["temp"] / _MIB for r in results]
    plain_memory = _plain(results).memory["temp"] / _MIB
    for axis, values, reference, label, is_ratio in (
      (left, speed, 1.0, "throughput vs plain (higher is better)", True),
      (right, memory, plain_memory, "compiled temporaries, MiB (lower is better)", False),
    ):
      axis.barh(names, values, color=colors)
      axis.axvline(reference, color="black", linewidth=0.8)
      axis.set_xlabel(label, fontsize=8)
      for y, value in enumerate(values):
        text = f" {value:.2f}x" if is_ratio else f" {value:.1f}"
        axis.text(value, y, text, va="center", fontsize=7)
      axis.tick_params(labelsize=7)
      axis.set_xlim(0, max(max(values), reference) * 1.2 or 1.0)
    right.set_yticklabels([])
    left.set_title(
      f"{section.title}\n{textwrap.fill(section.description, 110)}", loc="left", fontsize=8
    )
  legend = [Patch(color=color, label=family) for family, color in _FAMILY_COLORS.items()]
  figure.legend(handles=legend, loc="upper right", fontsize=7, ncol=len(legend))
  figure.suptitle(title, fontsize=9, x=0.01, ha="left")
  figure.tight_layout(rect=(0, 0, 1, 0.97))
  figure.savefig(path, dpi=110)
  plt.close(figure)


def results_markdown(
  sections: Sequence[Section],
  *,
  command: str,
  machine: str,
  load_before: str,
  load_after: str,
  rounds: int,
  quick: bool,
  chart_name: str,
  kept: str,
  compile_section: str = "",
  loops_section: str = "",
) -> str:
  """The whole RESULTS.md."""
  parts = ["# Benchmarks", ""]
  if quick:
    parts += [
      "**QUICK RUN: tiny sizes and few rounds. It checks that the suite runs; its numbers "
      "are not measurements.**",
      "",
    ]
  parts += [
    f"Produced by `{command}` (from the repository root), {rounds} timed rounds.",
    "",
    f"- Machine: {machine}",
    f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after}. The "
    "machine is shared: absolute times are noisy, ratios measured side by side are not.",
    "- Time per micro-step: each round runs one window of k micro-steps of every "
    "method, in rotating order; the median over rounds, divided by k. Throughput vs "
    "plain: plain's time over the method's (same micro-batch, so same tokens per second "
    "ratio). The non-emitting micro-step is the first of a window, timed alone.",
    "- Memory: XLA's compiled memory analysis of the jitted step, parameters and state "
    "donated: temporaries, arguments and outputs (donated arguments are aliased to the "
    "outputs). Several programs (the hand-written loop): the largest of each.",
    "- `plain`: the same model trained without accumulation at the same micro-batch "
    "(adamw every micro-step). `floor`: the gradient and `acc + g` only, no optimizer.",
    "",
  ]
  model_sections = [s for s in sections if s.key == "lm-params"]
  if model_sections:
    parts += [
      "## Targets (parameter-heavy LM)",
      "",
      targets_table(model_sections[0]),
      "",
    ]
  for section in sections:
    parts += [f"## {section.title}", "", section.description, "", workload_table(section), ""]
  if compile_section:
    parts += [compile_section, ""]
  if loops_section:
    parts += [loops_section, ""]
  parts += [
    "## Backends: branching strategies",
    "",
    "How the window-closing step is made conditional (see `optaccum/_branching.py`): "
    '`"loop"` (a while loop of 0 or 1 trips), `"cond"` (`lax.cond`), `"select"` '
    "(compute every micro-step, keep with `jnp.where`).",
    "",
    strategies_table(sections),
    "",
    defaults_text(),
    "",
    f"![throughput and memory relative to plain]({chart_name})",
    "",
    KEEP_MARKER,
  ]
  return "\n".join(parts) + "\n" + kept


def kept_notes(path: Path) -> str:
  """What follows the marker in an existing RESULTS.md, to carry over."""
  if not path.exists():
    return ""
  text = path.read_text()
  if KEEP_MARKER not in text:
    return ""
  return text.split(KEEP_MARKER, 1)[1].lstrip("\n")
