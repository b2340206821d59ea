"""Tests for bptt_jax/sharding.py: data parallelism over devices and processes.

Several devices and several processes must be set up before JAX starts, so
those runs happen in subprocesses (tests/sharding_worker.py) and are compared
with single-device runs made here, in this process:

- 4 host devices in one process: sharded ``train_step`` (full BPTT through
  ``segmented_loss``) and streamed ``tbptt_step`` of an LSTM and a GRU, params
  replicated (and FSDP-split for the LSTM), give the single-device params
  after 3 steps to float32 rounding (``rtol=1e-5, atol=1e-6``: the sharded
  program sums the gradient in another order); one compile each; layouts
  kept; the streamed state checkpointed there restores here on one device.
- 2 processes on 127.0.0.1 (jax.distributed, gloo): ``fit`` equals one process
  on the same global batches (same tolerance), the log is written once; one
  process killed with SIGKILL after a checkpoint and both restarted end
  bit-identical to the uninterrupted 2-process run; that run's checkpoint
  restores on 1 device and continues as a 1-device run would.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import sharding_worker as w
from test_checkpoint import assert_trees_equal, steps_in

import bptt_jax as bj
from bptt_jax import _fit, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
TOL = dict(rtol=1e-5, atol=1e-6)  # float32: the same sums in another order


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(*args, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err.decode()[-3000:]


def assert_close(got, want, tol=TOL):
  assert len(got) == len(want)
  for a, b in zip(got, want, strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, **tol)


def leaves_of(npz, prefix):
  keys = sorted((k for k in npz.files if k.startswith(prefix + "__")),
                key=lambda k: int(k.split("__")[1]))
  return [npz[k] for k in keys]


# ----------------------------------------------------------------------------
# 4 devices in one process


def test_sharded_steps_equal_single_device(tmp_path):
  proc = launch("devices", tmp_path, devices=4)
  reference = {kind: w.train(kind)[0] for kind in ("lstm", "gru")}  # meanwhile, 1 device
  finish(proc)
  checks = json.loads((tmp_path / "checks.json").read_text())
  with np.load(tmp_path / "results.npz") as npz:
    for kind in ("lstm", "gru"):
      for part in ("full", "tbptt", "carry"):
        assert_close(leaves_of(npz, f"{kind}_replicated_{part}"), reference[kind][part])
    assert_close(leaves_of(npz, "lstm_fsdp_full"), reference["lstm"]["full"])
    # The steps moved the params: the comparison is not between initial values.
    params = bj.TrainState.create(w.problem("lstm")[1], bj.optimizer()).params
    assert not np.allclose(leaves_of(npz, "lstm_replicated_full")[0],
                           jax.tree_util.tree_leaves(params)[0], atol=1e-3)

  for name in ("lstm_replicated", "gru_replicated", "lstm_fsdp"):
    seen = checks[name]
    assert seen["full_compiles"] == 1  # the state comes back laid out as it went in
    before, after = seen["full_specs"]
    assert before == after
    assert seen["loss_replicated"]
  assert checks["lstm_replicated"]["full_specs"][0]["cell"]["W"] == "P()"
  # FSDP: W [3, 24] is split along its gate axis, the readout [6, 1] replicated.
  assert checks["lstm_fsdp"]["full_specs"][0]["cell"]["W"] == "P(None, 'data')"
  assert checks["lstm_fsdp"]["full_specs"][0]["head"]["W_hy"] == "P()"
  for name in ("lstm_replicated", "gru_replicated"):
    assert checks[name]["tbptt_compiles"] == 1
    assert checks[name]["carry_specs"] == ["P('data',)"]  # split along B

  # The streamed LSTM state, saved from 4 devices (its StreamCarry split along
  # B), restores here on one device bit for bit, key included.
  cell, params, batches = w.problem("lstm")
  tx, _, _, k2 = w.steps("lstm")
  template = {"state": bj.TrainState.create(
      params, tx, carry=bj.stream_carry(cell.initial_carry(w.B), batches[0]["xs"], k1=4, k2=k2)),
      "key": jax.random.key(0)}
  _, restored = bj.restore_latest(str(tmp_path / "ckpt"), template)
  assert isinstance(restored["state"].carry, bj.StreamCarry)
  with np.load(tmp_path / "results.npz") as npz:
    for got, want in ((restored["state"].params, leaves_of(npz, "lstm_replicated_tbptt")),
                      (restored["state"].carry, leaves_of(npz, "lstm_replicated_carry"))):
      for a, b in zip(jax.tree_util.tree_leaves(got), want, strict=True):
        np.testing.assert_array_equal(a, b)
  assert int(restored["state"].step) == 3 * 3  # 3 batches of 3 chunks
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(jax.random.key(7)))

  errors = checks["errors"]
  assert errors["shard_batch"].startswith("ValueError: batch['lengths'] has 6 rows")
  assert "do not split evenly over the 4 devices of the mesh's 'data' axis" in (
      errors["shard_batch"])
  assert "over the 4 devices this process holds in the mesh" in errors["global_batch"]
  assert errors["shard_state"].startswith("ValueError: state.carry has 6 rows")


# ----------------------------------------------------------------------------
# 2 processes: fit, a SIGKILL and a restart, a resume on one device


def launch_pair(out_dir, ckpt_dir, delay):
  os.makedirs(out_dir, exist_ok=True)
  port = free_port()
  return [launch("fit", i, 2, port, out_dir, ckpt_dir, delay) for i in (0, 1)]


def final(out_dir, i):
  with np.load(os.path.join(out_dir, f"final_{i}.npz")) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def read_log(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def single_fit(examples, params, tx, step, eval_fn, **kwargs):
  state = bj.TrainState.create(params, tx)
  return w.fit_run(state, bj.data.shuffled_batches(examples, w.B_FIT), step, eval_fn, **kwargs)


def test_two_processes_fit_kill_restart_and_resume_on_one_device(tmp_path):
  whole, victim = tmp_path / "whole", tmp_path / "victim"
  whole_run = launch_pair(whole, whole / "ckpt", 0.0)
  victim_run = launch_pair(victim, victim / "ckpt", 0.3)

  # Meanwhile, here on one device: the same global batches in one process, 3
  # epochs (12 steps), then on to a 4th epoch from its own checkpoint.
  params, examples, step, tx, eval_fn = w.fit_problem()
  ref_state, ref_history = single_fit(examples, params, tx, step, eval_fn,
                                      checkpoint_dir=str(tmp_path / "ref"))
  ref_params = [np.asarray(a) for a in jax.tree_util.tree_leaves(ref_state.params)]
  ref4_state, _ = single_fit(examples, params, tx, step, eval_fn, epochs=4,
                             checkpoint_dir=str(tmp_path / "ref"), resume=True)

  # Kill one process after a checkpoint; the other is stuck in a collective
  # and goes down with it, as a job scheduler would take it down.
  deadline = time.monotonic() + 400
  while not any(s >= 6 for s in steps_in(victim / "ckpt")):
    assert all(p.poll() is None for p in victim_run), "the run ended before it could be killed"
    assert time.monotonic() < deadline, "no checkpoint written in time"
    time.sleep(0.02)
  for p in victim_run[::-1]:
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
  assert not (victim / "final_0.npz").exists()
  assert 6 <= max(steps_in(victim / "ckpt")) < 12
  for p in launch_pair(victim, victim / "ckpt", 0.0):  # both restarted: resume
    finish(p)
  for p in whole_run:
    finish(p)

  # Two processes end with the same params, bit for bit; the resumed run ends
  # bit-identical to the uninterrupted one; one process (another summation
  # order) agrees to float32 rounding.
  uninterrupted = final(whole, 0)
  for got in (final(whole, 1), final(victim, 0), final(victim, 1)):
    for a, b in zip(got, uninterrupted, strict=True):
      np.testing.assert_array_equal(a, b)
  assert_close(uninterrupted, ref_params)

  # The log is written once (by process 0), each step once; every process
  # returns the whole history, across the kill too.
  logged = read_log(whole / "log.jsonl")
  assert [r["step"] for r in logged] == list(range(1, 13))
  assert read_log(victim / "log.jsonl") == logged
  for out in (whole, victim):
    for i in (0, 1):
      assert json.loads((out / f"history_{i}.json").read_text()) == logged
  for got, want in zip(logged, ref_history, strict=True):
    assert (got["step"], got["epoch"]) == (want["step"], want["epoch"])
    np.testing.assert_allclose([got["loss"], got.get("eval_loss", 0.0)],
                               [want["loss"], want.get("eval_loss", 0.0)], rtol=1e-4)
  assert [r["step"] for r in logged if "eval_loss" in r] == [6, 12]  # global evaluation

  # The 2-process (2-device) checkpoint restores here, on one device, and continues.
  shutil.copytree(whole / "ckpt", tmp_path / "moved")
  state, history = single_fit(examples, params, tx, step, eval_fn, epochs=4,
                              checkpoint_dir=str(tmp_path / "moved"), resume=True)
  assert [r["step"] for r in history] == [13, 14, 15, 16]
  assert_close([np.asarray(a) for a in jax.tree_util.tree_leaves(state.params)],
               [np.asarray(a) for a in jax.tree_util.tree_leaves(ref4_state.params)])


# ----------------------------------------------------------------------------
# In this process: errors, the per-process data, fit in a process other than 0


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout():
  port = free_port()  # nothing listens there
  start = time.monotonic()
  with pytest.raises(ConnectionError, match=rf"cannot reach the jax.distributed coordinator "
                                            rf"at 127.0.0.1:{port} within 1 s"):
    sharding.initialize(f"127.0.0.1:{port}", 2, 1, timeout=1)
  assert time.monotonic() - start < 5
  with pytest.raises(ValueError, match="coordinator_address must be 'host:port'"):
    sharding.initialize("localhost", 2, 1)
  with pytest.raises(ValueError, match=r"process_id must lie in \[0, num_processes\) = "
                                       r"\[0, 2\), got 2"):
    sharding.initialize("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="timeout must be a positive int"):
    sharding.initialize("127.0.0.1:1234", 2, 1, timeout=0)


def test_per_process_rows_make_up_the_global_batches():
  rng = np.random.default_rng(0)
  examples = {"xs": rng.normal(size=(24, 5, 2)).astype(np.float32),
              "lengths": rng.integers(1, 6, size=24).astype(np.int32)}
  key = jax.random.key(4)
  whole = list(bj.data.shuffled_batches(examples, 8)(0, key))
  parts = [list(bj.data.shuffled_batches(examples, 8, process_index=p, process_count=4)(0, key))
           for p in range(4)]
  for b, batch in enumerate(whole):
    for name, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([part[b][name] for part in parts]), value)
      assert parts[1][b][name].shape[0] == 2
  assert sharding.process_rows(8, process_index=1, process_count=4) == slice(2, 4)
  assert sharding.process_rows(8) == slice(0, 8)  # one process here

  tokens = np.arange(50)
  streams = bj.data.stream_batches(tokens, 4, 6)
  halves = [bj.data.stream_batches(tokens, 4, 6, process_index=p, process_count=2)
            for p in (0, 1)]
  for b, batch in enumerate(streams):
    for name in ("xs", "ys", "mask"):
      np.testing.assert_array_equal(np.concatenate([h[b][name] for h in halves]), batch[name])

  with pytest.raises(ValueError, match=r"a batch of 4 of the 20 examples \(batch_size=8\) does "
                                       "not split evenly over 3 processes"):
    bj.data.shuffled_batches({"x": np.zeros((20, 1))}, 8, process_index=0, process_count=3)
  with pytest.raises(ValueError, match=r"process_index must lie in \[0, 2\), got 2"):
    bj.data.shuffled_batches(examples, 8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="6 streams do not split evenly over 4 processes"):
    bj.data.stream_batches(tokens, 6, 5, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="a global batch of 6 rows does not split evenly over 4"):
    sharding.process_rows(6, process_index=0, process_count=4)


def test_one_device_mesh_and_layout_errors():
  mesh = sharding.data_mesh()
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == jax.device_count()
  batch = {"xs": np.arange(12, dtype=np.float32).reshape(4, 3, 1)}
  for put in (sharding.shard_batch, sharding.global_batch):
    got = put(batch, mesh)["xs"]
    assert got.sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(got, batch["xs"])
  key = sharding.replicate({"key": jax.random.key(5)}, mesh)["key"]
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(5)))
  lists = sharding.global_batches([batch, batch], mesh)
  assert [b["xs"].shape for b in lists] == [(4, 3, 1)] * 2
  assert [b["xs"].shape for b in lists] == [(4, 3, 1)] * 2  # read again: re-iterable

  other = jax.sharding.Mesh(np.array(jax.devices()), ("model",))
  with pytest.raises(ValueError, match=r"the mesh needs an axis named 'data', got axes "
                                       r"\('model',\)"):
    sharding.shard_batch(batch, other)
  with pytest.raises(TypeError, match="expected a jax.sharding.Mesh, got str"):
    sharding.replicate(batch, "data")
  with pytest.raises(ValueError, match=r"batch\['s'\] is a scalar"):
    sharding.shard_batch({"s": np.float32(1.0)}, mesh)
  with pytest.raises(TypeError, match="expected a bptt_jax.TrainState, got dict"):
    sharding.shard_state({"params": 1}, mesh)
  with pytest.raises(ValueError, match="devices is empty"):
    sharding.data_mesh([])


def test_fit_in_a_process_other_than_0_reads_the_log_and_writes_nothing(tmp_path, monkeypatch):
  """Process 1 of 2 (``jax.process_index`` stood in for): no log line, no
  progress bar, the history of a resumed run read from process 0's log."""
  from test_fit import STEP, make_batches, make_state
  log, ckpt = tmp_path / "log.jsonl", str(tmp_path / "ckpt")
  batches = make_batches(3)
  kwargs = dict(epochs=2, checkpoint_dir=ckpt, checkpoint_every=2, log_path=str(log),
                resume="auto")
  _, first = bj.fit(STEP, make_state(), batches, **{**kwargs, "epochs": 1})  # as process 0
  written = log.read_bytes()
  bars, saved = [], []
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(_fit, "tqdm", lambda **kw: _NoBar(kw, bars))
  # Saving across processes is the 2-process test's; here only its calls are seen.
  monkeypatch.setattr(_fit._checkpoint, "save", lambda d, step, tree, keep: saved.append(step))
  state, history = bj.fit(STEP, make_state(), batches, progress=True, **kwargs)
  assert log.read_bytes() == written  # untouched
  assert bars[0]["disable"] is True
  assert saved == [4, 6]  # it takes part in every checkpoint
  ref_state, ref_history = bj.fit(STEP, make_state(), batches, epochs=2)
  assert history == ref_history  # steps 1-3 read back from the log, 4-6 run here
  assert history[:3] == first
  assert_trees_equal(state, ref_state)


class _NoBar:
  def __init__(self, kwargs, record):
    record.append(kwargs)

  def update(self, n):
    pass

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    pass
