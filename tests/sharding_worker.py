"""The data-parallel runs of test_sharding.py, each in a process of its own.

Several host devices (``JAX_NUM_CPU_DEVICES``) and ``jax.distributed`` must be
set up before JAX starts, so test_sharding.py runs this file in subprocesses:

    python tests/sharding_worker.py devices OUT_DIR
        (with JAX_NUM_CPU_DEVICES=4) the sharded train_step / tbptt_step runs
        and the layout and error checks;
    python tests/sharding_worker.py fit PROCESS_ID NUM_PROCESSES PORT OUT_DIR CKPT_DIR DELAY
        one process of a data-parallel fit (jax.distributed on 127.0.0.1:PORT,
        one CPU device per process), checkpointing as it goes.

The problems themselves (:func:`problem`, :func:`train`, :func:`fit_problem`)
are imported by test_sharding.py for the single-device references; their
step functions are built once per process (:func:`steps`), so a reference
compiles each of them once.
"""

import functools
import json
import os
import sys
import time

import numpy as np

B, T, D, H = 8, 12, 3, 6
N_FIT, B_FIT = 32, 8  # examples and global batch size of the fit runs
FIT_SETTINGS = dict(epochs=3, eval_every=6, checkpoint_every=3, keep=2, log_every=2)


def problem(kind):
  """``(cell, params, batches)``: 3 batches of ``[B, T, D]`` inputs with ragged lengths."""
  import jax

  import bptt_jax as bj
  cell = bj.lstm(H) if kind == "lstm" else bj.gru(H)
  # Params of the shapes init gives, drawn with numpy: every process starts
  # cold, and this compiles nothing.
  shapes = jax.eval_shape(lambda key: {"cell": cell.init(key, D),
                                       "head": bj.init_readout(key, H, 1)}, jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.4 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
  xs = rng.normal(size=(3, B, T, D)).astype(np.float32)
  ys = np.cumsum(xs[..., :1], axis=2)
  lengths = np.array([12, 7, 12, 3, 12, 10, 1, 12], np.int32)
  return cell, params, [{"xs": xs[i], "ys": ys[i], "lengths": lengths} for i in range(3)]


def step_loss(params, hs, ys):
  import bptt_jax as bj
  return bj.mse(bj.readout(params["head"], hs), ys)


def host(tree):
  import jax
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(jax.device_get(tree))]


@functools.lru_cache(maxsize=None)
def steps(kind):
  """``(tx, full, tbptt, k2)``: the jitted full-BPTT and TBPTT steps of ``kind``.

  Full BPTT through ``model_loss`` (``segmented_loss``); streamed TBPTT with
  k1 = 4 and, for the LSTM, k2 = 6 (a StreamCarry), for the GRU k2 = 4.
  """
  import bptt_jax as bj
  cell = problem(kind)[0]
  tx = bj.optimizer(1e-2)
  k2 = 6 if kind == "lstm" else 4
  return (tx, bj.train_step(bj.model_loss(cell, step_loss), tx),
          bj.tbptt_step(cell, step_loss, tx, k1=4, k2=k2), k2)


def train(kind, mesh=None, *, fsdp=False, parts=("full", "tbptt"), save_to=None):
  """3 steps of full BPTT and 3 streamed TBPTT steps from the same params.

  With ``save_to``, the TBPTT state after its 3 steps (its streamed carry
  split along B) is checkpointed there, with a key.

  Returns:
    ``(results, checks)``: the final params (and streamed carry) of each, as
    numpy leaves, and what was seen of the layout when ``mesh`` is given.
  """
  import jax

  import bptt_jax as bj
  from bptt_jax import sharding
  cell, params, batches = problem(kind)
  tx, full, tbptt, k2 = steps(kind)
  put_state = (lambda s: s) if mesh is None else (
      lambda s: sharding.shard_state(s, mesh, fsdp=fsdp))
  put_batch = (lambda b: b) if mesh is None else (lambda b: sharding.shard_batch(b, mesh))
  spec = lambda tree: jax.tree_util.tree_map(lambda a: str(a.sharding.spec), tree)  # noqa: E731
  results, checks = {}, {}

  if "full" in parts:
    state = put_state(bj.TrainState.create(params, tx))
    specs, compiled = (spec(state.params) if mesh else None), full._cache_size()
    for batch in batches:
      state, metrics = full(state, put_batch(batch))
    results["full"] = host(state.params)
    if mesh is not None:
      checks["full_compiles"] = full._cache_size() - compiled
      checks["full_specs"] = [specs, spec(state.params)]
      checks["loss_replicated"] = bool(metrics["loss"].sharding.is_fully_replicated)

  if "tbptt" in parts:
    carry = bj.stream_carry(cell.initial_carry(B), batches[0]["xs"], k1=4, k2=k2)
    state = put_state(bj.TrainState.create(params, tx, carry=carry))
    compiled = tbptt._cache_size()
    for batch in batches:
      state, metrics = tbptt(state, put_batch(batch))
    results["tbptt"] = host(state.params)
    results["carry"] = host(state.carry)
    if save_to is not None:
      bj.save_checkpoint(save_to, 3, {"state": state, "key": jax.random.key(7)})
    if mesh is not None:
      checks["tbptt_compiles"] = tbptt._cache_size() - compiled
      checks["carry_specs"] = sorted(set(jax.tree_util.tree_leaves(spec(state.carry))))
  return results, checks


def _error(fn):
  try:
    fn()
  except (ValueError, TypeError) as e:
    return f"{type(e).__name__}: {e}"
  return None


def devices(out_dir):
  import jax

  import bptt_jax as bj
  from bptt_jax import sharding
  assert jax.device_count() == 4, jax.devices()
  mesh = sharding.data_mesh()
  out, checks = {}, {}
  for kind, fsdp, parts in (("lstm", False, ("full", "tbptt")), ("gru", False, ("full", "tbptt")),
                            ("lstm", True, ("full",))):
    save_to = os.path.join(out_dir, "ckpt") if kind == "lstm" and not fsdp else None
    results, seen = train(kind, mesh, fsdp=fsdp, parts=parts, save_to=save_to)
    name = f"{kind}_{'fsdp' if fsdp else 'replicated'}"
    out.update({f"{name}_{part}": leaves for part, leaves in results.items()})
    checks[name] = seen

  # B = 6 rows over 4 devices: a clear error, before any transfer or trace.
  _, params, batches = problem("gru")
  odd = {k: v[:6] for k, v in batches[0].items()}
  checks["errors"] = {
      "shard_batch": _error(lambda: sharding.shard_batch(odd, mesh)),
      "global_batch": _error(lambda: sharding.global_batch(odd, mesh)),
      "shard_state": _error(lambda: sharding.shard_state(
          bj.TrainState.create(params, bj.optimizer(), carry=bj.gru(H).initial_carry(6)), mesh)),
  }
  np.savez(os.path.join(out_dir, "results.npz"),
           **{f"{k}__{i}": a for k, leaves in out.items() for i, a in enumerate(leaves)})
  with open(os.path.join(out_dir, "checks.json"), "w") as f:
    json.dump(checks, f)


def fit_problem():
  """The LSTM of :func:`train` under fit: ``(params, examples, step, tx, eval_fn)``.

  ``N_FIT`` examples with ragged lengths, batches of ``B_FIT``; evaluation is
  the loss over all examples (on the global params).
  """
  import jax
  import jax.numpy as jnp

  import bptt_jax as bj
  cell, params, _ = problem("lstm")
  tx, full, _, _ = steps("lstm")
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(N_FIT, T, D)).astype(np.float32)
  lengths = rng.integers(1, T + 1, size=N_FIT).astype(np.int32)
  examples = {"xs": xs, "ys": np.cumsum(xs[..., :1], axis=1), "lengths": lengths}
  loss_fn = bj.model_loss(cell, step_loss)
  everything = {k: jnp.asarray(v) for k, v in examples.items()}
  eval_fn = jax.jit(lambda p: {"loss": loss_fn(p, everything)})
  return params, examples, full, tx, eval_fn


def fit_run(state, batches, step, eval_fn, **kwargs):
  import jax

  import bptt_jax as bj
  return bj.fit(step, state, batches, eval_fn=eval_fn, progress=False,
                **{**FIT_SETTINGS, "key": jax.random.key(3), **kwargs})


def fit(process_id, num_processes, port, out_dir, ckpt_dir, delay):
  import bptt_jax as bj
  from bptt_jax import sharding
  sharding.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout=60)
  import jax
  assert jax.process_count() == num_processes and jax.device_count() == num_processes
  mesh = sharding.data_mesh()
  params, examples, train_step, tx, eval_fn = fit_problem()
  mine = bj.data.shuffled_batches(examples, B_FIT, process_index=process_id,
                                  process_count=num_processes)

  def step(state, batch):
    time.sleep(delay)  # slow enough for a kill to land mid-run
    return train_step(state, batch)

  state = sharding.shard_state(bj.TrainState.create(params, tx), mesh)
  state, history = fit_run(state, sharding.global_batches(mine, mesh), step, eval_fn,
                           log_path=os.path.join(out_dir, "log.jsonl"),
                           checkpoint_dir=ckpt_dir, resume="auto")
  with open(os.path.join(out_dir, f"history_{process_id}.json"), "w") as f:
    json.dump(history, f)
  np.savez(os.path.join(out_dir, f"final_{process_id}.npz"), *host(state.params))


if __name__ == "__main__":
  if sys.argv[1] == "devices":
    devices(sys.argv[2])
  else:
    pid, n, port = (int(a) for a in sys.argv[2:5])
    fit(pid, n, port, sys.argv[5], sys.argv[6], float(sys.argv[7]))
