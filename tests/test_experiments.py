"""Every experiment script's --quick mode runs to the end and writes its figures."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "gradient_flow": ["gradient_flow.json", "gradient_flow.png"],
    "adding_problem": ["adding_problem.json", "adding_problem.png"],
    "truncation_bias": ["truncation_bias.json", "truncation_bias.png"],
    "seed_examples": ["seed_examples.json"],
    "forecast": ["forecast.json", "elnino.png"],
    "sentiment": ["sentiment.json", "learning_curves.png"],
    "char_lm": ["char_lm.json", "loss.png", "samples.txt"],
    "benchmark": ["benchmark.json", "benchmark.md"],
}


def run_quick(name, tmp_path, *args):
  """Runs ``experiments/<name>.py --quick --out tmp_path *args``; fails with its output."""
  env = {**os.environ, "JAX_ENABLE_X64": "0", "PYTHONWARNINGS": "ignore"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--quick",
       "--out", str(tmp_path), *args],
      capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_quick_mode_runs_and_writes_results(name, tmp_path):
  run_quick(name, tmp_path)
  for filename in SCRIPTS[name]:
    path = tmp_path / filename
    assert path.exists(), f"{name} did not write {filename}; wrote {os.listdir(tmp_path)}"
    if filename.endswith(".json"):
      record = json.loads(path.read_text())
      assert record.get("figures") or record.get("results"), f"{filename} holds no figures"


def test_benchmark_profile_reports_kernels_and_page_faults(tmp_path):
  run_quick("benchmark", tmp_path, "--profile", "--modes", "train", "--impls", "bptt_jax")
  [raw] = json.loads((tmp_path / "profile.json").read_text())["figures"]["profiles"]
  assert "error" not in raw, raw.get("error")
  kernels = raw["kernels"]
  loops = {name: k for name, k in kernels.items() if name.startswith("while")}
  assert len(loops) >= 2, sorted(kernels)  # the forward and the backward loop
  # The LSTM's loops run once per step; kernels inside them run T = 10 times per step.
  assert all(k["calls"] == 1 for k in loops.values())
  assert max(k["calls"] for k in kernels.values()) == 10
  assert all(k["us"] > 0 for k in kernels.values())
  assert raw["minor_faults_per_step"] >= 0
  assert "### lstm/tiny/train, bptt_jax" in (tmp_path / "profile.md").read_text()


def test_benchmark_bf16_step_is_timed_and_keeps_the_float32_loss(tmp_path):
  run_quick("benchmark", tmp_path, "--modes", "train", "--impls", "bptt_jax", "bptt_jax_bf16",
            "--no-memory")
  timing = json.loads((tmp_path / "benchmark.json").read_text())["figures"]["timing"]
  rows = {r["impl"]: r for r in timing}
  f32, bf16 = rows["bptt_jax"], rows["bptt_jax_bf16"]
  assert "median_ms" in bf16, bf16["errors"]
  assert math.isfinite(bf16["median_ms"]) and bf16["median_ms"] > 0
  # The loss of the first step: the same params and data, before any update.
  [[f32_loss, _]], [[bf16_loss, _]] = f32["losses"], bf16["losses"]
  assert bf16_loss == pytest.approx(f32_loss, rel=5e-2)
  assert bf16_loss != f32_loss  # the recurrence really ran in bfloat16
  assert "bptt_jax_bf16 ms" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_ratios_pair_runs_with_the_same_allocator(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
  from bench import report

  def raw(impl, ms):
    return {"cell": "lstm", "config": "small", "mode": "train", "impl": impl,
            "dims": [1, 1, 1, 1], "times_ms": [ms], "losses": [[1.0, 1.0]]}

  rows = report.summarize_timing(
      [raw("bptt_jax", 10.0), raw("bptt_jax_malloc", 6.0), raw("torch", 20.0),
       raw("torch_malloc", 4.0), raw("flax", 5.0), raw("flax_malloc", 12.0)], peak_gflops=1.0)
  by_impl = {r["impl"]: r for r in rows}
  assert by_impl["bptt_jax"]["ratio_torch"] == pytest.approx(0.5)
  assert by_impl["bptt_jax"]["ratio_flax"] == pytest.approx(2.0)
  assert by_impl["bptt_jax_malloc"]["ratio_torch"] == pytest.approx(1.5)
  assert by_impl["bptt_jax_malloc"]["ratio_flax"] == pytest.approx(0.5)
