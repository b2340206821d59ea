"""Speed and memory of bptt_jax against Flax and PyTorch, on this machine.

Every measurement runs in its own process (JAX's and PyTorch's thread pools
fight inside one), and the processes alternate between implementations over
several rounds: round r times every implementation once per case, in an order
rotated by r. Each process compiles or warms up, then times N iterations and
prints one JSON line; this driver pools the iterations of all rounds into a
median and an interquartile range.

Implementations (on CPU; ``unroll``'s defaults there are no hoisting, fused):
  bptt_jax           bptt_jax.unroll defaults: the written-out CPU kernels (where they
                     apply), else the hand-written fused backward
  bptt_jax_bf16      the same step in mixed precision: float32 params, unroll(dtype=bfloat16)
                     (carry and activations bfloat16), readout and loss in float32
  bptt_jax_autodiff  unroll(fused=False): autodiff through lax.scan, per-step projection
  bptt_jax_hoisted   unroll(fused=False, hoist=True): one input matmul before the scan
  bptt_jax_onednn    oneDNN's whole-sequence RNN/LSTM/GRU kernels (BPTT_JAX_KERNELS=all;
                     also _malloc, and _omp1 with one OpenMP thread)
  bptt_jax_fused     BPTT_JAX_KERNELS=0: the pure-JAX paths (the hand-written fused backward)
  bptt_jax_kernel    BPTT_JAX_KERNELS=fused: the written-out kernels (also _malloc)
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

The parts live in ``experiments/bench/``: ``cases`` (the shapes, implementations
and steps), ``worker`` (the measuring process), ``profile`` (--profile) and
``report`` (tables and plots).

  python experiments/benchmark.py                 # the full suite (about an hour)
  python experiments/benchmark.py --quick         # smoke test, under a minute
  python experiments/benchmark.py --cells lstm --configs small --modes train --rounds 1
  python experiments/benchmark.py --memory-vs-T   # LSTM memory and time against T only
  python experiments/benchmark.py --profile --cells lstm --configs long --modes train \\
      --impls bptt_jax bptt_jax_malloc flax    # per-kernel times and page faults per step
  python experiments/benchmark.py --parallel-vs-T   # minGRU/minLSTM/DEER against the fused
                                                     # GRU/LSTM, T = 100 .. 100,000
  python experiments/benchmark.py --deer-iterations # DEER iterations against T and weight scale

Parallel in time (``--parallel-vs-T``; (B, D, H) = (16, 32, 256), train step, a
process per (cell, impl, T), each giving XLA temp, peak RSS rise and step time):
  bptt_jax_parallel   unroll(method="parallel"): minGRU/minLSTM by jax.lax.associative_scan
  bptt_jax_sequential unroll(method="sequential"): minGRU/minLSTM by jax.lax.scan
  bptt_jax_deer       unroll(method="deer"): GRU by Newton's method, full Jacobians
  bptt_jax_quasi_deer unroll(method="quasi_deer"): GRU, diagonal Jacobians
A point is skipped when the previous T's memory or time, scaled linearly in T, would
exceed the free memory or --max-seconds.
"""

import argparse
import importlib.util
import os

import common  # results folder, JSON and plots; puts the checkout on sys.path
import numpy as np
from bench import cases, report, worker
from bench.profile import PROFILE_STEPS

# Memory against T: LSTM, B = 16, H = 256, D = 32.
MEMORY_VS_T_DIMS = cases.Dims(16, 0, 32, 256)
MEMORY_VS_T_LENGTHS = [1000, 10000, 100000]
PARALLEL_VS_T_LENGTHS = [100, 1000, 2000, 10000, 100000]
DEER_ITER_LENGTHS = [100, 1000, 10000]
DEER_ITER_SCALES = [0.5, 1.0, 1.5, 2.0, 3.0]
PEAK_SIZES, QUICK_PEAK_SIZES = (2048, 4096), (512,)  # n of the [n, n] matmuls for the peak


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cells", nargs="+", choices=cases.CELLS, default=None,
                      help=f"default: {' '.join(cases.DEFAULT_CELLS)} (--quick: lstm)")
  parser.add_argument("--configs", nargs="+", choices=list(cases.CONFIGS),
                      default=list(cases.CONFIGS),
                      help="(B, T, D, H): " + ", ".join(f"{k} {tuple(v)}"
                                                        for k, v in cases.CONFIGS.items()))
  parser.add_argument("--modes", nargs="+", choices=cases.MODES, default=list(cases.MODES))
  parser.add_argument("--impls", nargs="+", choices=list(cases.IMPLS), default=None,
                      help=f"default {' '.join(cases.DEFAULT_IMPLS)}; with --memory-vs-T "
                      f"{' '.join(cases.MEMORY_VS_T_IMPLS)}; with --quick "
                      f"{' '.join(cases.QUICK_IMPLS)}")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of processes")
  parser.add_argument("--iters", type=int, default=None,
                      help=f"timed iterations per process (default: about "
                      f"{worker.TIME_BUDGET_S:g} s)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: LSTM at (B, T, D, H) = (4, 10, 4, 8), one impl per "
                      "framework, 1 round, 2 iterations")
  parser.add_argument("--out", default=None, help="output folder (default results/benchmark/)")
  parser.add_argument("--memory-vs-T", dest="memory_vs_T", action="store_true",
                      help="only the LSTM memory-against-T section")
  parser.add_argument("--lengths", type=int, nargs="+", default=None,
                      help=f"values of T for --memory-vs-T (default {MEMORY_VS_T_LENGTHS})")
  parser.add_argument("--parallel-vs-T", dest="parallel_vs_T", action="store_true",
                      help="only minGRU/minLSTM (parallel and sequential scans) and DEER/"
                      "quasi-DEER GRU against the fused GRU and LSTM, at growing T")
  parser.add_argument("--deer-iterations", dest="deer_iterations", action="store_true",
                      help="only the DEER / quasi-DEER iteration counts against T and scale")
  parser.add_argument("--pairs", nargs="+", default=None,
                      help="--parallel-vs-T: only these cell/impl pairs, e.g. "
                      "min_gru/bptt_jax_sequential gru/bptt_jax (default: all)")
  parser.add_argument("--max-seconds", type=float, default=600.0,
                      help="--parallel-vs-T: skip a point expected to take longer (s)")
  parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
  parser.add_argument("--profile", action="store_true",
                      help="only profile the JAX impls: per-kernel time and page faults per step")
  return parser.parse_args()


# ----------------------------------------------------------------------------
# Run: one worker process per measurement.


def run_timing(args, configs) -> tuple[list, list]:
  """All rounds: a peak-matmul process, then every case with the impls in rotated order."""
  raws, peaks = [], []
  sizes = QUICK_PEAK_SIZES if args.quick else PEAK_SIZES
  for r in range(args.rounds):
    peaks.append(worker.spawn(worker.peak_task(sizes)))
    print(f"round {r + 1}/{args.rounds}: matmul peak "
          f"{peaks[-1].get('peak_gflops', float('nan')):.1f} GFLOP/s", flush=True)
    order = args.impls[r % len(args.impls):] + args.impls[:r % len(args.impls)]
    for cell in args.cells:
      for config, dims in configs.items():
        for mode in args.modes:
          for impl in order:
            raw = worker.spawn(worker.time_task(cell, config, dims, mode, impl, args.iters, r))
            raws.append(raw)
            print(f"  {cell}/{config}/{mode} {impl:18s} {report.describe_time(raw)}",
                  flush=True)
  return raws, peaks


def run_memory(args, configs) -> list:
  raws = []
  for cell in args.cells:
    for config, dims in configs.items():
      for impl in args.impls:
        raw = worker.spawn(worker.memory_task(cell, config, dims, impl))
        raws.append(raw)
        print(f"  memory {cell}/{config} {impl:18s} {report.describe_memory(raw)}", flush=True)
  return raws


def expected_rise_mb(done: list, impl: str, T: int) -> float | None:
  """The last measured RSS rise of ``impl``, scaled linearly to ``T`` (None if none yet)."""
  points = [d for d in done if d["impl"] == impl and "rss_rise_mb" in d]
  if not points:
    return None
  last = points[-1]
  return last["rss_rise_mb"] * T / last["dims"][1]


# ----------------------------------------------------------------------------
# The three runs, each with its report.


def suite(args, configs) -> None:
  """Timing rounds, then memory; writes benchmark.json, .md and .png."""
  load = [os.getloadavg()[0]]
  raws, peaks = run_timing(args, configs)
  peak_gflops = max((p["peak_gflops"] for p in peaks if "peak_gflops" in p), default=np.nan)
  rows = report.summarize_timing(raws, peak_gflops)
  memory = [] if args.no_memory else run_memory(args, configs)
  for m in memory:
    m["case"] = f"{m['cell']}/{m['config']}"
  load.append(os.getloadavg()[0])

  sections = [
      "# bptt_jax benchmark", report.machine_line(load), report.peak_line(peaks),
      "## Median time per call, ms (time ÷ PyTorch's with the same allocator)",
      report.summary_table(rows, args.impls),
      "## Spread, ratios and compile time", report.detail_table(rows), report.RATIO_NOTE]
  if memory:
    sections += ["## Memory, train step", report.MEMORY_NOTE,
                 report.memory_table(memory, args.impls, "case")]
  failed = report.failures(peaks + raws + memory)
  if failed:
    sections += ["## Failed processes (errors in benchmark.json)", failed]
  out = args.out
  text = report.write_report(f"{out}/benchmark.md", sections)
  report.plot_ratios(rows, args.impls, f"{out}/benchmark.png")
  figures = {"timing": rows, "memory": memory, "matmul_peak": peaks, "raw_timing": raws,
             "peak_gflops": peak_gflops, "load_average": load}
  common.write_json(f"{out}/benchmark.json", figures, args)
  print("\n" + text)


def profile(args, configs) -> None:
  """Profiles each (cell, config, mode, JAX impl) in its own process; writes profile.md/json."""
  load, raws = [os.getloadavg()[0]], []
  impls = [i for i in args.impls if i not in cases.TORCH_IMPLS]
  for cell in args.cells:
    for config, dims in configs.items():
      for mode in args.modes:
        for impl in impls:
          raw = worker.spawn({"task": "profile", "cell": cell, "config": config,
                              "dims": list(dims), "mode": mode, "impl": impl,
                              "steps": PROFILE_STEPS})
          raws.append(raw)
          print(f"  profiled {cell}/{config}/{mode} {impl}", flush=True)
  load.append(os.getloadavg()[0])
  sections = ["# Where the time of a step goes", report.machine_line(load),
              f"Each case in its own process: {PROFILE_STEPS} plain steps give the "
              "step time and the minor page faults (first touches of fresh memory), then "
              f"{PROFILE_STEPS} steps under jax.profiler give each XLA kernel's time per step "
              "(a kernel inside a loop is summed over its iterations)."]
  sections += [report.profile_section(raw) for raw in raws]
  report.write_report(f"{args.out}/profile.md", sections)
  common.write_json(f"{args.out}/profile.json", {"profiles": raws, "load_average": load}, args)


def memory_vs_T(args) -> None:
  """LSTM train step at growing T: XLA temp, peak RSS rise and step time, a process each."""
  base = cases.QUICK_CONFIGS["tiny"] if args.quick else MEMORY_VS_T_DIMS
  lengths = args.lengths or ([100, 1000] if args.quick else MEMORY_VS_T_LENGTHS)
  load, raws = [os.getloadavg()[0]], []
  for T in lengths:
    dims = base._replace(T=T)
    for impl in args.impls:
      task = worker.memory_task("lstm", f"T={T}", dims, impl)
      expected = expected_rise_mb(raws, impl, T)
      if expected is not None and expected > worker.MEMORY_FRACTION * worker.available_mb():
        raw = dict(task, skipped=f"expects {expected:.0f} MB, {worker.available_mb():.0f} MB free")
      else:
        raw = worker.spawn(task)
      raws.append(raw)
      print(f"  T={T:<7d} {impl:16s} {report.describe_memory(raw)}", flush=True)

  load.append(os.getloadavg()[0])
  B, _, D, H = base
  sections = [
      f"# Memory against T: LSTM train step, B={B}, D={D}, H={H}", report.machine_line(load),
      "XLA temp: planned temporary buffers of the jitted train step (JAX only). "
      "RSS rise: measured peak RSS (ru_maxrss) minus the RSS just before the first step. "
      f"Step time: median of steps 2..{worker.MEMORY_STEPS}.",
      report.memory_vs_T_table(raws)]
  text = report.write_report(f"{args.out}/memory_vs_T.md", sections)
  report.plot_memory_vs_T(raws, args.impls, f"{args.out}/memory_vs_T.png")
  common.write_json(f"{args.out}/memory_vs_T.json",
                    {"memory_vs_T": raws, "load_average": load}, args)
  print("\n" + text)


def expected_seconds(done: list, cell: str, impl: str, T: int) -> float | None:
  """The last measured time of (cell, impl) for the memory steps, scaled linearly to ``T``."""
  points = [d for d in done if (d["cell"], d["impl"]) == (cell, impl) and "step_ms" in d]
  if not points:
    return None
  last = points[-1]
  return sum(last["step_ms"]) / 1e3 * T / last["dims"][1]


def parallel_vs_T(args) -> None:
  """Train steps of the parallel-in-time paths against the fused GRU/LSTM at growing T."""
  base = cases.QUICK_CONFIGS["tiny"] if args.quick else MEMORY_VS_T_DIMS
  lengths = args.lengths or ([10, 100] if args.quick else PARALLEL_VS_T_LENGTHS)
  pairs = cases.PARALLEL_VS_T_CASES
  if args.pairs:
    unknown = set(args.pairs) - {f"{c}/{i}" for c, i in pairs}
    if unknown:
      raise SystemExit(f"unknown --pairs {sorted(unknown)}; choose from "
                       + " ".join(f"{c}/{i}" for c, i in pairs))
    pairs = [(c, i) for c, i in pairs if f"{c}/{i}" in args.pairs]
  load, raws = [os.getloadavg()[0]], []
  for T in lengths:
    dims = base._replace(T=T)
    for cell, impl in pairs:
      task = worker.memory_task(cell, f"T={T}", dims, impl)
      rise = expected_rise_mb([r for r in raws if r["cell"] == cell], impl, T)
      seconds = expected_seconds(raws, cell, impl, T)
      if rise is not None and rise > worker.MEMORY_FRACTION * worker.available_mb():
        raw = dict(task, skipped=f"expects {rise:.0f} MB, {worker.available_mb():.0f} MB free")
      elif seconds is not None and seconds > args.max_seconds:
        raw = dict(task, skipped=f"expects {seconds:.0f} s > --max-seconds {args.max_seconds:g}")
      elif any(r.get("skipped") or "error" in r for r in raws
               if (r["cell"], r["impl"]) == (cell, impl)):
        raw = dict(task, skipped="skipped or failed at a shorter T")
      else:
        raw = worker.spawn(task)
      raws.append(raw)
      print(f"  T={T:<7d} {cell:9s} {impl:20s} {report.describe_memory(raw)}", flush=True)
  load.append(os.getloadavg()[0])
  B, _, D, H = base
  sections = [
      f"# Parallel in time against T: train step, B={B}, D={D}, H={H}",
      report.machine_line(load),
      "Each entry a process: XLA temp (planned temporary buffers, MB), peak RSS rise (MB) and "
      f"the median time of steps 2..{worker.MEMORY_STEPS} (ms); the ratio is the step time "
      "over the fused GRU's (bptt_jax defaults) at the same T.",
      report.parallel_vs_T_table(raws)]
  text = report.write_report(f"{args.out}/parallel_vs_T.md", sections)
  common.write_json(f"{args.out}/parallel_vs_T.json",
                    {"parallel_vs_T": raws, "load_average": load}, args)
  print("\n" + text)


def deer_iterations(args) -> None:
  """DEER and quasi-DEER GRU iterations to converge, against T and the recurrent scale."""
  base = cases.QUICK_CONFIGS["tiny"] if args.quick else cases.Dims(16, 0, 32, 64)
  lengths = args.lengths or ([10, 100] if args.quick else DEER_ITER_LENGTHS)
  load, raws = [os.getloadavg()[0]], []
  for T in lengths:
    for scale in DEER_ITER_SCALES:
      raw = worker.spawn({"task": "deer_iters", "cell": "gru", "dims": list(base._replace(T=T)),
                          "scale": scale})
      raws.append(raw)
      print(f"  T={T:<6d} scale={scale:<4g} {report.describe_deer(raw)}", flush=True)
  load.append(os.getloadavg()[0])
  B, _, D, H = base
  sections = [
      f"# DEER iterations: GRU, B={B}, D={D}, H={H}, U scaled", report.machine_line(load),
      "Newton iterations until max |h_t - f(h_{t-1}, x_t)| <= 1.2e-5 (float32, the default "
      "tol), cap 200; the largest deviation from the sequential scan's trajectory; the "
      "forward time of one solve. GRU initialized as usual (orthogonal U), then U multiplied "
      "by the scale; inputs standard normal.",
      report.deer_table(raws)]
  text = report.write_report(f"{args.out}/deer_iterations.md", sections)
  common.write_json(f"{args.out}/deer_iterations.json",
                    {"deer_iterations": raws, "load_average": load}, args)
  print("\n" + text)


def main():
  args = parse_args()
  if args.quick:
    args.rounds, args.iters, args.cells = 1, 2, args.cells or ["lstm"]
  configs = cases.QUICK_CONFIGS if args.quick else {c: cases.CONFIGS[c] for c in args.configs}
  args.cells = args.cells or list(cases.DEFAULT_CELLS)
  default_impls = (cases.MEMORY_VS_T_IMPLS if args.memory_vs_T
                   else cases.QUICK_IMPLS if args.quick else cases.DEFAULT_IMPLS)
  args.impls = args.impls or default_impls
  if importlib.util.find_spec("torch") is None:
    print("PyTorch is not installed: skipping " + ", ".join(sorted(cases.TORCH_IMPLS)))
    args.impls = [i for i in args.impls if i not in cases.TORCH_IMPLS]
  args.out = common.results_dir("benchmark", args.out)
  if args.parallel_vs_T:
    parallel_vs_T(args)
  elif args.deer_iterations:
    deer_iterations(args)
  elif args.memory_vs_T:
    memory_vs_T(args)
  elif args.profile:
    profile(args, configs)
  else:
    suite(args, configs)


if __name__ == "__main__":
  main()
