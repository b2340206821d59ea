"""Tests for bptt_jax/_fit.py: the fit loop, its log, metrics fetches, resume.

The in-process tests train a linear model in float32 (fast to compile; the
same with ``jax_enable_x64`` on or off); the kill test runs a small GRU in a
subprocess, kills it with SIGKILL mid-training, resumes it, and compares its
final params and history bit for bit with an uninterrupted run.
"""

import contextlib
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
from test_checkpoint import assert_trees_equal, corrupt, steps_in

import bptt_jax as bj
from bptt_jax import _checkpoint, _fit

F32 = np.float32

# ----------------------------------------------------------------------------
# A tiny model: linear regression, trained with train_step.

TX = optax.adam(0.05)


def loss_fn(params, batch):
  preds = batch["x"] @ params["w"] + params["b"][None]
  return jnp.mean((preds - batch["y"]) ** 2)


STEP = bj.train_step(loss_fn, TX)


def make_state():
  return bj.TrainState.create({"w": np.zeros((3, 1), F32), "b": np.zeros(1, F32)}, TX)


def make_batches(n=3, bad=()):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    x = rng.normal(size=(4, 3)).astype(F32)
    if i in bad:
      x[0, 0] = np.nan
    out.append({"x": x, "y": x @ np.array([[1.0], [-2.0], [0.5]], F32) + F32(0.3)})
  return out


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


class Crash(Exception):
  pass


def crashing(at, step_fn=STEP):
  """``step_fn`` that raises on its ``at``-th call, as a crash would."""
  calls = []

  def step(state, batch):
    calls.append(None)
    if len(calls) == at:
      raise Crash
    return step_fn(state, batch)

  return step


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
  assert read_log(tmp_path / "log.jsonl") == history  # the evaluation at the end too


def test_eval_at_the_end_is_not_repeated():
  calls = []
  bj.fit(STEP, make_state(), make_batches(4), epochs=1,
         eval_fn=lambda p: calls.append(1) or {"one": 1.0}, eval_every=2)
  assert len(calls) == 2  # steps 2 and 4: the end already has an evaluation


def test_batches_function_gets_epoch_keys():
  examples = {"x": np.random.default_rng(1).normal(size=(10, 3)).astype(F32)}
  examples["y"] = examples["x"] @ np.ones((3, 1), F32)
  batches = bj.data.shuffled_batches(examples, 4)
  key = jax.random.key(7)
  state, history = bj.fit(STEP, make_state(), batches, epochs=2, key=key)
  order = [b for e in range(2) for b in batches(e, jax.random.fold_in(key, e))]
  ref_state, ref_losses = manual_loop(order, 1)
  assert len(history) == 6  # 3 batches per epoch, the last of 2 examples
  np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
  assert_trees_equal(state, ref_state)


class Reiterable:
  """Not a sequence, but ``iter()`` gives a fresh iterator each time."""

  def __init__(self, batches):
    self.batches = batches

  def __iter__(self):
    return iter(self.batches)


def test_batches_sequence_reiterable_or_one_shot():
  batches = make_batches(3)
  ref_state, ref_losses = manual_loop(batches, 2)
  for given in (tuple(batches), Reiterable(batches)):
    state, history = bj.fit(STEP, make_state(), given, epochs=2)
    np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
    assert_trees_equal(state, ref_state)

  # A generator is read once: fine for one epoch, an error for more.
  state, history = bj.fit(STEP, make_state(), (b for b in batches + batches), epochs=1)
  np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
  assert_trees_equal(state, ref_state)
  with pytest.raises(ValueError, match=r"one-shot iterator \(generator\).*epochs=2; pass a "
                                       r"callable batches\(epoch, key\) or a sequence"):
    bj.fit(STEP, make_state(), (b for b in batches), epochs=2)
  with pytest.raises(ValueError, match="one-shot iterator"):
    bj.fit(STEP, make_state(), iter(batches), epochs=3)
  with pytest.raises(TypeError, match="batches must be a callable .* or an iterable of "
                                      "batches, got int"):
    bj.fit(STEP, make_state(), 3, epochs=1)


@pytest.mark.parametrize("log_every", [1, 2, 20])
def test_nonfinite_error_names_the_step(tmp_path, log_every):
  log = str(tmp_path / "log.jsonl")
  batches = make_batches(6, bad=(1, 2, 3, 4))
  with pytest.raises(bj.NonFiniteError, match=r"3 consecutive non-finite .* up to step 4 "
                                              r"\(epoch 0, batch 3\)"):
    bj.fit(STEP, make_state(), batches, epochs=1, max_nonfinite=3, log_path=log,
           log_every=log_every)
  assert [r["step"] for r in read_log(log)] == [1, 2, 3]  # the steps before it
  assert [r["nonfinite"] for r in read_log(log)] == [0, 1, 2]
  # A finite step in between resets the count: no error.
  _, history = bj.fit(STEP, make_state(), make_batches(6, bad=(0, 1, 3, 4)), epochs=1,
                      max_nonfinite=3, log_every=log_every)
  assert [r["nonfinite"] for r in history] == [1, 2, 0, 1, 2, 0]
  assert [r["nonfinite_total"] for r in history] == [1, 2, 2, 3, 4, 4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=-1), "epochs must be a non-negative int"),
    (dict(epochs=1.5), "epochs must be a non-negative int"),
    (dict(epochs=1, eval_every=0), "eval_every must be a positive int or None"),
    (dict(epochs=1, checkpoint_every=-2), "checkpoint_every must be a positive int or None"),
    (dict(epochs=1, log_every=0), "log_every must be a positive int, got 0"),
    (dict(epochs=1, log_every=2.0), "log_every must be a positive int, got 2.0"),
    (dict(epochs=1, max_nonfinite=0), "max_nonfinite must be >= 1"),
    (dict(epochs=1, resume="yes"), "resume must be None, 'auto', True or False, got 'yes'"),
    (dict(epochs=1, resume=1), "resume must be None, 'auto', True or False, got 1"),
    (dict(epochs=1, resume=True), "resume=True needs a checkpoint_dir"),
])
def test_bad_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bj.fit(STEP, make_state(), make_batches(1), **kwargs)


def test_summarize_tbptt_metrics():
  out = _fit.summarize({"loss": np.array([1.0, 3.0]), "steps": np.array([4, 2]),
                        "nonfinite": np.array([1, 0]), "nonfinite_total": np.array([3, 3]),
                        "clipped": np.array([True, False]), "carry": np.zeros((2, 3))})
  assert out == {"loss": 2.0, "steps": 6, "nonfinite": 0, "nonfinite_total": 3, "clipped": 0.5}


# ----------------------------------------------------------------------------
# Metrics stay on the device until fetched, every log_every steps.


class Guarded:
  """A metric on the device that only ``jax.device_get`` may read."""

  reading = False

  def __init__(self, value):
    self.value = value

  def __array__(self, dtype=None, copy=None):
    if not Guarded.reading:
      raise AssertionError("a metric was read outside jax.device_get")
    return np.asarray(self.value, dtype)


def guarded(step_fn):
  def step(state, batch):
    state, metrics = step_fn(state, batch)
    return state, {k: Guarded(v) for k, v in metrics.items()}
  return step


class Bar:
  """Stands in for tqdm: records the count and the postfixes."""

  def __init__(self, *, initial, **kwargs):
    self.n, self.postfixes = initial, []

  def update(self, n):
    self.n += n

  def set_postfix(self, **kwargs):
    self.postfixes.append(kwargs)

  def close(self):
    pass


@contextlib.contextmanager
def fetches_counted():
  """Counts ``jax.device_get`` calls; implicit device-to-host transfers raise.

  The transfer guard only acts on backends with separate device memory (not on
  CPU, where arrays are read in place); :class:`Guarded` metrics check the same
  on every backend.
  """
  calls, bars = [], []
  device_get = jax.device_get

  def counting(x):
    calls.append(x)
    Guarded.reading = True
    try:
      return device_get(x)
    finally:
      Guarded.reading = False

  def bar(**kwargs):
    bars.append(Bar(**kwargs))
    return bars[-1]

  with pytest.MonkeyPatch.context() as mp, jax.transfer_guard_device_to_host("disallow"):
    mp.setattr(jax, "device_get", counting)
    mp.setattr(_fit, "tqdm", bar)
    yield calls, bars


def test_metrics_are_fetched_every_log_every_steps(tmp_path):
  batches = make_batches(8)  # 5 epochs: 40 steps
  ref_state, ref_history = bj.fit(STEP, make_state(), batches, epochs=5, log_every=1,
                                  log_path=str(tmp_path / "ref.jsonl"))
  with fetches_counted() as (calls, bars):
    state, history = bj.fit(guarded(STEP), make_state(), batches, epochs=5, log_every=10,
                            log_path=str(tmp_path / "log.jsonl"))
  assert len(calls) == 4  # after steps 10, 20 and 30, and at the end
  assert [len(c) for c in calls] == [10, 10, 10, 10]  # one call for all pending steps
  assert bars[0].n == 40
  assert [p["loss"] for p in bars[0].postfixes] == [
      f"{ref_history[s - 1]['loss']:.4f}" for s in (10, 20, 30, 40)]
  assert history == ref_history
  assert read_log(tmp_path / "log.jsonl") == ref_history
  assert_trees_equal(state, ref_state)

  # More steps than log_every: everything is fetched once, at the end.
  with fetches_counted() as (calls, _):
    _, history = bj.fit(guarded(STEP), make_state(), batches, epochs=5, log_every=100,
                        log_path=str(tmp_path / "once.jsonl"))
  assert [len(c) for c in calls] == [40]
  assert history == ref_history
  assert read_log(tmp_path / "once.jsonl") == ref_history


def test_fetches_before_evaluations_and_checkpoints(tmp_path):
  batches = make_batches(8)  # 5 epochs: 40 steps
  eval_fn = jax.jit(lambda p: {"w0": p["w"][0, 0], "b": p["b"][0]})
  kwargs = dict(epochs=5, eval_fn=eval_fn, eval_every=15, checkpoint_every=25)
  _, ref_history = bj.fit(STEP, make_state(), batches, log_every=1,
                          checkpoint_dir=str(tmp_path / "ref"), **kwargs)
  with fetches_counted() as (calls, _):
    state, history = bj.fit(guarded(STEP), make_state(), batches, log_every=10,
                            checkpoint_dir=str(tmp_path / "ckpt"), **kwargs)
  # Metrics fetched after steps 10, 15 (eval), 20, 25 (checkpoint), 30 (eval)
  # and at the end; evaluations at 15, 30 and the end; checkpoints at 25 and
  # the end (one fetch each).
  assert len(calls) == 6 + 3 + 2
  assert [r["step"] for r in history if "eval_w0" in r] == [15, 30, 40]
  assert history == ref_history
  assert steps_in(tmp_path / "ckpt") == [25, 40]
  _, tree = bj.restore_latest(str(tmp_path / "ckpt"), {"state": make_state(), "epoch": 0,
                                                       "position": 0, "step": 0,
                                                       "key": jax.random.key(0)})
  assert_trees_equal(tree["state"], state)
  assert (int(tree["epoch"]), int(tree["position"]), int(tree["step"])) == (5, 0, 40)


def test_donating_step_fn(tmp_path):
  """A step that donates its input state: fit never touches a state it passed on."""
  donating = jax.jit(bj.train_step(loss_fn, TX, jit=False), donate_argnums=0)
  given = jax.tree_util.tree_map(jnp.asarray, make_state())
  batches = make_batches(3)
  eval_fn = jax.jit(lambda p: {"w0": p["w"][0, 0]})
  kwargs = dict(epochs=4, eval_fn=eval_fn, eval_every=2, checkpoint_dir=str(tmp_path / "ckpt"),
                checkpoint_every=5, log_path=str(tmp_path / "log.jsonl"), log_every=3,
                resume="auto")
  with pytest.raises(Crash):
    bj.fit(crashing(8, donating), given, batches, **kwargs)
  assert given.params["w"].is_deleted()  # the first step donated it
  state, history = bj.fit(donating, make_state(), batches, **kwargs)
  ref_state, ref_history = bj.fit(STEP, make_state(), batches, epochs=4, eval_fn=eval_fn,
                                  eval_every=2)
  assert history == ref_history
  assert_trees_equal(state, ref_state)


# ----------------------------------------------------------------------------
# The log: runs appended one after another


def test_log_is_appended_never_erased(tmp_path):
  log = tmp_path / "log.jsonl"
  _, first = bj.fit(STEP, make_state(), make_batches(3), epochs=1, log_path=str(log))
  with open(log, "a") as f:
    f.write('{"step": 4, "lo')  # a line cut short by a crash
  _, second = bj.fit(STEP, make_state(), make_batches(2), epochs=2, log_path=str(log))
  assert [r["step"] for r in second] == [1, 2, 3, 4]  # only this run's steps
  assert read_log(log) == first + second


@pytest.mark.parametrize("log_every", [1, 20])
def test_resume_after_a_crash(tmp_path, log_every):
  """Checkpoints every 4 steps, a crash at step 7: the rerun resumes from step 4,
  drops the log lines of steps 5-6, keeps an earlier run's lines, returns the
  whole history and ends bit-identical to an unbroken run."""
  batches = make_batches(3)
  ckpt, log = str(tmp_path / "ckpt"), tmp_path / "log.jsonl"
  earlier = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]  # an earlier run
  log.write_text("".join(json.dumps(r) + "\n" for r in earlier))
  kwargs = dict(epochs=3, checkpoint_dir=ckpt, checkpoint_every=4, log_path=str(log),
                log_every=log_every, resume="auto")
  with pytest.raises(Crash):
    bj.fit(crashing(at=7), make_state(), batches, **kwargs)
  # Metrics are fetched every log_every steps and before each checkpoint.
  logged = [1, 2, 3, 4, 5, 6] if log_every == 1 else [1, 2, 3, 4]
  assert [r["step"] for r in read_log(log)] == [r["step"] for r in earlier] + logged
  assert steps_in(ckpt) == [4]
  with open(log, "a") as f:
    f.write('{"step": 7, "lo')  # a line cut short by the crash

  state, history = bj.fit(STEP, make_state(), batches, **kwargs)
  ref_state, ref_history = bj.fit(STEP, make_state(), batches, epochs=3)
  _, ref_losses = manual_loop(batches, 3)

  assert history == ref_history  # steps 1-4 read back from the log, then 5-9
  np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
  assert [r["epoch"] for r in history] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert read_log(log) == earlier + ref_history  # no duplicate, no gap
  assert_trees_equal(state, ref_state)
  assert steps_in(ckpt) == [4, 8, 9]

  # A finished run resumes at its end and does nothing more.
  again, history = bj.fit(crashing(at=1), make_state(), batches, **kwargs)
  assert history == ref_history
  assert read_log(log) == earlier + ref_history
  assert_trees_equal(again, ref_state)


def test_resume_without_a_log_returns_the_new_steps(tmp_path):
  batches = make_batches(3)
  kwargs = dict(epochs=2, checkpoint_dir=str(tmp_path), checkpoint_every=2, resume=True)
  with pytest.raises(Crash):
    bj.fit(crashing(at=4), make_state(), batches, **{**kwargs, "resume": "auto"})
  state, history = bj.fit(STEP, make_state(), batches, **kwargs)
  _, ref_history = bj.fit(STEP, make_state(), batches, epochs=2)
  assert history == ref_history[2:]  # resumed after step 2
  assert_trees_equal(state, manual_loop(batches, 2)[0])


def test_resume_keeps_the_key_and_its_implementation(tmp_path):
  examples = {"x": np.random.default_rng(2).normal(size=(12, 3)).astype(F32)}
  examples["y"] = examples["x"] @ np.ones((3, 1), F32)
  batches = bj.data.shuffled_batches(examples, 4)
  key = jax.random.key(3, impl="rbg")
  kwargs = dict(epochs=4, key=key, checkpoint_dir=str(tmp_path), checkpoint_every=5,
                resume="auto")
  with pytest.raises(Crash):
    bj.fit(crashing(at=7), make_state(), batches, **kwargs)
  state, history = bj.fit(STEP, make_state(), batches, **kwargs)
  ref_state, ref_history = bj.fit(STEP, make_state(), batches, epochs=4, key=key)
  assert history == ref_history[5:]
  assert_trees_equal(state, ref_state)


def test_resume_none_refuses_existing_checkpoints(tmp_path):
  d = str(tmp_path)
  batches = make_batches(4)
  bj.fit(STEP, make_state(), batches, epochs=1, checkpoint_dir=d, checkpoint_every=2)
  assert steps_in(d) == [2, 4]
  with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(the newest at "
                                       r"step 4\); pass resume='auto' or resume=True to "
                                       r"continue it, or resume=False to start over"):
    bj.fit(STEP, make_state(), batches, epochs=2, checkpoint_dir=d)
  assert steps_in(d) == [2, 4]  # left alone


def test_resume_true_needs_a_readable_checkpoint(tmp_path):
  d = tmp_path / "ckpt"
  with pytest.raises(ValueError, match="resume=True but .* holds no readable checkpoint"):
    bj.fit(STEP, make_state(), make_batches(2), epochs=1, checkpoint_dir=str(d), resume=True)
  bj.save_checkpoint(str(d), 3, {"w": np.zeros(2, F32)})
  corrupt(str(d / "ckpt_000000003"))
  with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"), \
       pytest.raises(ValueError, match="holds no readable checkpoint"):
    bj.fit(STEP, make_state(), make_batches(2), epochs=1, checkpoint_dir=str(d), resume=True)


def test_resume_auto_starts_fresh_without_checkpoints(tmp_path):
  batches = make_batches(3)
  state, history = bj.fit(STEP, make_state(), batches, epochs=2, resume="auto",
                          checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4)
  ref_state, ref_losses = manual_loop(batches, 2)
  np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
  assert_trees_equal(state, ref_state)
  assert steps_in(tmp_path / "ckpt") == [4, 6]


def test_resume_false_starts_over_and_removes_the_old_checkpoints(tmp_path):
  d, log = str(tmp_path / "ckpt"), str(tmp_path / "log.jsonl")
  with pytest.raises(Crash):  # an old run, cut off after its checkpoint at step 4
    bj.fit(crashing(at=6), make_state(), make_batches(5), epochs=2, checkpoint_dir=d,
           checkpoint_every=4, log_path=log, log_every=1)
  assert steps_in(d) == [4]
  batches = make_batches(2)
  with pytest.warns(UserWarning, match=r"resume=False: removed 1 checkpoint\(s\) of an "
                                       r"earlier run from .*ckpt"):
    state, history = bj.fit(STEP, make_state(), batches, epochs=1, checkpoint_dir=d,
                            log_path=log, resume=False)
  ref_state, ref_losses = manual_loop(batches, 1)
  np.testing.assert_array_equal([r["loss"] for r in history], ref_losses)
  assert_trees_equal(state, ref_state)
  assert steps_in(d) == [2]  # the new run's only
  assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4, 5, 1, 2]  # appended
  # A later resume continues the new run, not the old one.
  again, history = bj.fit(STEP, make_state(), batches, epochs=1, checkpoint_dir=d,
                          log_path=log, resume=True)
  assert [r["step"] for r in history] == [1, 2]
  assert_trees_equal(again, ref_state)


# ----------------------------------------------------------------------------
# SIGKILL mid-training, then resume: bit-identical to an unbroken run.

SCRIPT = textwrap.dedent('''
    """Trains a small GRU with fit(); argv: out_dir ckpt_dir seconds_per_step."""
    import json, os, sys, time
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

    state, history = bj.fit(step, bj.TrainState.create(params, tx),
                            bj.data.shuffled_batches({"xs": xs, "ys": ys}, B), epochs=10,
                            key=jax.random.key(1), checkpoint_dir=ckpt_dir, checkpoint_every=4,
                      keep=2, log_path=os.path.join(out_dir, "log.jsonl"), progress=False,
                      resume="auto")
    with open(os.path.join(out_dir, "history.json"), "w") as f:
      json.dump(history, f)
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
  logged = read_log(killed_out / "log.jsonl")
  assert [r["step"] for r in logged] == list(range(1, 41))  # each step logged once
  with open(killed_out / "history.json") as f, open(whole_out / "history.json") as g:
    history, reference = json.load(f), json.load(g)
  assert history == reference == logged  # the whole run's history, across the kill
  assert [s for s, _ in _checkpoint.list_checkpoints(str(killed_ckpt))] == [36, 40]


def test_streaming_fit_compiles_once():
  """A whole training loop (2 epochs x 3 streamed batches, TBPTT) traces its step once."""
  traces = []
  cell = bj.gru(4, dtype=jnp.float32)
  k_cell, k_head = jax.random.split(jax.random.key(0))
  params = {"cell": cell.init(k_cell, 2), "head": bj.init_readout(k_head, 4, 1, jnp.float32)}

  def step_loss(params, hs, ys):
    traces.append(hs.shape)
    return bj.mse(bj.readout(params["head"], hs), ys)

  tx = bj.optimizer(1e-2)
  step = bj.tbptt_step(cell, step_loss, tx, k1=4)
  xs = np.random.default_rng(0).normal(size=(3, 2, 10, 2)).astype(F32)
  batches = [{"xs": xs[i], "ys": xs[i, ..., :1]} for i in range(3)]
  state = bj.TrainState.create(params, tx, carry=cell.initial_carry(2, jnp.float32))
  state, history = bj.fit(step, state, batches, epochs=2, progress=False)
  assert len(history) == 6
  assert traces == [(2, 4, 4)]
