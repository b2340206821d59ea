"""Tests for bptt_jax/_fit.py and bptt_jax/_checkpoint.py: the fit loop, checkpoints, resume.

The in-process tests train a linear model (fast to compile); the kill test runs
a small GRU in a subprocess, kills it with SIGKILL mid-training, resumes it,
and compares its final params bit for bit with an uninterrupted run.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax as bj
from bptt_jax import _checkpoint

# ----------------------------------------------------------------------------
# A tiny model: linear regression, trained with train_step.

TX = optax.adam(0.05)


def loss_fn(params, batch):
  preds = batch["x"] @ params["w"] + params["b"][None]
  return jnp.mean((preds - batch["y"]) ** 2)


STEP = bj.train_step(loss_fn, TX)


def make_state():
  return bj.TrainState.create({"w": np.zeros((3, 1)), "b": np.zeros(1)}, TX)


def make_batches(n=3, bad=()):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    x = rng.normal(size=(4, 3))
    if i in bad:
      x[0, 0] = np.nan
    out.append({"x": x, "y": x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3})
  return out


def leaves(tree):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
  """Same structure, dtypes and bits."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(leaves(a), leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def manual_loop(batches, epochs, state=None):
  """What fit should do, written as a loop: ``(state, losses)``."""
  state = make_state() if state is None else state
  losses = []
  for _ in range(epochs):
    for batch in batches:
      state, metrics = STEP(state, batch)
      losses.append(float(metrics["loss"]))
  return state, losses


def read_log(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------
# fit


def test_history_log_and_final_state(tmp_path):
  batches = make_batches(3)
  log = tmp_path / "logs" / "train.jsonl"
  state, history = bj.fit(STEP, make_state(), batches, epochs=2, log_path=str(log))
  ref_state, ref_losses = manual_loop(batches, 2)

  assert len(history) == 3 * 2
  assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
  assert [r["epoch"] for r in history] == [0, 0, 0, 1, 1, 1]
  np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
  assert_trees_equal(state, ref_state)
  assert read_log(log) == history  # one JSON line per step
  assert all(isinstance(r["grad_norm"], float) and r["finite"] is True for r in history)


def test_eval_every(tmp_path):
  calls = []

  def eval_fn(params):
    calls.append(params)
    return {"w0": params["w"][0, 0]}

  batches = make_batches(5)
  _, history = bj.fit(STEP, make_state(), batches, epochs=1, eval_fn=eval_fn, eval_every=2,
                      log_path=str(tmp_path / "log.jsonl"))
  ref_state = make_state()
  ref_w0 = []
  for batch in batches:
    ref_state, _ = STEP(ref_state, batch)
    ref_w0.append(float(ref_state.params["w"][0, 0]))

  assert len(calls) == 3  # steps 2 and 4, and at the end (step 5)
  assert [r["step"] for r in history if "eval_w0" in r] == [2, 4, 5]
  for r in history:
    if "eval_w0" in r:
      assert r["eval_w0"] == ref_w0[r["step"] - 1]  # params after that step
  assert read_log(tmp_path / "log.jsonl")[1]["eval_w0"] == ref_w0[1]


def test_eval_at_the_end_is_not_repeated():
  calls = []
  bj.fit(STEP, make_state(), make_batches(4), epochs=1,
         eval_fn=lambda p: calls.append(1) or {"one": 1.0}, eval_every=2)
  assert len(calls) == 2  # steps 2 and 4: the end already has an evaluation


def test_batches_function_gets_epoch_keys():
  examples = {"x": np.random.default_rng(1).normal(size=(10, 3))}
  examples["y"] = examples["x"] @ np.ones((3, 1))
  batches = bj.data.shuffled_batches(examples, 4)
  key = jax.random.key(7)
  state, history = bj.fit(STEP, make_state(), batches, epochs=2, key=key)
  order = [b for e in range(2) for b in batches(e, jax.random.fold_in(key, e))]
  ref_state, ref_losses = manual_loop(order, 1)
  assert len(history) == 6  # 3 batches per epoch, the last of 2 examples
  np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
  assert_trees_equal(state, ref_state)


def test_nonfinite_error_names_the_step():
  batches = make_batches(6, bad=(1, 2, 3, 4))
  with pytest.raises(bj.NonFiniteError, match=r"3 consecutive non-finite .* up to step 4 "
                                              r"\(epoch 0, batch 3\)"):
    bj.fit(STEP, make_state(), batches, epochs=1, max_nonfinite=3)
  # A finite step in between resets the count: no error.
  _, history = bj.fit(STEP, make_state(), make_batches(6, bad=(0, 1, 3, 4)), epochs=1,
                      max_nonfinite=3)
  assert [r["nonfinite"] for r in history] == [1, 2, 0, 1, 2, 0]
  assert [r["nonfinite_total"] for r in history] == [1, 2, 2, 3, 4, 4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=-1), "epochs must be a non-negative int"),
    (dict(epochs=1.5), "epochs must be a non-negative int"),
    (dict(epochs=1, eval_every=0), "eval_every must be a positive int or None"),
    (dict(epochs=1, checkpoint_every=-2), "checkpoint_every must be a positive int or None"),
    (dict(epochs=1, max_nonfinite=0), "max_nonfinite must be >= 1"),
])
def test_bad_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bj.fit(STEP, make_state(), make_batches(1), **kwargs)


def test_summarize_tbptt_metrics():
  from bptt_jax._fit import summarize
  out = summarize({"loss": np.array([1.0, 3.0]), "steps": np.array([4, 2]),
                   "nonfinite": np.array([1, 0]), "nonfinite_total": np.array([3, 3]),
                   "clipped": np.array([True, False]), "carry": np.zeros((2, 3))})
  assert out == {"loss": 2.0, "steps": 6, "nonfinite": 0, "nonfinite_total": 3, "clipped": 0.5}


class Crash(Exception):
  pass


def crashing(at):
  calls = []

  def step(state, batch):
    calls.append(None)
    if len(calls) == at:
      raise Crash
    return STEP(state, batch)

  return step


def test_resume_after_a_crash(tmp_path):
  """Checkpoints every 4 steps, a crash at step 7: the rerun resumes from step 4,
  drops the log lines of steps 5-6, and ends bit-identical to an unbroken run."""
  batches = make_batches(3)
  ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "log.jsonl")
  kwargs = dict(epochs=3, checkpoint_dir=ckpt, checkpoint_every=4, log_path=log)
  with pytest.raises(Crash):
    bj.fit(crashing(at=7), make_state(), batches, **kwargs)
  assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4, 5, 6]
  assert [s for s, _ in _checkpoint.list_checkpoints(ckpt)] == [4]
  with open(log, "a") as f:
    f.write('{"step": 7, "lo')  # a line cut short by the crash

  state, history = bj.fit(STEP, make_state(), batches, **kwargs)
  ref_state, ref_losses = manual_loop(batches, 3)

  assert [r["step"] for r in history] == [5, 6, 7, 8, 9]
  assert [r["epoch"] for r in history] == [1, 1, 2, 2, 2]
  logged = read_log(log)
  assert [r["step"] for r in logged] == list(range(1, 10))  # no duplicate, no gap
  np.testing.assert_array_equal([r["loss"] for r in logged], ref_losses)
  assert_trees_equal(state, ref_state)
  assert [s for s, _ in _checkpoint.list_checkpoints(ckpt)] == [4, 8, 9]

  # A finished run resumes at its end and does nothing more.
  again, history = bj.fit(crashing(at=1), make_state(), batches, **kwargs)
  assert history == []
  assert_trees_equal(again, ref_state)


# ----------------------------------------------------------------------------
# Checkpoints


@functools.lru_cache(maxsize=None)
def adam_state():
  """A TrainState after two adam updates (mixed dtypes, an LSTMState carry); built once."""
  rng = np.random.default_rng(3)
  params = {"cell": {"W": rng.normal(size=(2, 3)),
                     "U": rng.normal(size=(3, 3)).astype(np.float32)},
            "step_size": np.float64(0.1)}
  tx = bj.optimizer(1e-2, max_norm=1.0)
  carry = bj.LSTMState(np.ones((2, 3)), np.zeros((2, 3)))
  state = bj.TrainState.create(params, tx, carry=carry)
  grads = jax.tree_util.tree_map(lambda p: np.full(np.shape(p), 0.3, np.asarray(p).dtype),
                                 params)
  # Two real updates, so the adam moments and counts are not trivial.
  update = jax.jit(lambda s, g: bj.apply_gradients(tx, s, 1.0, g))
  for _ in range(2):
    state, _ = update(state, grads)
  return state


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
  state = adam_state()
  tree = {"state": state, "epoch": 3, "key": jax.random.key_data(jax.random.key(5))}
  path = bj.save_checkpoint(str(tmp_path), 12, tree)
  assert os.path.basename(path) == "ckpt_000000012.msgpack"
  template = {"state": bj.TrainState.create(
      jax.tree_util.tree_map(np.zeros_like, state.params), bj.optimizer(1e-2, max_norm=1.0),
      carry=bj.LSTMState(np.zeros((2, 3)), np.zeros((2, 3)))),
      "epoch": 0, "key": jax.random.key_data(jax.random.key(0))}
  loaded = bj.load_checkpoint(path, template)
  assert isinstance(loaded["state"], bj.TrainState)
  assert isinstance(loaded["state"].carry, bj.LSTMState)
  assert int(loaded["epoch"]) == 3
  assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded["state"]), state)
  np.testing.assert_array_equal(loaded["key"], tree["key"])
  assert os.listdir(tmp_path) == ["ckpt_000000012.msgpack"]  # no temporary file left


@pytest.mark.parametrize("cut, match", [
    (0.5, "checksum mismatch .* cut short or altered"),
    (-1, "checksum mismatch .* cut short or altered"),
    (10, "not a bptt_jax checkpoint"),
    (0, "not a bptt_jax checkpoint"),
])
def test_file_cut_short_raises_checkpoint_error(tmp_path, cut, match):
  state = adam_state()
  path = bj.save_checkpoint(str(tmp_path), 1, state)
  data = open(path, "rb").read()
  n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
  with open(path, "wb") as f:
    f.write(data[:n])
  with pytest.raises(bj.CheckpointError, match=match):
    bj.load_checkpoint(path, state)


def test_altered_or_foreign_checkpoint_raises(tmp_path):
  state = adam_state()
  path = bj.save_checkpoint(str(tmp_path), 1, state)
  data = bytearray(open(path, "rb").read())
  data[-5] ^= 0xFF
  altered = str(tmp_path / "altered.msgpack")
  open(altered, "wb").write(bytes(data))
  with pytest.raises(bj.CheckpointError, match="checksum mismatch"):
    bj.load_checkpoint(altered, state)
  with pytest.raises(bj.CheckpointError, match="does not fit the expected structure"):
    bj.load_checkpoint(path, {"something": np.zeros(3), "else": 1})
  assert issubclass(bj.CheckpointError, ValueError)


def test_restore_latest_skips_a_corrupt_newest(tmp_path):
  d = str(tmp_path)
  for step in (10, 20, 30):
    bj.save_checkpoint(d, step, {"w": np.full(3, float(step))})
  newest = os.path.join(d, "ckpt_000000030.msgpack")
  data = open(newest, "rb").read()
  open(newest, "wb").write(data[: len(data) // 2])
  with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint: .*ckpt_000000030"):
    step, tree = bj.restore_latest(d, {"w": np.zeros(3)})
  assert step == 20
  np.testing.assert_array_equal(tree["w"], np.full(3, 20.0))


def test_restore_latest_without_checkpoints(tmp_path):
  assert bj.restore_latest(str(tmp_path / "missing"), {"w": np.zeros(3)}) is None
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  assert bj.restore_latest(str(tmp_path), {"w": np.zeros(3)}) is None


def test_keep_deletes_old_checkpoints(tmp_path):
  d = str(tmp_path)
  for step in range(1, 6):
    bj.save_checkpoint(d, step, {"w": np.full(2, float(step))}, keep=2)
  assert sorted(os.listdir(d)) == ["ckpt_000000004.msgpack", "ckpt_000000005.msgpack"]
  with pytest.raises(ValueError, match="keep must be >= 1"):
    bj.save_checkpoint(d, 6, {"w": np.zeros(2)}, keep=0)


# ----------------------------------------------------------------------------
# SIGKILL mid-training, then resume: bit-identical to an unbroken run.

SCRIPT = textwrap.dedent('''
    """Trains a small GRU with fit(); argv: out_dir ckpt_dir seconds_per_step."""
    import os, sys, time
    import jax, jax.numpy as jnp, numpy as np
    import bptt_jax as bj

    out_dir, ckpt_dir, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    B, T, D, H, N = 4, 6, 2, 5, 16   # 4 batches per epoch, 10 epochs: 40 steps
    cell = bj.gru(H)
    k_cell, k_out, k_data = jax.random.split(jax.random.key(0), 3)
    params = {"cell": cell.init(k_cell, D), "out": bj.init_readout(k_out, H, 1)}
    xs = np.asarray(jax.random.normal(k_data, (N, T, D)))
    ys = np.cumsum(xs[..., :1], axis=1)

    def loss_fn(p, batch):
      _, hs = bj.unroll(cell, p["cell"], batch["xs"])
      return jnp.mean(bj.mse(bj.readout(p["out"], hs), batch["ys"]))

    tx = bj.optimizer(1e-2, max_norm=1.0)
    train = bj.train_step(loss_fn, tx)

    def step(state, batch):
      time.sleep(delay)  # slow enough for the kill to land mid-run
      return train(state, batch)

    state, _ = bj.fit(step, bj.TrainState.create(params, tx),
                      bj.data.shuffled_batches({"xs": xs, "ys": ys}, B), epochs=10,
                      key=jax.random.key(1), checkpoint_dir=ckpt_dir, checkpoint_every=4,
                      keep=2, log_path=os.path.join(out_dir, "log.jsonl"), progress=False)
    np.savez(os.path.join(out_dir, "final.npz"),
             *[np.asarray(a) for a in jax.tree_util.tree_leaves(state.params)])
''')


def _launch(script, out_dir, ckpt_dir, delay):
  os.makedirs(out_dir, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, str(script), str(out_dir), str(ckpt_dir), str(delay)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err.decode()[-3000:]


def _final_params(out_dir):
  with np.load(os.path.join(out_dir, "final.npz")) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  script = tmp_path / "train_gru.py"
  script.write_text(SCRIPT)
  killed_out, killed_ckpt = tmp_path / "killed", tmp_path / "killed_ckpt"
  whole_out, whole_ckpt = tmp_path / "whole", tmp_path / "whole_ckpt"
  victim = _launch(script, killed_out, killed_ckpt, delay=0.1)
  whole = _launch(script, whole_out, whole_ckpt, delay=0.0)  # runs alongside

  deadline = time.monotonic() + 240
  while not any(s >= 8 for s, _ in _checkpoint.list_checkpoints(str(killed_ckpt))):
    assert victim.poll() is None, "the run ended before it could be killed"
    assert time.monotonic() < deadline, "no checkpoint written in time"
    time.sleep(0.01)
  os.kill(victim.pid, signal.SIGKILL)
  victim.communicate(timeout=60)
  assert victim.returncode == -signal.SIGKILL
  assert not (killed_out / "final.npz").exists()  # killed mid-run
  steps = [s for s, _ in _checkpoint.list_checkpoints(str(killed_ckpt))]
  assert 8 <= max(steps) < 40

  _finish(_launch(script, killed_out, killed_ckpt, delay=0.0))  # resumes
  _finish(whole)

  resumed, reference = _final_params(killed_out), _final_params(whole_out)
  assert len(resumed) == len(reference) == 6  # GRU W, U, b, b_hn and the readout W, b
  for a, b in zip(resumed, reference, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  logged = [r["step"] for r in read_log(killed_out / "log.jsonl")]
  assert logged == list(range(1, 41))  # each step logged once across the kill
  assert [s for s, _ in _checkpoint.list_checkpoints(str(killed_ckpt))] == [36, 40]


def test_streaming_fit_compiles_once():
  """A whole training loop (2 epochs x 3 streamed batches, TBPTT) traces its step once."""
  traces = []
  cell = bj.gru(4, dtype=jnp.float64)
  k_cell, k_head = jax.random.split(jax.random.key(0))
  params = {"cell": cell.init(k_cell, 2), "head": bj.init_readout(k_head, 4, 1, jnp.float64)}

  def step_loss(params, hs, ys):
    traces.append(hs.shape)
    return bj.mse(bj.readout(params["head"], hs), ys)

  tx = bj.optimizer(1e-2)
  step = bj.tbptt_step(cell, step_loss, tx, k1=4)
  xs = np.random.default_rng(0).normal(size=(3, 2, 10, 2))
  batches = [{"xs": xs[i], "ys": xs[i, ..., :1]} for i in range(3)]
  state = bj.TrainState.create(params, tx, carry=cell.initial_carry(2, jnp.float64))
  state, history = bj.fit(step, state, batches, epochs=2, progress=False)
  assert len(history) == 6
  assert traces == [(2, 4, 4)]
