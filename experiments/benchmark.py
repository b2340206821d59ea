"""Speed and memory of bptt_jax against Flax and PyTorch, on this machine.

Every measurement runs in its own process (JAX's and PyTorch's thread pools
fight inside one), and the processes alternate between implementations over
several rounds: round r times every implementation once per case, in an order
rotated by r. Each process compiles or warms up, then times N iterations and
prints one JSON line; this driver pools the iterations of all rounds into a
median and an interquartile range.

Implementations (on CPU; ``unroll``'s defaults there are no hoisting, fused):
  bptt_jax           bptt_jax.unroll defaults: the hand-written fused backward
  bptt_jax_autodiff  unroll(fused=False): autodiff through lax.scan, per-step projection
  bptt_jax_hoisted   unroll(fused=False, hoist=True): one input matmul before the scan
  flax               flax.linen.RNN over OptimizedLSTMCell / GRUCell / SimpleCell
  torch              torch.nn.LSTM / GRU / RNN(tanh), batch_first=True
  *_malloc           bptt_jax, flax or torch with glibc's allocator told to keep and
                     reuse big buffers (MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
                     MALLOC_TRIM_THRESHOLD_=100000000000); otherwise every step's
                     large buffers are fresh pages from the kernel, and the first
                     touch of each 4 KiB page faults (--profile counts them)
  bptt_jax_remat     unroll(remat="sqrt"): only in --memory-vs-T by default
  bptt_jax_segmented segmented_loss: loss inside checkpointed segments, O(sqrt T)
                     memory; only in --memory-vs-T by default

Modes: ``train`` is one optimizer update (forward, readout H -> D at every
step, MSE against a fixed random target, BPTT, clip_by_global_norm(1.0), Adam
1e-3); ``forward`` is inference: RNN layer and readout (jax.jit;
torch.inference_mode()).

Memory, per (cell, config) and implementation, a process each, train mode:
  XLA temp    the temporary buffers XLA plans for the jitted train step
              (compiled.memory_analysis().temp_size_in_bytes; JAX only).
  RSS rise    measured: peak RSS (getrusage ru_maxrss) after a few steps minus
              the RSS just before the first step (JAX compiles ahead of time,
              then the high-water mark is reset, so compiling does not count).

  python experiments/benchmark.py                 # the full suite (about an hour)
  python experiments/benchmark.py --quick         # smoke test, under a minute
  python experiments/benchmark.py --cells lstm --configs small --modes train --rounds 1
  python experiments/benchmark.py --memory-vs-T   # LSTM memory and time against T only
  python experiments/benchmark.py --profile --cells lstm --configs long --modes train \\
      --impls bptt_jax bptt_jax_malloc flax    # per-kernel times and page faults per step
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bptt_jax
if "--worker" not in sys.argv:
  import common  # reports and plots; workers skip it (and matplotlib) and start sooner


class Dims(NamedTuple):
  B: int  # batch
  T: int  # time steps
  D: int  # input features (and readout outputs)
  H: int  # hidden units


CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
CONFIGS = {
    "small": Dims(32, 100, 32, 128),
    "medium": Dims(64, 200, 128, 512),
    "long": Dims(16, 2000, 32, 256),
}
QUICK_CONFIGS = {"tiny": Dims(4, 10, 4, 8)}
MODES = ("train", "forward")


class Impl(NamedTuple):
  kind: str  # "bptt_jax", "flax" or "torch": which builder makes the step
  unroll: dict = {}  # keyword arguments of bptt_jax.unroll
  env: dict = {}  # extra environment of the worker process


TUNED_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": "100000000000"}
IMPLS = {
    "bptt_jax": Impl("bptt_jax"),
    "bptt_jax_malloc": Impl("bptt_jax", env=TUNED_MALLOC),
    "bptt_jax_autodiff": Impl("bptt_jax", {"fused": False}),
    "bptt_jax_hoisted": Impl("bptt_jax", {"fused": False, "hoist": True}),
    "flax": Impl("flax"),
    "flax_malloc": Impl("flax", env=TUNED_MALLOC),
    "torch": Impl("torch"),
    "torch_malloc": Impl("torch", env=TUNED_MALLOC),
    "bptt_jax_remat": Impl("bptt_jax", {"remat": "sqrt"}),
    "bptt_jax_segmented": Impl("bptt_jax", {"segmented": True}),
}
DEFAULT_IMPLS = ["bptt_jax", "bptt_jax_malloc", "bptt_jax_autodiff", "flax", "flax_malloc",
                 "torch", "torch_malloc"]
QUICK_IMPLS = ["bptt_jax", "flax", "torch"]  # one per framework: every builder runs
TORCH_IMPLS = {name for name, impl in IMPLS.items() if impl.kind == "torch"}

# Memory against T: LSTM, B = 16, H = 256, D = 32.
MEMORY_VS_T_DIMS = Dims(16, 0, 32, 256)
MEMORY_VS_T_LENGTHS = [1000, 10000, 100000]
MEMORY_VS_T_IMPLS = ["bptt_jax", "bptt_jax_remat", "bptt_jax_segmented", "flax", "torch"]
MEMORY_STEPS = 4  # train steps per memory process; the time is the median of all but the first
MEMORY_FRACTION = 0.8  # skip a point expected to need more than this share of free memory

TIME_BUDGET_S = 3.0  # timed seconds per process when --iters is not given
MIN_ITERS, MAX_ITERS = 3, 2000
PEAK_SIZES, QUICK_PEAK_SIZES = (2048, 4096), (512,)
PEAK_REPEATS = 5
WORKER_TIMEOUT_S = 3 * 3600
RESULT_MARK = "BENCH_RESULT "


def forward_flops(cell: str, dims: Dims) -> float:
  """Matmul FLOPs of the forward pass: RNN ``2B(D+H)GH`` and readout ``2BHD`` per step."""
  B, T, D, H = dims
  return T * (2 * B * (D + H) * GATES[cell] * H + 2 * B * H * D)


def flops(cell: str, dims: Dims, mode: str) -> float:
  """Forward FLOPs; a training step is about three forward passes (forward + two in BPTT)."""
  return forward_flops(cell, dims) * (3 if mode == "train" else 1)


# ----------------------------------------------------------------------------
# Worker: one measurement in this process. JAX, Flax and PyTorch are imported
# here, inside the functions, so that each worker loads only the framework it
# measures.


def make_data(dims: Dims):
  """Fixed random inputs and targets ``[B, T, D]`` (float32 numpy), the same for every impl."""
  rng = np.random.default_rng(0)
  shape = (dims.B, dims.T, dims.D)
  return (rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))


class JaxCase(NamedTuple):
  """A jitted JAX function and what it runs on.

  ``train``: ``fn(state, batch) -> (state, metrics)`` with ``metrics["loss"]``;
  otherwise ``fn(state, batch) -> ys`` with ``state`` the params and ``batch``
  the inputs.
  """

  fn: Callable
  state: Any
  batch: Any
  train: bool


def mse(preds, targets):
  import jax.numpy as jnp

  return jnp.mean(jnp.square(preds - targets))


def bptt_jax_case(cell_name: str, dims: Dims, mode: str, unroll_kwargs: dict) -> JaxCase:
  """bptt_jax cell, readout and, for training, ``bj.optimizer`` with ``bj.train_step``."""
  import jax
  import jax.numpy as jnp

  import bptt_jax as bj

  unroll_kwargs = dict(unroll_kwargs)
  segmented = unroll_kwargs.pop("segmented", False)
  make_cell = {"rnn": lambda H: bj.rnn(H, "tanh"), "lstm": bj.lstm, "gru": bj.gru}[cell_name]
  cell = make_cell(dims.H)

  @jax.jit  # one compile rather than one per eager op
  def init(key):
    k_cell, k_head = jax.random.split(key)
    return {"cell": cell.init(k_cell, dims.D), "head": bj.init_readout(k_head, dims.H, dims.D)}

  params = init(jax.random.key(0))

  def predict(params, xs):
    _, hs = bj.unroll(cell, params["cell"], xs, **unroll_kwargs)
    return bj.readout(params["head"], hs)

  xs, ys = map(jax.device_put, make_data(dims))
  if mode == "forward":
    return JaxCase(jax.jit(predict), params, xs, train=False)

  def loss_fn(params, batch):
    xs, ys = batch
    return mse(predict(params, xs), ys)

  if segmented:
    # The same mean squared error, computed segment by segment (O(sqrt T) memory).
    def step_loss(params, hs, ys):
      return jnp.mean(jnp.square(bj.readout(params["head"], hs) - ys), axis=-1)

    def loss_fn(params, batch):  # noqa: F811
      xs, ys = batch
      return bj.segmented_loss(cell, params, xs, ys, step_loss, reduction="mean")[0]

  tx = bj.optimizer(1e-3, max_norm=1.0)
  state = jax.jit(lambda p: bj.TrainState.create(p, tx))(params)
  return JaxCase(bj.train_step(loss_fn, tx), state, (xs, ys), train=True)


def flax_case(cell_name: str, dims: Dims, mode: str) -> JaxCase:
  """``nn.RNN`` over Flax's own cell, ``nn.Dense`` readout, optax clip + Adam under jax.jit."""
  import flax.linen as nn
  import jax
  import optax

  flax_cell = {"rnn": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[cell_name]

  class Model(nn.Module):
    @nn.compact
    def __call__(self, xs):  # [B, T, D] -> [B, T, D]
      return nn.Dense(dims.D)(nn.RNN(flax_cell(features=dims.H))(xs))

  model = Model()
  xs, ys = map(jax.device_put, make_data(dims))
  params = jax.jit(model.init)(jax.random.key(0), xs)
  if mode == "forward":
    return JaxCase(jax.jit(model.apply), params, xs, train=False)

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))

  @jax.jit
  def step(state, batch):
    params, opt_state = state
    xs, ys = batch
    loss, grads = jax.value_and_grad(lambda p: mse(model.apply(p, xs), ys))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  return JaxCase(step, (params, jax.jit(tx.init)(params)), (xs, ys), train=True)


def jax_case(impl: Impl, cell_name: str, dims: Dims, mode: str) -> JaxCase:
  if impl.kind == "flax":
    return flax_case(cell_name, dims, mode)
  return bptt_jax_case(cell_name, dims, mode, impl.unroll)


def jax_stepper(case: JaxCase, fn: Callable | None = None) -> Callable[[], float | None]:
  """``step()`` runs ``fn`` (default ``case.fn``) once, waits for it, returns the loss.

  Training threads the new state into the next call.
  """
  import jax

  fn = fn or case.fn
  state = case.state

  def step():
    nonlocal state
    if not case.train:
      jax.block_until_ready(fn(state, case.batch))
      return None
    state, metrics = jax.block_until_ready(fn(state, case.batch))
    return float(metrics["loss"])

  return step


def torch_stepper(cell_name: str, dims: Dims, mode: str) -> Callable[[], float | None]:
  """``step()`` for ``torch.nn.LSTM``/``GRU``/``RNN`` (batch-first) with a linear readout."""
  import torch

  torch.manual_seed(0)
  B, T, D, H = dims
  rnn = {
      "rnn": lambda: torch.nn.RNN(D, H, nonlinearity="tanh", batch_first=True),
      "lstm": lambda: torch.nn.LSTM(D, H, batch_first=True),
      "gru": lambda: torch.nn.GRU(D, H, batch_first=True),
  }[cell_name]()
  head = torch.nn.Linear(H, D)
  xs, ys = (torch.from_numpy(a) for a in make_data(dims))

  if mode == "forward":
    def forward():
      with torch.inference_mode():
        head(rnn(xs)[0])

    return forward

  params = list(rnn.parameters()) + list(head.parameters())
  opt = torch.optim.Adam(params, lr=1e-3)

  def train():
    loss = torch.nn.functional.mse_loss(head(rnn(xs)[0]), ys)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return train


def framework_info(impl: Impl) -> dict:
  if impl.kind == "torch":
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads()}
  import jax

  return {"jax": jax.__version__, "backend": jax.default_backend()}


def timed(fn) -> tuple[float, Any]:
  """``(milliseconds, fn())``."""
  start = time.perf_counter()
  out = fn()
  return (time.perf_counter() - start) * 1e3, out


def worker_time(task: dict) -> dict:
  """One (impl, cell, dims, mode): a first call (compile or warm-up), an untimed probe call
  that sizes ``iters`` when it is not given, then ``iters`` calls timed one by one."""
  impl, dims = IMPLS[task["impl"]], Dims(*task["dims"])
  if impl.kind == "torch":
    step = torch_stepper(task["cell"], dims, task["mode"])
  else:
    step = jax_stepper(jax_case(impl, task["cell"], dims, task["mode"]))
  first_ms, first_loss = timed(step)
  probe_ms, _ = timed(step)  # sets the number of iterations when --iters is not given
  iters = task["iters"] or int(np.clip(TIME_BUDGET_S * 1e3 / probe_ms, MIN_ITERS, MAX_ITERS))
  times, loss = [], None
  for _ in range(iters):
    ms, loss = timed(step)
    times.append(ms)
  result = {"times_ms": times, "first_call_ms": first_ms, "losses": [first_loss, loss]}
  if impl.kind != "torch":
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


def run_worker(task: dict) -> None:
  """Entry point of a worker process: runs ``task`` and prints one JSON line."""
  inherited = peak_rss_mb()  # ru_maxrss carried over from the driver at exec
  worker = {"time": worker_time, "memory": worker_memory, "peak": worker_peak,
            "profile": worker_profile}[task["task"]]
  result = worker(dict(task, inherited_peak_mb=inherited))
  if "impl" in task:
    result.update(framework_info(IMPLS[task["impl"]]))
  print(RESULT_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------
# Driver: starts the workers, pools their numbers, writes the report.


def spawn(task: dict) -> dict:
  """Runs ``task`` in a fresh worker process; the task plus its result, or an ``error``."""
  env = dict(os.environ, **IMPLS[task["impl"]].env) if "impl" in task else None
  command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task)]
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


def time_task(cell, config, dims, mode, impl, iters, round_):
  return {"task": "time", "cell": cell, "config": config, "dims": list(dims), "mode": mode,
          "impl": impl, "iters": iters, "round": round_}


def memory_task(cell, config, dims, impl):
  return {"task": "memory", "cell": cell, "config": config, "dims": list(dims), "impl": impl,
          "steps": MEMORY_STEPS}


def run_timing(args, configs) -> tuple[list, list]:
  """All rounds: a peak-matmul process, then every case with the impls in rotated order."""
  raws, peaks = [], []
  sizes = QUICK_PEAK_SIZES if args.quick else PEAK_SIZES
  for r in range(args.rounds):
    peaks.append(spawn({"task": "peak", "sizes": list(sizes), "repeats": PEAK_REPEATS}))
    print(f"round {r + 1}/{args.rounds}: matmul peak "
          f"{peaks[-1].get('peak_gflops', float('nan')):.1f} GFLOP/s", flush=True)
    order = args.impls[r % len(args.impls):] + args.impls[:r % len(args.impls)]
    for cell in args.cells:
      for config, dims in configs.items():
        for mode in args.modes:
          for impl in order:
            raw = spawn(time_task(cell, config, dims, mode, impl, args.iters, r))
            raws.append(raw)
            print(f"  {cell}/{config}/{mode} {impl:18s} {describe_time(raw)}", flush=True)
  return raws, peaks


def describe_time(raw: dict) -> str:
  if "error" in raw:
    return "FAILED " + raw["error"].splitlines()[-1]
  return f"{np.median(raw['times_ms']):9.3f} ms  (n={len(raw['times_ms'])})"


def run_memory(args, configs) -> list:
  raws = []
  for cell in args.cells:
    for config, dims in configs.items():
      for impl in args.impls:
        raw = spawn(memory_task(cell, config, dims, impl))
        raws.append(raw)
        print(f"  memory {cell}/{config} {impl:18s} {describe_memory(raw)}", flush=True)
  return raws


def describe_memory(raw: dict) -> str:
  if "error" in raw:
    return "FAILED " + raw["error"].splitlines()[-1]
  temp = f"XLA temp {raw['xla_temp_mb']:8.3g} MB  " if "xla_temp_mb" in raw else ""
  if "skipped" in raw:
    return temp + "skipped: " + raw["skipped"]
  return temp + f"RSS rise {raw['rss_rise_mb']:8.1f} MB  step {step_time_ms(raw):.1f} ms"


def step_time_ms(raw: dict) -> float:
  """Median train-step time of a memory process, without its first step (first-touch faults)."""
  times = raw["step_ms"]
  return float(np.median(times[1:] if len(times) > 1 else times))


def summarize_timing(raws: list, peak_gflops: float) -> list:
  """One row per (cell, config, mode, impl): pooled median, spread, ratios, GFLOP/s, compile."""
  groups = {}
  for raw in raws:
    groups.setdefault((raw["cell"], raw["config"], raw["mode"], raw["impl"]), []).append(raw)
  rows = []
  for (cell, config, mode, impl), group in groups.items():
    ok = [g for g in group if "error" not in g]
    row = {"cell": cell, "config": config, "mode": mode, "impl": impl,
           "dims": group[0]["dims"], "processes": len(ok),
           "errors": [g["error"] for g in group if "error" in g]}
    if ok:
      times = np.concatenate([g["times_ms"] for g in ok])
      q1, median, q3 = np.percentile(times, [25, 50, 75])
      gflops = flops(cell, Dims(*row["dims"]), mode) / (median * 1e-3) / 1e9
      row.update(median_ms=median, q1_ms=q1, q3_ms=q3, min_ms=times.min(), max_ms=times.max(),
                 iterations=len(times), gflops=gflops, peak_fraction=gflops / peak_gflops,
                 losses=[g["losses"] for g in ok])
      if "compile_ms" in ok[0]:
        row["compile_ms"] = float(np.median([g["compile_ms"] for g in ok]))
    rows.append(row)
  by_key = {(r["cell"], r["config"], r["mode"], r["impl"]): r for r in rows}
  for row in rows:
    for ref in ("torch", "flax"):  # the reference run with the same allocator settings
      same = ref + ("_malloc" if IMPLS[row["impl"]].env else "")
      other = by_key.get((row["cell"], row["config"], row["mode"], same), {})
      if "median_ms" in row and "median_ms" in other:
        row[f"ratio_{ref}"] = row["median_ms"] / other["median_ms"]
  return rows


# ----------------------------------------------------------------------------
# Report: markdown tables, a bar chart, JSON.


def fmt(value, spec=".2f", missing="—"):
  return missing if value is None else format(value, spec)


def fmt_ms(ms: float) -> str:
  """Three significant digits, without exponents."""
  return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def md_table(header: list, rows: list) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def time_cell(row: dict | None) -> str:
  if row is None:
    return "—"
  if "median_ms" not in row:
    return "failed"
  ratio = f" ({row['ratio_torch']:.2f}×)" if "ratio_torch" in row else ""
  return fmt_ms(row["median_ms"]) + ratio


def summary_table(rows: list, impls: list) -> str:
  """Rows cell/config/mode; each impl's median ms (÷ PyTorch with the same allocator), then
  bptt_jax GFLOP/s, % peak."""
  by_key = {(r["cell"], r["config"], r["mode"], r["impl"]): r for r in rows}
  cases = list(dict.fromkeys((r["cell"], r["config"], r["mode"]) for r in rows))
  table = []
  for case in cases:
    ours = by_key.get(case + ("bptt_jax",), {})
    table.append(["/".join(case)] + [time_cell(by_key.get(case + (i,))) for i in impls]
                 + [fmt(ours.get("gflops"), ".1f"),
                    fmt(100 * ours["peak_fraction"] if "peak_fraction" in ours else None, ".1f")])
  header = ["cell/config/mode"] + [f"{i} ms" for i in impls] + ["bptt_jax GFLOP/s", "% peak"]
  return md_table(header, table)


def detail_table(rows: list) -> str:
  table = []
  for r in rows:
    if "median_ms" not in r:
      table.append(["/".join((r["cell"], r["config"], r["mode"])), r["impl"], "failed"]
                   + [""] * 9)
      continue
    table.append([
        "/".join((r["cell"], r["config"], r["mode"])), r["impl"], fmt_ms(r["median_ms"]),
        fmt_ms(r["q1_ms"]) + "–" + fmt_ms(r["q3_ms"]),
        fmt_ms(r["min_ms"]) + "–" + fmt_ms(r["max_ms"]),
        r["iterations"], fmt(r.get("ratio_torch")), fmt(r.get("ratio_flax")),
        f"{r['gflops']:.1f}", f"{100 * r['peak_fraction']:.1f}",
        fmt(r.get("compile_ms"), ".0f"), fmt(r["losses"][0][0], ".4f")])
  header = ["case", "impl", "median ms", "IQR ms", "min–max ms", "iterations", "÷ torch*",
            "÷ flax*", "GFLOP/s", "% peak", "compile ms", "first loss"]
  return md_table(header, table)


def memory_cell(raw: dict | None) -> str:
  if raw is None:
    return "—"
  if "error" in raw:
    return "failed"
  temp = fmt(raw.get("xla_temp_mb"), ".3g")
  rise = raw["skipped"] if "skipped" in raw else f"{raw['rss_rise_mb']:.1f}"
  return f"{temp} / {rise}"


def memory_table(raws: list, impls: list, key: str) -> str:
  """Rows by ``key`` (e.g. cell/config); per impl 'XLA temp MB / peak RSS rise MB'."""
  by_key = {(raw[key], raw["impl"]): raw for raw in raws}
  labels = list(dict.fromkeys(raw[key] for raw in raws))
  table = [[label] + [memory_cell(by_key.get((label, i))) for i in impls] for label in labels]
  return md_table([key] + impls, table)


def plot_ratios(rows: list, impls: list, path: str) -> None:
  import matplotlib.pyplot as plt

  by_key = {(r["cell"], r["config"], r["mode"], r["impl"]): r for r in rows}
  cases = list(dict.fromkeys((r["cell"], r["config"], r["mode"]) for r in rows))
  shown = [i for i in impls if IMPLS[i].kind != "torch"]  # each torch run is its own 1.0
  fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cases)), 4.5))
  width = 0.8 / max(len(shown), 1)
  for k, impl in enumerate(shown):
    ratios = [by_key.get(c + (impl,), {}).get("ratio_torch", np.nan) for c in cases]
    ax.bar(np.arange(len(cases)) + k * width, ratios, width, label=impl)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_yscale("log")
  ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
  ax.set_xticklabels(["/".join(c) for c in cases], rotation=45, ha="right", fontsize=8)
  ax.set_ylabel("time ÷ PyTorch time (lower is faster)")
  ax.set_title("median time relative to PyTorch with the same allocator settings")
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", which="both", alpha=0.3)
  common.save_plot(fig, path)


def write_report(path: str, sections: list) -> str:
  text = "\n\n".join(sections) + "\n"
  with open(path, "w") as f:
    f.write(text)
  print(f"wrote {os.path.relpath(path, common.ROOT)}")
  return text


def machine_line(load: list) -> str:
  """The machine, and its load average at the start and end of the run (a quiet one reads ~0)."""
  m = common.machine()
  return (f"Machine: {m['processor']}, {m['cpus']} CPUs, JAX {m['jax']} ({m['backend']}), "
          f"Python {m['python']}. Load average (1 min) at start and end: "
          f"{load[0]:.1f}, {load[-1]:.1f}.")


def peak_line(peaks: list) -> str:
  measured = [p for p in peaks if "gflops" in p]
  if not measured:
    return "float32 matmul peak: every measurement failed (see below)."
  best = {n: max(p["gflops"][n] for p in measured) for n in measured[0]["gflops"]}
  sizes = ", ".join(f"n={n}: {g:.1f}" for n, g in best.items())
  return (f"float32 matmul peak measured in this run (jax.jit, best of {PEAK_REPEATS} per "
          f"process, best over {len(peaks)} processes): {sizes} GFLOP/s; % peak uses the best.")


RATIO_NOTE = ("\\* Ratios compare runs with the same allocator settings: an impl ending in "
              "_malloc against torch_malloc and flax_malloc, the others against torch and "
              "flax.")
MEMORY_NOTE = ("Each entry: XLA temp MB (planned temporary buffers of the jitted train step, "
               "JAX only) / peak RSS rise MB (measured: ru_maxrss after "
               f"{MEMORY_STEPS} steps minus the RSS just before the first step; JAX compiled "
               "beforehand). PyTorch allocates its gradients and Adam state (3x the parameters) "
               "during the first step, JAX before it.")


def failures(raws: list) -> str:
  """One line per failed process, with the last line of its error."""
  label = lambda r: " ".join(str(r[k]) for k in ("task", "cell", "config", "mode", "impl")
                            if k in r)
  lines = [f"- {label(r)}: " + r["error"].splitlines()[-1] for r in raws if "error" in r]
  return "\n".join(lines)


def suite(args, configs) -> None:
  """Timing rounds, then memory; writes benchmark.json, .md and .png."""
  load = [os.getloadavg()[0]]
  raws, peaks = run_timing(args, configs)
  peak_gflops = max((p["peak_gflops"] for p in peaks if "peak_gflops" in p), default=np.nan)
  rows = summarize_timing(raws, peak_gflops)
  memory = [] if args.no_memory else run_memory(args, configs)
  for m in memory:
    m["case"] = f"{m['cell']}/{m['config']}"
  load.append(os.getloadavg()[0])

  summary = summary_table(rows, args.impls)
  sections = [
      "# bptt_jax benchmark", machine_line(load), peak_line(peaks),
      "## Median time per call, ms (time ÷ PyTorch's with the same allocator)", summary,
      "## Spread, ratios and compile time", detail_table(rows), RATIO_NOTE]
  if memory:
    sections += ["## Memory, train step", MEMORY_NOTE, memory_table(memory, args.impls, "case")]
  failed = failures(peaks + raws + memory)
  if failed:
    sections += ["## Failed processes (errors in benchmark.json)", failed]
  out = args.out
  report = write_report(f"{out}/benchmark.md", sections)
  plot_ratios(rows, args.impls, f"{out}/benchmark.png")
  figures = {"timing": rows, "memory": memory, "matmul_peak": peaks, "raw_timing": raws,
             "peak_gflops": peak_gflops, "load_average": load}
  common.write_json(f"{out}/benchmark.json", figures, args)
  print("\n" + report)


# ----------------------------------------------------------------------------
# Profile: where the time of a JAX step goes.

PROFILE_STEPS = 3
PROFILE_TOP = 12


def profile_section(raw: dict) -> str:
  """A heading, the step time and page faults, and the top kernels of one profiled case."""
  title = f"### {raw['cell']}/{raw['config']}/{raw['mode']}, {raw['impl']}"
  if "error" in raw:
    return title + "\n\nfailed: " + raw["error"].splitlines()[-1]
  step_ms = float(np.median(raw["step_ms"]))
  kernels = sorted(raw["kernels"].items(), key=lambda kv: -kv[1]["us"])
  table = [[name + (" (loop: includes its body)" if name.startswith("while") else ""),
            "(loop state)" if k["shape"].startswith("(") else f"`{k['shape']}`",
            f"{k['calls']:g}", f"{k['us'] / 1e3:.2f}", f"{100 * k['us'] / 1e3 / step_ms:.0f}"]
           for name, k in kernels[:PROFILE_TOP]]
  lines = [title, f"Step {step_ms:.1f} ms (median of {len(raw['step_ms'])}, untraced); "
           f"{raw['minor_faults_per_step']:,.0f} minor page faults per step.",
           md_table(["XLA kernel", "result", "calls / step", "ms / step", "% of step"], table)]
  return "\n\n".join(lines)


def profile(args, configs) -> None:
  """Profiles each (cell, config, mode, JAX impl) in its own process; writes profile.md/json."""
  load, raws = [os.getloadavg()[0]], []
  impls = [i for i in args.impls if i not in TORCH_IMPLS]
  for cell in args.cells:
    for config, dims in configs.items():
      for mode in args.modes:
        for impl in impls:
          raw = spawn({"task": "profile", "cell": cell, "config": config, "dims": list(dims),
                       "mode": mode, "impl": impl, "steps": PROFILE_STEPS})
          raws.append(raw)
          print(f"  profiled {cell}/{config}/{mode} {impl}", flush=True)
  load.append(os.getloadavg()[0])
  sections = ["# Where the time of a step goes", machine_line(load),
              f"Each case in its own process: {PROFILE_STEPS} plain steps give the "
              "step time and the minor page faults (first touches of fresh memory), then "
              f"{PROFILE_STEPS} steps under jax.profiler give each XLA kernel's time per step "
              "(a kernel inside a loop is summed over its iterations)."]
  sections += [profile_section(raw) for raw in raws]
  write_report(f"{args.out}/profile.md", sections)
  common.write_json(f"{args.out}/profile.json", {"profiles": raws, "load_average": load}, args)


# ----------------------------------------------------------------------------
# Memory against T.


def expected_rise_mb(done: list, impl: str, T: int) -> float | None:
  """The last measured RSS rise of ``impl``, scaled linearly to ``T`` (None if none yet)."""
  points = [d for d in done if d["impl"] == impl and "rss_rise_mb" in d]
  if not points:
    return None
  last = points[-1]
  return last["rss_rise_mb"] * T / last["dims"][1]


def memory_vs_T(args) -> None:
  """LSTM train step at growing T: XLA temp, peak RSS rise and step time, a process each."""
  base = QUICK_CONFIGS["tiny"] if args.quick else MEMORY_VS_T_DIMS
  lengths = args.lengths or ([100, 1000] if args.quick else MEMORY_VS_T_LENGTHS)
  load, raws = [os.getloadavg()[0]], []
  for T in lengths:
    dims = base._replace(T=T)
    for impl in args.impls:
      expected = expected_rise_mb(raws, impl, T)
      if expected is not None and expected > MEMORY_FRACTION * available_mb():
        raw = dict(memory_task("lstm", f"T={T}", dims, impl),
                   skipped=f"expects {expected:.0f} MB, {available_mb():.0f} MB free")
      else:
        raw = spawn(memory_task("lstm", f"T={T}", dims, impl))
      raws.append(raw)
      print(f"  T={T:<7d} {impl:16s} {describe_memory(raw)}", flush=True)

  load.append(os.getloadavg()[0])
  table = []
  for raw in raws:
    measured = "error" not in raw and "skipped" not in raw
    table.append([raw["dims"][1], raw["impl"], fmt(raw.get("xla_temp_mb"), ".3g"),
                  f"{raw['rss_rise_mb']:.1f}" if measured else raw.get("skipped", "failed"),
                  f"{step_time_ms(raw):.1f}" if measured else "—"])
  B, _, D, H = base
  sections = [
      f"# Memory against T: LSTM train step, B={B}, D={D}, H={H}", machine_line(load),
      "XLA temp: planned temporary buffers of the jitted train step (JAX only). "
      "RSS rise: measured peak RSS (ru_maxrss) minus the RSS just before the first step. "
      f"Step time: median of steps 2..{MEMORY_STEPS}.",
      md_table(["T", "impl", "XLA temp MB", "peak RSS rise MB", "ms / step"], table)]
  report = write_report(f"{args.out}/memory_vs_T.md", sections)
  plot_memory_vs_T(raws, args.impls, f"{args.out}/memory_vs_T.png")
  common.write_json(f"{args.out}/memory_vs_T.json",
                    {"memory_vs_T": raws, "load_average": load}, args)
  print("\n" + report)


def plot_memory_vs_T(raws: list, impls: list, path: str) -> None:
  import matplotlib.pyplot as plt

  panels = [("xla_temp_mb", "XLA temp MB (planned)"), ("rss_rise_mb", "peak RSS rise MB"),
            ("step_ms", "ms per train step")]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, (key, label) in zip(axes, panels, strict=True):
    for impl in impls:
      points = [(r["dims"][1], step_time_ms(r) if key == "step_ms" else r[key])
                for r in raws if r["impl"] == impl and key in r and "skipped" not in r]
      if points:
        ax.plot(*zip(*points, strict=True), "o-", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  common.save_plot(fig, path)


# ----------------------------------------------------------------------------


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cells", nargs="+", choices=CELLS, default=None,
                      help="default: all (--quick: lstm)")
  parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                      help="(B, T, D, H): " + ", ".join(f"{k} {tuple(v)}"
                                                        for k, v in CONFIGS.items()))
  parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
  parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=None,
                      help=f"default {' '.join(DEFAULT_IMPLS)}; with --memory-vs-T "
                      f"{' '.join(MEMORY_VS_T_IMPLS)}; with --quick {' '.join(QUICK_IMPLS)}")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of processes")
  parser.add_argument("--iters", type=int, default=None,
                      help=f"timed iterations per process (default: about {TIME_BUDGET_S:g} s)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: LSTM at (B, T, D, H) = (4, 10, 4, 8), one impl per "
                      "framework, 1 round, 2 iterations")
  parser.add_argument("--out", default=None, help="output folder (default results/benchmark/)")
  parser.add_argument("--memory-vs-T", dest="memory_vs_T", action="store_true",
                      help="only the LSTM memory-against-T section")
  parser.add_argument("--lengths", type=int, nargs="+", default=None,
                      help=f"values of T for --memory-vs-T (default {MEMORY_VS_T_LENGTHS})")
  parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
  parser.add_argument("--profile", action="store_true",
                      help="only profile the JAX impls: per-kernel time and page faults per step")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return parser.parse_args()


def main():
  args = parse_args()
  if args.worker:
    run_worker(json.loads(args.worker))
    return
  if args.quick:
    args.rounds, args.iters, args.cells = 1, 2, args.cells or ["lstm"]
  configs = QUICK_CONFIGS if args.quick else {c: CONFIGS[c] for c in args.configs}
  args.cells = args.cells or list(CELLS)
  default_impls = (MEMORY_VS_T_IMPLS if args.memory_vs_T else QUICK_IMPLS if args.quick
                   else DEFAULT_IMPLS)
  args.impls = args.impls or default_impls
  if importlib.util.find_spec("torch") is None:
    print("PyTorch is not installed: skipping " + ", ".join(sorted(TORCH_IMPLS)))
    args.impls = [i for i in args.impls if i not in TORCH_IMPLS]
  args.out = common.results_dir("benchmark", args.out)
  if args.memory_vs_T:
    memory_vs_T(args)
  elif args.profile:
    profile(args, configs)
  else:
    suite(args, configs)


if __name__ == "__main__":
  main()
