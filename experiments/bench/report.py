"""What the driver makes of the workers' results: pooled medians and ratios, tables, plots.

Every function here takes the records :func:`bench.worker.spawn` returns (the
task merged with its result, or with an ``error``) and runs in the driver.
"""

import os

import common
import numpy as np

from .cases import IMPLS, Dims, flops
from .worker import MEMORY_STEPS

PROFILE_TOP = 12  # kernels listed per profiled case


# ----------------------------------------------------------------------------
# Pooling.


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
      tuned = "MALLOC_ARENA_MAX" in IMPLS[row["impl"]].env  # not the kernel switches
      same = ref + ("_malloc" if tuned else "")
      other = by_key.get((row["cell"], row["config"], row["mode"], same), {})
      if "median_ms" in row and "median_ms" in other:
        row[f"ratio_{ref}"] = row["median_ms"] / other["median_ms"]
  return rows


# ----------------------------------------------------------------------------
# One line per process, printed as the run goes.


def describe_time(raw: dict) -> str:
  if "error" in raw:
    return "FAILED " + raw["error"].splitlines()[-1]
  return f"{np.median(raw['times_ms']):9.3f} ms  (n={len(raw['times_ms'])})"


def describe_memory(raw: dict) -> str:
  if "error" in raw:
    return "FAILED " + raw["error"].splitlines()[-1]
  temp = f"XLA temp {raw['xla_temp_mb']:8.3g} MB  " if "xla_temp_mb" in raw else ""
  if "skipped" in raw:
    return temp + "skipped: " + raw["skipped"]
  return temp + f"RSS rise {raw['rss_rise_mb']:8.1f} MB  step {step_time_ms(raw):.1f} ms"


# ----------------------------------------------------------------------------
# Markdown.


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


def memory_vs_T_table(raws: list) -> str:
  """One row per (T, impl): XLA temp MB, peak RSS rise MB, ms per step."""
  table = []
  for raw in raws:
    measured = "error" not in raw and "skipped" not in raw
    table.append([raw["dims"][1], raw["impl"], fmt(raw.get("xla_temp_mb"), ".3g"),
                  f"{raw['rss_rise_mb']:.1f}" if measured else raw.get("skipped", "failed"),
                  f"{step_time_ms(raw):.1f}" if measured else "—"])
  return md_table(["T", "impl", "XLA temp MB", "peak RSS rise MB", "ms / step"], table)


def parallel_vs_T_table(raws: list) -> str:
  """One row per (T, cell, impl): XLA temp MB, peak RSS rise MB, ms per step, ÷ fused GRU."""
  gru_ms = {raw["dims"][1]: step_time_ms(raw) for raw in raws
            if (raw["cell"], raw["impl"]) == ("gru", "bptt_jax") and "step_ms" in raw}
  table = []
  for raw in raws:
    measured = "step_ms" in raw
    T = raw["dims"][1]
    ms = step_time_ms(raw) if measured else None
    ratio = fmt(ms / gru_ms[T], ".3f") if measured and T in gru_ms else "—"
    table.append([T, raw["cell"], raw["impl"], fmt(raw.get("xla_temp_mb"), ".4g"),
                  f"{raw['rss_rise_mb']:.1f}" if measured
                  else raw.get("skipped", raw.get("error", "failed")[:60]),
                  fmt(ms, ".1f"), ratio])
  return md_table(["T", "cell", "impl", "XLA temp MB", "peak RSS rise MB", "ms / step",
                   "÷ fused GRU"], table)


def describe_deer(raw: dict) -> str:
  if "error" in raw:
    return "failed: " + raw["error"][-200:]
  return "  ".join(f"{m}: {raw[m]['iterations']} it, converged {raw[m]['converged']}, "
                   f"dev {raw[m]['max_deviation']:.1e}, {raw[m]['forward_ms']:.0f} ms"
                   for m in ("deer", "quasi_deer"))


def deer_table(raws: list) -> str:
  """One row per (T, scale): iterations, convergence, deviation and time of each method."""
  table = []
  for raw in raws:
    row = [raw["dims"][1], raw["scale"]]
    for m in ("deer", "quasi_deer"):
      r = raw.get(m)
      row += (["failed"] * 4 if r is None else
              [r["iterations"], "yes" if r["converged"] else "no (fell back)",
               f"{r['max_deviation']:.1e}", f"{r['forward_ms']:.0f}"])
    row += [fmt(raw.get("sequential_ms"), ".0f")]
    table.append(row)
  return md_table(["T", "U scale", "DEER it", "DEER converged", "DEER max dev", "DEER ms",
                   "quasi it", "quasi converged", "quasi max dev", "quasi ms",
                   "sequential ms"], table)


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
  return (f"float32 matmul peak measured in this run (jax.jit, best of {measured[0]['repeats']} "
          f"per process, best over {len(peaks)} processes): {sizes} GFLOP/s; % peak uses the "
          "best.")


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


def write_report(path: str, sections: list) -> str:
  text = "\n\n".join(sections) + "\n"
  with open(path, "w") as f:
    f.write(text)
  print(f"wrote {os.path.relpath(path, common.ROOT)}")
  return text


# ----------------------------------------------------------------------------
# Plots.


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
