"""Where the time of a JAX step goes, measured in a worker process (``--profile``).

A few plain steps give the step time and the minor page faults per step
(first touches of fresh memory); as many steps under ``jax.profiler`` give
each XLA kernel's time and calls per step, with the kernel's result shape from
the compiled HLO.
"""

import json
import resource
from typing import Callable

from .cases import IMPLS, Dims, jax_case, jax_stepper
from .worker import timed

PROFILE_STEPS = 3


def trace_kernels(step: Callable, steps: int) -> dict:
  """Per XLA kernel (``hlo_op``) in a ``jax.profiler`` trace of ``steps`` calls of ``step``:
  total microseconds and calls. A ``while`` kernel's time includes its body's kernels."""
  import glob
  import gzip
  import tempfile

  import jax

  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        step()
    [path] = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  kernels = {}
  for event in events:
    op = event.get("args", {}).get("hlo_op")
    if event.get("ph") == "X" and op:
      total = kernels.setdefault(op, {"us": 0.0, "calls": 0})
      total["us"] += event["dur"]
      total["calls"] += 1
  return kernels


def worker_profile(task: dict) -> dict:
  """Where a JAX step's time goes: step time and minor page faults per step, then each XLA
  kernel's time per step from a profiler trace, with its result shape."""
  import re

  impl, dims = IMPLS[task["impl"]], Dims(*task["dims"])
  case = jax_case(impl, task["cell"], dims, task["mode"])
  step = jax_stepper(case)
  step()  # compile
  step()  # warm up
  steps = task["steps"]
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  times = [timed(step)[0] for _ in range(steps)]
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  kernels = trace_kernels(step, steps)
  hlo = case.fn.lower(case.state, case.batch).compile().as_text()
  for op, total in kernels.items():
    shape = re.search(rf"%{re.escape(op)} = (\S+) ", hlo)
    total.update(us=total["us"] / steps, calls=total["calls"] / steps,
                 shape=shape.group(1) if shape else "")
  return {"step_ms": times, "minor_faults_per_step": faults / steps, "kernels": kernels}
