"""Time per XLA op category and idle time between steps, from a profiler trace.

  python xprof/summarize_trace.py --trace_dir=/tmp/run/profile [--module=NAME] [--json]

Reads the newest `*.trace.json.gz` under `--trace_dir` (what
`jax.profiler.start_trace` writes, e.g. for `config.profile_steps`; a
`perfetto_trace.json.gz` holds the same events). The XLA op executions in it
(events with an `hlo_op` argument) are grouped by program; the steps are the
executions of `--module` (by default the program with the most op time, the
train step `jit_step_in_loop` in a training trace), told apart by their
`run_id` (XLA:CPU traces) or taken from the "XLA Modules" line (GPU and TPU
traces, whose "XLA Ops" line then supplies the ops). It prints:

- the steps found (and their step numbers, from the `steps.json` a run
  writes beside its trace, when the counts agree), with each step's span;
- time per op category, summed over every device thread or stream (on CPU
  several threads run ops at once, so the sum can exceed the span); an op
  that contains others (a while loop's thunk, say) counts only its own time;
- idle time between steps: the gaps between one step's last op ending and
  the next step's first op starting, on any device.

Categories come from op names: collective (all-reduce, all-gather, ...),
convolution, dot (matmuls; on XLA:CPU also its YNNPACK/XNNPACK/oneDNN
fusions, which hold the matmuls), copy (copies, transposes, slices), other
fusion, other. `--json` prints the same figures as one JSON object.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
from typing import Any, Iterable

from absl import app
from absl import flags

STEPS_FILE = "steps.json"  # Written by tuning_playbook/training/profiling.py.
TRAIN_STEP_MODULE = "jit_step_in_loop"  # train_step.for_loop's program.

_TRACE_DIR = flags.DEFINE_string("trace_dir", None,
                                 "Directory holding the trace (searched recursively).")
_MODULE = flags.DEFINE_string(
    "module", "", f"The step's XLA program; default: {TRAIN_STEP_MODULE} if the "
    "trace has it, else the program with the most op time.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of text.")
flags.mark_flag_as_required("trace_dir")

# (category, pattern over the op and event names), first match wins.
CATEGORIES = (
    ("collective", r"all-reduce|all_reduce|allreduce|all-gather|all_gather|"
                   r"reduce-scatter|reduce_scatter|all-to-all|all_to_all|"
                   r"collective-permute|nccl"),
    ("convolution", r"conv"),
    ("dot", r"dot|gemm|matmul|cublas|ynn_fusion|xnn_fusion|onednn"),
    ("copy", r"copy|transpose|memcpy|memset|slice|concatenate"),
    ("fusion", r"fusion"),
)
OTHER = "other"
CATEGORY_NAMES = tuple(c for c, _ in CATEGORIES) + (OTHER,)


def find_trace(directory: str) -> str:
  """The newest trace file under `directory` (or `directory` itself, a file)."""
  if os.path.isfile(directory):
    return directory
  found = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  found = found or glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                             recursive=True)
  if not found:
    raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
  return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict[str, Any]]:
  with gzip.open(path, "rt") as f:
    return json.load(f)["traceEvents"]


def category(op: str, name: str = "") -> str:
  text = f"{op} {name}".lower()
  for label, pattern in CATEGORIES:
    if re.search(pattern, text):
      return label
  return OTHER


def _thread_names(events: Iterable[dict[str, Any]]) -> dict[tuple[Any, Any], str]:
  return {(e.get("pid"), e.get("tid")): e["args"]["name"] for e in events
          if e.get("ph") == "M" and e.get("name") == "thread_name"}


def _on_line(events, names, line: str) -> list[dict[str, Any]]:
  return [e for e in events if names.get((e.get("pid"), e.get("tid"))) == line]


def _op_events(events: list[dict[str, Any]],
               names: dict[tuple[Any, Any], str]) -> list[dict[str, Any]]:
  ops = [e for e in events if e.get("ph") == "X"
         and "hlo_op" in (e.get("args") or {})]
  # GPU/TPU: the derived "XLA Ops" line holds each op once; the stream lines
  # repeat them kernel by kernel.
  return _on_line(ops, names, "XLA Ops") or ops


def _module_spans(events, names, module: str) -> list[list[float]]:
  """Executions of `module` on the "XLA Modules" line (GPU/TPU traces)."""
  return sorted([float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))]
                for e in _on_line(events, names, "XLA Modules")
                if e.get("ph") == "X" and e.get("name", "").startswith(module))


def _step_labels(trace_path: str, root: str, count: int) -> list[int] | None:
  """Step numbers from the nearest steps.json between the trace and `root`."""
  directory = os.path.dirname(os.path.abspath(trace_path))
  root = os.path.abspath(root if os.path.isdir(root) else os.path.dirname(root))
  while True:
    path = os.path.join(directory, STEPS_FILE)
    if os.path.exists(path):
      with open(path) as f:
        steps = json.load(f)
      labels = list(range(steps["first_step"], steps["last_step"] + 1))
      return labels if len(labels) == count else None
    if directory == root or os.path.dirname(directory) == directory:
      return None
    directory = os.path.dirname(directory)


def _self_times(ops: list[dict[str, Any]]) -> list[float]:
  """Each op's duration less that of the ops nested in it on its thread."""
  result = [float(e.get("dur", 0.0)) for e in ops]
  by_thread = collections.defaultdict(list)
  for i, e in enumerate(ops):
    by_thread[(e.get("pid"), e.get("tid"))].append(i)
  for indices in by_thread.values():
    indices.sort(key=lambda i: (float(ops[i]["ts"]), -result[i]))
    open_ops: list[int] = []  # Enclosing ops, innermost last.
    for i in indices:
      begin = float(ops[i]["ts"])
      while open_ops and begin >= float(ops[open_ops[-1]]["ts"]) + float(
          ops[open_ops[-1]].get("dur", 0.0)):
        open_ops.pop()
      if open_ops:
        result[open_ops[-1]] -= float(ops[i].get("dur", 0.0))
      open_ops.append(i)
  return [max(0.0, t) for t in result]


def summarize(events: list[dict[str, Any]], module: str = "") -> dict[str, Any]:
  """Per-category op time, steps and idle time between them (microseconds)."""
  names = _thread_names(events)
  ops = _op_events(events, names)
  by_module = collections.defaultdict(float)
  for e in ops:
    by_module[e["args"].get("hlo_module", "")] += float(e.get("dur", 0.0))
  if not by_module:
    raise ValueError("no XLA op events (with an hlo_op argument) in the trace")
  if not module:
    module = (TRAIN_STEP_MODULE if TRAIN_STEP_MODULE in by_module
              else max(by_module, key=by_module.get))
  if module not in by_module:
    raise ValueError(f"no ops of module {module!r}; modules: {sorted(by_module)}")
  times = dict.fromkeys(CATEGORY_NAMES, 0.0)
  counts = dict.fromkeys(CATEGORY_NAMES, 0)
  per_op = collections.defaultdict(float)
  spans: dict[str, list[float]] = {}
  ops = [e for e in ops if e["args"].get("hlo_module", "") == module]
  for e, own in zip(ops, _self_times(ops)):
    args = e["args"]
    begin, duration = float(e["ts"]), float(e.get("dur", 0.0))
    label = category(args["hlo_op"], e.get("name", ""))
    times[label] += own
    counts[label] += 1
    per_op[args["hlo_op"]] += own
    span = spans.setdefault(str(args.get("run_id", "")), [begin, begin + duration])
    span[0], span[1] = min(span[0], begin), max(span[1], begin + duration)
  ordered = sorted(spans.values())
  if "" in spans:  # No run_id to tell the executions apart.
    ordered = _module_spans(events, names, module) or ordered
  gaps = [max(0.0, b[0] - a[1]) for a, b in zip(ordered, ordered[1:])]
  durations = [end - begin for begin, end in ordered]
  total = sum(times.values())
  return {
      "module": module,
      "steps": {"count": len(ordered), "span_us": durations,
                "mean_us": statistics.fmean(durations)},
      "idle_between_steps": {
          "total_us": sum(gaps), "mean_us": statistics.fmean(gaps) if gaps else 0.0,
          "max_us": max(gaps, default=0.0), "gaps": len(gaps),
          "fraction": (sum(gaps) / (ordered[-1][1] - ordered[0][0])
                       if len(ordered) > 1 else 0.0)},
      "categories": {c: {"time_us": times[c], "share": times[c] / total if total else 0.0,
                         "ops": counts[c]} for c in CATEGORY_NAMES},
      "top_ops": [{"op": op, "time_us": t, "category": category(op)} for op, t in
                  sorted(per_op.items(), key=lambda kv: -kv[1])[:10]],
      "other_modules": {m: t for m, t in sorted(by_module.items()) if m != module},
  }


def format_text(summary: dict[str, Any]) -> str:
  steps, idle = summary["steps"], summary["idle_between_steps"]
  labels = steps.get("labels")
  which = f" (steps {labels[0]}..{labels[-1]})" if labels else ""
  lines = [f"trace: {summary['trace']}",
           f"steps found: {steps['count']} executions of {summary['module']}{which}",
           f"step span: mean {steps['mean_us'] / 1e3:.3f} ms",
           f"idle between steps: {idle['total_us'] / 1e3:.3f} ms over {idle['gaps']} "
           f"gap(s) (mean {idle['mean_us'] / 1e3:.3f} ms, max "
           f"{idle['max_us'] / 1e3:.3f} ms; {100 * idle['fraction']:.1f}% of the "
           "traced steps' span)",
           "time per op category (summed over device threads):",
           f"  {'category':<12} {'time ms':>10} {'share':>7} {'ops':>6}"]
  for name, c in summary["categories"].items():
    lines.append(f"  {name:<12} {c['time_us'] / 1e3:>10.3f} {100 * c['share']:>6.1f}% "
                 f"{c['ops']:>6}")
  lines.append("top ops: " + ", ".join(f"{o['op']} {o['time_us'] / 1e3:.3f} ms"
                                       for o in summary["top_ops"][:5]))
  if summary["other_modules"]:
    lines.append("other programs (op time): " + ", ".join(
        f"{m} {t / 1e3:.3f} ms" for m, t in summary["other_modules"].items()))
  return "\n".join(lines)


def main(argv):
  del argv
  path = find_trace(_TRACE_DIR.value)
  summary = summarize(load_events(path), _MODULE.value)
  summary["trace"] = path
  summary["steps"]["labels"] = _step_labels(path, _TRACE_DIR.value,
                                            summary["steps"]["count"])
  sys.stdout.write((json.dumps(summary, indent=2) if _JSON.value
                    else format_text(summary)) + "\n")


if __name__ == "__main__":
  app.run(main)
