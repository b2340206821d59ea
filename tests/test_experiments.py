"""Every experiment script's --quick mode runs to the end and writes its figures.

Each quick run is short (tens of updates, or seconds of training), so the checks
are those its budget supports: every figure is finite and in its range, the
baselines written beside it are what they should be, and a model beats chance
where the quick run is long enough to learn (read off each script's --quick
output).
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(name, tmp_path, *args):
  """Runs ``experiments/<name>.py --quick --out tmp_path *args``; fails with its output."""
  env = {**os.environ, "JAX_ENABLE_X64": "0", "PYTHONWARNINGS": "ignore"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--quick",
       "--out", str(tmp_path), *args],
      capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def finite(x, lo=-math.inf, hi=math.inf):
  """``x`` is a finite number in ``[lo, hi]``."""
  return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
          and lo <= x <= hi)


def check_gradient_flow(figures, settings):
  for name, row in figures.items():
    assert finite(row["norm_at_T"], 0) and row["norm_at_T"] > 0, (name, row)
    assert finite(row["norm_at_1"], 0), (name, row)
    assert row["ratio_1_to_T"] == pytest.approx(row["norm_at_1"] / row["norm_at_T"], rel=1e-6)
    assert finite(row["growth_per_step"], 0, 1.5), (name, row)
  # The gradient of a tanh RNN decays more slowly as the spectral radius of U grows
  # (measured 0.31, 0.63, 0.80 per step); the IRNN's identity U keeps it (0.95).
  tanh = [figures[f"tanh RNN, radius {r}"]["growth_per_step"] for r in ("0.5", "1.0", "1.5")]
  assert tanh == sorted(tanh) and tanh[0] < 0.5, tanh
  assert figures["IRNN (ReLU, U = I)"]["growth_per_step"] > tanh[1]


def check_adding_problem(figures, settings):
  assert set(figures) == {f"{m}_T{T}" for m in settings["models"] for T in settings["lengths"]}
  for name, row in figures.items():
    # Predicting 1 (the mean of the sum of two U[0, 1] values) has MSE 1/6.
    assert row["baseline_mse"] == pytest.approx(1 / 6, abs=0.05), (name, row)
    assert row["nonfinite_steps"] == 0, (name, row)
    assert finite(row["best_test_mse"], 0, row["test_mse"]), (name, row)
    # 30 updates take every model to about the mean predictor (0.16-0.18), not beyond.
    assert finite(row["test_mse"], 0, 1.25 * row["baseline_mse"]), (name, row)


def check_truncation_bias(figures, settings):
  assert figures["chance"] == pytest.approx(1 / settings["symbols"])
  cost = figures["cost"]
  for config in settings["configs"]:
    label = f"K={config}"
    row = figures[label]
    assert finite(row["test_accuracy"], 0, 1), (label, row)
    assert 1 <= row["epochs"] <= settings["epochs"]
    assert 0 < row["updates"] <= row["epochs"] * cost[label]["updates_per_epoch"], (label, row)
  for label, row in cost.items():
    K = row["K"]
    assert row["updates_per_epoch"] == settings["batches"] * -(-settings["batch_steps"] // K)
    assert finite(row["seconds_per_epoch"], 0) and row["seconds_per_epoch"] > 0, (label, row)
    assert finite(row["temp_memory_mb"], 0) and row["temp_memory_mb"] > 0, (label, row)
  # Full BPTT keeps the whole batch's activations: more memory than chunks of K = 2.
  assert cost["full BPTT"]["K"] == settings["batch_steps"]
  assert cost["full BPTT"]["temp_memory_mb"] > cost["K=2"]["temp_memory_mb"]


def check_seed_examples(figures, settings):
  toy = figures["keras_toy"]
  assert finite(toy["loss_first"], 0)
  assert toy["loss_last"] < toy["loss_first"] and toy["loss_last_lr_3e-2"] < toy["loss_last"]
  # float32 against the notes' loop and against autodiff: rounding only.
  for key in ("forward_max_diff", "bptt_max_diff_W", "bptt_max_diff_U", "bptt_max_diff_b"):
    assert finite(figures[key], 0, 1e-5), (key, figures[key])
  assert figures["tbptt_updates"] == 10  # 100 steps in chunks of 10
  positive, negative = figures["sentiment_toy_scores"]
  assert finite(positive, 0.5, 1) and finite(negative, 0, 0.5)
  # Noise of std 2 on a sine of amplitude 10: well below the series' own spread (~7).
  assert finite(figures["temperature_toy_rmse"], 0, 3.5)


def check_forecast(figures, settings):
  synthetic, elnino = figures["synthetic"], figures["elnino"]
  windows = synthetic["windows"]
  assert sum(windows.values()) == synthetic["points"] - synthetic["window"]  # none dropped
  assert elnino["windows"]["test"] == 12 * settings["test_years"]
  for part in (synthetic, elnino):
    for name, net in part["networks"].items():
      assert len(net["test_rmse_runs"]) == settings["repeats"], name
      assert all(1 <= e <= settings["epochs"] for e in net["best_epochs"]), name
      assert all(finite(r, 0) for r in net["test_rmse_runs"] + net["val_rmse_runs"]), name
  rmse = synthetic["test_rmse"]
  # The noise std 2 is the floor; ARIMA and the last value come close to it. Three
  # epochs leave the network near the mean predictor (7.1), under the sine's amplitude.
  assert finite(rmse["arima"], 1.5, 3) and finite(rmse["naive_last_value"], 1.5, 3), rmse
  assert finite(rmse["lstm"], 0, 10), rmse
  celsius = elnino["test_rmse_celsius"]
  assert celsius["sarima"] < min(celsius["seasonal_naive"], celsius["naive_last_month"]), celsius
  assert finite(celsius["lstm"], 0, 3 * celsius["seasonal_naive"]), celsius


def check_sentiment(figures, settings):
  split = figures["split"]
  assert sum(split.values()) == settings["limit"]
  test = figures["test"]
  for name, row in test.items():
    assert finite(row["accuracy"], 0, 1) and finite(row["macro_f1"], 0, 1), (name, row)
    assert row["accuracy"] * split["test"] == pytest.approx(round(row["accuracy"] * split["test"]))
  # Two epochs are enough to beat the majority class (measured 0.53 and 0.55 against 0.43),
  # and TF-IDF + logistic regression beats both.
  for name in settings["cells"].split(","):
    assert test[name]["accuracy"] > test["majority"]["accuracy"] + 0.03, (name, test)
    curve = figures["networks"][name]
    assert all(finite(a, 0, 1) for a in curve["val_accuracy"])
    # The loss of three classes at chance is ln 3 = 1.099; training goes below it.
    assert curve["train_loss"][-1] < min(curve["train_loss"][0], math.log(3))
  assert test["tfidf_logreg"]["accuracy"] > test["majority"]["accuracy"]


def check_char_lm(figures, settings):
  bpc = figures["bits_per_char"]
  uniform = math.log2(figures["vocabulary_size"])  # 6.5 bits for 93 ids
  for name, row in bpc.items():
    assert finite(row["val"], 0, uniform) and finite(row["test"], 0, uniform), (name, row)
  # Counting: context helps, and Kneser-Ney smoothing beats add-one.
  for part in ("val", "test"):
    assert bpc["bigram (add-one)"][part] < bpc["unigram (add-one)"][part]
    assert bpc["trigram (Kneser-Ney)"][part] < bpc["trigram (add-one)"][part]
  assert figures["lstm_below_kneser_ney_trigram"] == (
      bpc["lstm"]["test"] < bpc["trigram (Kneser-Ney)"]["test"])
  train_chars = figures["split"]["train"]["chars"]
  for name, row in figures["training"].items():
    # Two seconds of training: how far depends on the machine, so no quality bar.
    assert row["updates"] > 0 and finite(row["train_seconds"], 0), (name, row)
    assert 0 < row["chars_seen"] <= row["updates"] * row["batch"] * row["k1"], (name, row)
    # An epoch: the train split's chars - 1 (input, next char) pairs.
    assert row["epochs"] == pytest.approx(row["chars_seen"] / (train_chars - 1)), (name, row)
  files = [set(figures["split"][part]["files"]) for part in ("train", "val", "test")]
  assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])  # held out


def check_benchmark(figures, settings):
  assert figures["timing"] and figures["memory"]
  for row in figures["timing"]:
    case = f"{row['cell']}/{row['config']}/{row['mode']} {row['impl']}"
    assert not row["errors"], (case, row["errors"])
    assert finite(row["min_ms"], 0) and row["min_ms"] > 0, case
    assert row["min_ms"] <= row["median_ms"] <= row["max_ms"], case
  for row in figures["memory"]:
    assert finite(row["rss_rise_mb"]), row
    if row["impl"] != "torch":  # XLA's plan of temporaries: JAX impls only
      assert finite(row["xla_temp_mb"], 0) and row["xla_temp_mb"] > 0, row
    losses = row["losses"]
    assert all(finite(x, 0) for x in losses), row
    assert losses[-1] < losses[0], row  # the train steps train
    # The timed run of the same case starts from the same params and data.
    [timing] = [t for t in figures["timing"]
                if (t["impl"], t["mode"], t["cell"]) == (row["impl"], "train", row["cell"])]
    assert timing["losses"][0][0] == pytest.approx(losses[0], rel=1e-6)
  # The bfloat16 step: the loss of the first step (same params and data, before any
  # update) is float32's within bf16 rounding, and not equal to it.
  rows = {r["impl"]: r for r in figures["timing"] if r["mode"] == "train"}
  [[f32_loss, _]], [[bf16_loss, _]] = rows["bptt_jax"]["losses"], rows["bptt_jax_bf16"]["losses"]
  assert bf16_loss == pytest.approx(f32_loss, rel=5e-2)
  assert bf16_loss != f32_loss  # the recurrence really ran in bfloat16


def check_flax_interop(figures, settings):
  ours, theirs = figures["bptt_jax"], figures["flax"]
  # The same starting weights (converted from Flax's init) and the same batches.
  assert ours["curve"][0][1] == pytest.approx(theirs["curve"][0][1], rel=1e-6)
  assert [s for s, _ in ours["curve"]] == [s for s, _ in theirs["curve"]]
  assert figures["max_test_mse_gap"] < 1e-4, figures["max_test_mse_gap"]
  assert ours["curve"][-1][1] < ours["curve"][0][1]  # it trains
  assert finite(figures["flax_time_over_bptt_jax"], 0)


def check_seq2seq(figures, settings):
  assert set(figures) == {"dates", "addition"}
  for task, part in figures.items():
    assert set(part["models"]) == set(settings["models"]), task
    for name, row in part["models"].items():
      assert row["nonfinite_steps"] == 0, (task, name)
      # Chance per character is 1/V: 20 updates leave the loss near ln V, not beyond.
      assert finite(row["final_train_loss"], 0, 1.5 * math.log(part["target_vocab"])), row
      for test, acc in row["tests"].items():
        assert acc["examples"] == part["test_examples"][test] > 0, (task, name, test)
        for key in ("greedy_exact_match", "beam_exact_match"):
          assert finite(acc[key], 0, 1), (task, name, test, key)
          # A fraction of the test examples: a whole number of them.
          assert acc[key] * acc["examples"] == pytest.approx(round(acc[key] * acc["examples"]))
        assert all(finite(v, 0, 1) for v in acc["greedy_by_source_length"].values())
  # Held-out formats are formats, not dates, never seen in training.
  assert set(figures["dates"]["test_examples"]) == {"held-out dates", "held-out formats"}
  digits = [int(k.split()[0]) for k in figures["addition"]["test_examples"]]
  assert max(digits) == settings["test_digits"] > settings["train_digits"]


SCRIPTS = {  # name: (files it writes, check of its JSON figures and settings)
    "gradient_flow": (["gradient_flow.json", "gradient_flow.png"], check_gradient_flow),
    "adding_problem": (["adding_problem.json", "adding_problem.png"], check_adding_problem),
    "truncation_bias": (["truncation_bias.json", "truncation_bias.png"], check_truncation_bias),
    "seed_examples": (["seed_examples.json"], check_seed_examples),
    "forecast": (["forecast.json", "elnino.png"], check_forecast),
    "sentiment": (["sentiment.json", "learning_curves.png"], check_sentiment),
    "char_lm": (["char_lm.json", "loss.png", "samples.txt"], check_char_lm),
    "benchmark": (["benchmark.json", "benchmark.md"], check_benchmark),
    "flax_interop": (["flax_interop.json", "flax_interop.png"], check_flax_interop),
    "seq2seq": (["seq2seq.json", "dates_accuracy.png", "addition_accuracy.png", "attention.png"],
                check_seq2seq),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_quick_mode_runs_and_writes_results(name, tmp_path):
  run_quick(name, tmp_path)
  files, check = SCRIPTS[name]
  for filename in files:
    path = tmp_path / filename
    assert path.exists(), f"{name} did not write {filename}; wrote {os.listdir(tmp_path)}"
    assert path.stat().st_size > 0, f"{name} wrote an empty {filename}"
  record = json.loads((tmp_path / f"{name}.json").read_text())
  check(record["figures"], record["settings"])


def test_benchmark_profile_reports_kernels_and_page_faults(tmp_path):
  # The pure-JAX fused path: its loops are XLA while loops (the oneDNN path is one custom call).
  run_quick("benchmark", tmp_path, "--profile", "--modes", "train", "--impls", "bptt_jax_fused")
  [raw] = json.loads((tmp_path / "profile.json").read_text())["figures"]["profiles"]
  assert "error" not in raw, raw.get("error")
  kernels = raw["kernels"]
  loops = {name: k for name, k in kernels.items() if name.startswith("while")}
  assert len(loops) >= 2, sorted(kernels)  # the forward and the backward loop
  # The LSTM's loops run once per step; kernels inside them run T = 10 times per step.
  assert all(k["calls"] == 1 for k in loops.values())
  assert max(k["calls"] for k in kernels.values()) == 10
  assert all(k["us"] > 0 for k in kernels.values())
  # A count of faults over the timed steps, divided by their number; the tiny case
  # (XLA plans 0.01 MB of temporaries) touches far fewer than 1000 fresh pages a step.
  steps, per_step = raw["steps"], raw["minor_faults_per_step"]
  assert len(raw["step_ms"]) == steps > 0
  assert finite(per_step, 0, 1000)
  assert per_step * steps == pytest.approx(round(per_step * steps), abs=1e-6)
  report = (tmp_path / "profile.md").read_text()
  assert "### lstm/tiny/train, bptt_jax" in report
  assert f"{per_step:,.0f} minor page faults per step." in report


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


def test_stepper_refuses_an_environment_it_cannot_set(monkeypatch):
  # An implementation's environment is read at start-up or at trace time: a step built
  # in a process without it would silently measure another path.
  monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
  from bench import cases

  monkeypatch.delenv("BPTT_JAX_KERNELS", raising=False)
  with pytest.raises(ValueError, match="BPTT_JAX_KERNELS=fused.*BPTT_JAX_KERNELS unset"):
    cases.stepper("bptt_jax_kernel", "lstm", cases.QUICK_CONFIGS["tiny"], "train")
  monkeypatch.setenv("BPTT_JAX_KERNELS", "0")
  with pytest.raises(ValueError, match="BPTT_JAX_KERNELS='0'"):
    cases.stepper("bptt_jax_kernel", "lstm", cases.QUICK_CONFIGS["tiny"], "train")


def test_kernel_calls_times_the_kernels_alone():
  import re

  import bptt_jax

  if bptt_jax.kernels().library is None:
    pytest.skip(f"the CPU kernels are not built here: {bptt_jax.kernels().reason}")
  proc = subprocess.run(
      [sys.executable, "-m", "bench.kernel_calls", "--cell", "gru", "--config", "tiny",
       "--reps", "3"],
      capture_output=True, text=True, timeout=600, cwd=os.path.join(ROOT, "experiments"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  line = proc.stdout.strip().splitlines()[-1]
  pattern = (r"gru/tiny \(fused\), \(B, T, D, H\) = \(4, 10, 4, 8\), 3 rounds: forward best "
             r"([\d.e+-]+) ms, median ([\d.e+-]+); forward \+ backward best ([\d.e+-]+) ms, "
             r"median ([\d.e+-]+); ([\d,]+) minor page faults per round")
  match = re.fullmatch(pattern, line)
  assert match, line
  fwd_best, fwd_median, both_best, both_median = map(float, match.groups()[:4])
  assert 0 < fwd_best <= fwd_median and 0 < both_best <= both_median


@pytest.mark.parametrize("compare,names", [
    ("layout", ["batch-major, in place", "time-major, transposes"]),
    ("padded", ["kernel, lengths", "JAX path, lengths"]),
    ("readout", ["readout's call", "XLA's products"])])
def test_kernel_ab_times_both_steps(compare, names):
  import re

  import bptt_jax

  if bptt_jax.kernels().library is None:
    pytest.skip(f"the CPU kernels are not built here: {bptt_jax.kernels().reason}")
  proc = subprocess.run(
      [sys.executable, "-m", "bench.kernel_ab", "--compare", compare, "--cell", "lstm",
       "--config", "tiny", "--mode", "train", "--reps", "3"],
      capture_output=True, text=True, timeout=600, cwd=os.path.join(ROOT, "experiments"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()[-3:]
  assert lines[0] == "lstm/tiny/train, (B, T, D, H) = (4, 10, 4, 8), 3 rounds", lines
  rows = [re.fullmatch(r"  (.+?) +median +([\d.]+) ms   ratio ([\d.]+) \[([\d.]+), ([\d.]+)\]",
                       line) for line in lines[1:]]
  assert all(rows), lines
  assert [r.group(1) for r in rows] == names
  first, second = ([float(x) for x in r.groups()[1:]] for r in rows)
  assert first[1:] == [1.0, 1.0, 1.0]  # each round's ratio to itself
  assert first[0] > 0 and second[0] > 0 and second[2] <= second[1] <= second[3]


def test_small_batches_times_the_kernel_against_jax():
  import re

  import bptt_jax

  if bptt_jax.kernels().library is None:
    pytest.skip(f"the CPU kernels are not built here: {bptt_jax.kernels().reason}")
  proc = subprocess.run(
      [sys.executable, "-m", "bench.small_batches", "--cells", "gru", "--batches", "2",
       "--hidden", "8", "24", "--inputs", "3", "--length", "5", "--reps", "3"],
      capture_output=True, text=True, timeout=600, cwd=os.path.join(ROOT, "experiments"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()[-3:]
  assert lines[0].startswith("train, T = 5, D = 3, 3 rounds"), lines
  # the forward step's FLOPs 2 B G H (D + H): 2 * 2 * 3 * 8 * 11 and 2 * 2 * 3 * 24 * 27
  for line, H, mflop in zip(lines[1:], (8, 24), ("0.001", "0.008")):
    row = re.fullmatch(rf"  gru   B=2   H={H} +forward step +{mflop} MFLOP   jax +([\d.]+) ms"
                       r"   kernel +([\d.]+) ms   ratio ([\d.]+)", line)
    assert row and all(float(x) > 0 for x in row.groups()), line
  bad = subprocess.run([sys.executable, "-m", "bench.small_batches", "--batches", "0"],
                       capture_output=True, text=True, timeout=600,
                       cwd=os.path.join(ROOT, "experiments"))
  assert bad.returncode == 2 and "--batches must be positive, got 0" in bad.stderr, bad.stderr


def test_readout_ab_times_the_call_against_xla():
  import re

  import bptt_jax

  if bptt_jax.kernels().library is None:
    pytest.skip(f"the CPU kernels are not built here: {bptt_jax.kernels().reason}")
  proc = subprocess.run(
      [sys.executable, "-m", "bench.readout_ab", "--hidden", "8", "--outputs", "3",
       "--rows", "5", "40", "--reps", "3"],
      capture_output=True, text=True, timeout=600, cwd=os.path.join(ROOT, "experiments"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()[-6:]
  assert lines[0] == "[5, 8] x [8, 3]: 120 multiply-adds, 3 rounds", lines
  assert lines[3] == "[40, 8] x [8, 3]: 960 multiply-adds, 3 rounds", lines
  for first, second in (lines[1:3], lines[4:6]):
    rows = [re.fullmatch(r"  (.+?) +median +([\d.]+) ms   ratio ([\d.]+) \[([\d.]+), ([\d.]+)\]",
                         line) for line in (first, second)]
    assert all(rows), lines
    assert [r.group(1) for r in rows] == ["readout's call", "XLA's products"]
    assert [float(x) for x in rows[0].groups()[2:]] == [1.0, 1.0, 1.0]
    assert float(rows[1].group(2)) > 0 and float(rows[1].group(4)) <= float(rows[1].group(3))
  bad = subprocess.run([sys.executable, "-m", "bench.readout_ab", "--rows", "8", "0"],
                       capture_output=True, text=True, timeout=600,
                       cwd=os.path.join(ROOT, "experiments"))
  assert bad.returncode == 2 and "--rows must be positive, got 0" in bad.stderr, bad.stderr
