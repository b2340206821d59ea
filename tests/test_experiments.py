"""Every experiment script's --quick mode runs to the end and writes its figures."""

import json
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


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_quick_mode_runs_and_writes_results(name, tmp_path):
  env = {**os.environ, "JAX_ENABLE_X64": "0", "PYTHONWARNINGS": "ignore"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--quick",
       "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for filename in SCRIPTS[name]:
    path = tmp_path / filename
    assert path.exists(), f"{name} did not write {filename}; wrote {os.listdir(tmp_path)}"
    if filename.endswith(".json"):
      record = json.loads(path.read_text())
      assert record.get("figures") or record.get("results"), f"{filename} holds no figures"
