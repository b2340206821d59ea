"""The worker process: one measurement each, and the driver's side that starts and reads it.

A task is a JSON dict naming what to run (``"task"``: time, memory, peak or
profile) and on what (cell, dims, mode, impl). :func:`spawn` runs it in a fresh
process (``python -m bench '<task>'``, with the impl's environment); the
process prints one line, ``RESULT_MARK`` and a JSON dict, which ``spawn``
merges into the task. Every measurement runs in its own process because JAX's
and PyTorch's thread pools fight inside one.
"""

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from .cases import IMPLS, Dims, framework_info, jax_case, jax_stepper, stepper, torch_stepper

TIME_BUDGET_S = 3.0  # timed seconds per process when the task gives no iterations
MIN_ITERS, MAX_ITERS = 3, 2000
MEMORY_STEPS = 4  # train steps per memory process; the time is the median of all but the first
MEMORY_FRACTION = 0.8  # skip a point expected to need more than this share of free memory
PEAK_REPEATS = 5
WORKER_TIMEOUT_S = 3 * 3600
RESULT_MARK = "BENCH_RESULT "
EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds `bench`
ROOT = os.path.dirname(EXPERIMENTS)  # holds `bptt_jax`


# ----------------------------------------------------------------------------
# The driver's side.


def time_task(cell, config, dims, mode, impl, iters, round_):
  return {"task": "time", "cell": cell, "config": config, "dims": list(dims), "mode": mode,
          "impl": impl, "iters": iters, "round": round_}


def memory_task(cell, config, dims, impl):
  return {"task": "memory", "cell": cell, "config": config, "dims": list(dims), "impl": impl,
          "steps": MEMORY_STEPS}


def peak_task(sizes):
  return {"task": "peak", "sizes": list(sizes), "repeats": PEAK_REPEATS}


def spawn(task: dict) -> dict:
  """Runs ``task`` in a fresh worker process; the task plus its result, or an ``error``."""
  paths = [EXPERIMENTS, ROOT, os.environ.get("PYTHONPATH")]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
  if "impl" in task:
    env.update(IMPLS[task["impl"]].env)
  command = [sys.executable, "-m", "bench", json.dumps(task)]
  try:
    proc = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=WORKER_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return dict(task, error=f"timed out after {WORKER_TIMEOUT_S} s")
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_MARK):
      return dict(task, **json.loads(line[len(RESULT_MARK):]))
  tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
  return dict(task, error=f"exit code {proc.returncode}: {tail}")


# ----------------------------------------------------------------------------
# The worker's side.


def run_worker(task: dict, tasks: dict[str, Callable[[dict], dict]]) -> None:
  """Runs ``task`` with ``tasks[task["task"]]`` and prints its result as one JSON line."""
  inherited = peak_rss_mb()  # ru_maxrss carried over from the driver at exec
  result = tasks[task["task"]](dict(task, inherited_peak_mb=inherited))
  if "impl" in task:
    result.update(framework_info(IMPLS[task["impl"]]))
  print(RESULT_MARK + json.dumps(result), flush=True)


def timed(fn) -> tuple[float, Any]:
  """``(milliseconds, fn())``."""
  start = time.perf_counter()
  out = fn()
  return (time.perf_counter() - start) * 1e3, out


def worker_time(task: dict) -> dict:
  """One (impl, cell, dims, mode): a first call (compile or warm-up), an untimed probe call
  that sizes ``iters`` when it is not given, then ``iters`` calls timed one by one."""
  step = stepper(task["impl"], task["cell"], Dims(*task["dims"]), task["mode"])
  first_ms, first_loss = timed(step)
  probe_ms, _ = timed(step)  # sets the number of iterations when the task gives none
  iters = task["iters"] or int(np.clip(TIME_BUDGET_S * 1e3 / probe_ms, MIN_ITERS, MAX_ITERS))
  times, loss = [], None
  for _ in range(iters):
    ms, loss = timed(step)
    times.append(ms)
  result = {"times_ms": times, "first_call_ms": first_ms, "losses": [first_loss, loss]}
  if IMPLS[task["impl"]].kind != "torch":
    result["compile_ms"] = first_ms - float(np.median(times))
  return result


def current_rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def available_mb() -> float:
  with open("/proc/meminfo") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["MemAvailable"].split()[0]) / 1024


def peak_rss_mb() -> float:
  """Peak RSS of this process (Linux ``ru_maxrss``), in MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
  """Resets this process's RSS high-water mark (Linux ``clear_refs``); False if not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def worker_memory(task: dict) -> dict:
  """XLA's planned temp memory (JAX), then the peak RSS rise and times over a few train steps."""
  impl, dims = IMPLS[task["impl"]], Dims(*task["dims"])
  result = {}
  if impl.kind == "torch":
    step = torch_stepper(task["cell"], dims, "train")
  else:
    case = jax_case(impl, task["cell"], dims, "train")
    compiled = case.fn.lower(case.state, case.batch).compile()
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    result["xla_temp_mb"] = temp_mb
    if temp_mb > MEMORY_FRACTION * available_mb():
      return dict(result, skipped=f"XLA plans {temp_mb:.0f} MB, {available_mb():.0f} MB free")
    step = jax_stepper(case, compiled)
  result["peak_reset"] = reset_peak_rss()
  before = current_rss_mb()
  times, losses = [], []
  for _ in range(task["steps"]):
    ms, loss = timed(step)
    times.append(ms)
    losses.append(loss)
  peak = peak_rss_mb()
  if task["inherited_peak_mb"] >= before:
    result["note"] = "ru_maxrss inherited from the driver is above this process's RSS"
  return dict(result, rss_before_mb=before, peak_rss_mb=peak, rss_rise_mb=peak - before,
              inherited_peak_mb=task["inherited_peak_mb"], step_ms=times, losses=losses)


def worker_deer_iters(task: dict) -> dict:
  """DEER and quasi-DEER GRU forward solves with ``U`` scaled: iterations, deviation, time."""
  import jax
  import jax.numpy as jnp

  import bptt_jax as bj

  dims = Dims(*task["dims"])
  cell = bj.gru(dims.H)
  params = cell.init(jax.random.key(0), dims.D)
  params = dict(params, U=params["U"] * task["scale"])
  xs = jax.random.normal(jax.random.key(1), (dims.B, dims.T, dims.D))
  sequential = jax.jit(lambda p, x: bj.unroll(cell, p, x)[1])
  reference = jax.block_until_ready(sequential(params, xs))
  result = {"sequential_ms": float(np.median([timed(
      lambda: jax.block_until_ready(sequential(params, xs)))[0] for _ in range(3)]))}
  for name, quasi in (("deer", False), ("quasi_deer", True)):
    method = bj.Deer(quasi=quasi, max_iter=200, fallback="none")
    solve = jax.jit(lambda p, x, m=method: bj.deer_unroll(cell, p, x, method=m)[1:])
    hs, info = jax.block_until_ready(solve(params, xs))
    ms = float(np.median([timed(lambda f=solve: jax.block_until_ready(f(params, xs)))[0]
                          for _ in range(3)]))
    result[name] = {"iterations": int(info.iterations), "converged": bool(info.converged),
                    "residual": float(info.residual),
                    "max_deviation": float(jnp.max(jnp.abs(hs - reference))),
                    "forward_ms": ms}
  return result


def matmul_gflops(n: int, repeats: int) -> float:
  """GFLOP/s of the fastest of ``repeats`` float32 ``[n, n] @ [n, n]`` under ``jax.jit``."""
  import jax
  import jax.numpy as jnp

  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
  product = jax.jit(jnp.matmul)
  run = lambda: product(a, b).block_until_ready()
  run()  # compile
  best_ms = min(timed(run)[0] for _ in range(repeats))
  return 2 * n**3 / (best_ms * 1e-3) / 1e9


def worker_peak(task: dict) -> dict:
  """The machine's float32 matmul peak: the best GFLOP/s over the given sizes."""
  gflops = {str(n): matmul_gflops(n, task["repeats"]) for n in task["sizes"]}
  return {"gflops": gflops, "peak_gflops": max(gflops.values())}
