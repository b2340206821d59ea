"""A Flax model holding a bptt_jax LSTM against the same model with Flax's own LSTM.

One linen model, two recurrent layers: ``bj.LinenRNN(bj.lstm(H))`` (bptt_jax's
fused backward pass) or ``nn.RNN(nn.OptimizedLSTMCell(H))`` (Flax's fastest
LSTM), then ``nn.Dense(1)`` on each sequence's last valid step. Both start from
the same weights (Flax's init, converted with ``bj.from_flax_weights``) and see
the same batches: the adding problem (Hochreiter & Schmidhuber 1997) with
variable lengths, the two marked values in the first and second half of each
sequence's own length, right-padded to T. optax: global-norm clipping and Adam.
Predicting the mean gives MSE about 1/6.

Each implementation trains in its own process; the processes alternate over
``--rounds``. Reported: test MSE along the way, the training seconds after
compilation, the compile seconds, and the ratio of Flax's training time to
bptt_jax's measured in the same run.

  python experiments/flax_interop.py                 # about 3 min on 2 cores
  python experiments/flax_interop.py --quick
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import bptt_jax as bj

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--T", type=int, default=100, help="padded sequence length")
parser.add_argument("--hidden", type=int, default=64, help="hidden units H")
parser.add_argument("--batch", type=int, default=64, help="sequences per update")
parser.add_argument("--updates", type=int, default=1500)
parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
parser.add_argument("--eval-every", type=int, default=250)
parser.add_argument("--test-size", type=int, default=1000)
parser.add_argument("--rounds", type=int, default=2, help="processes per implementation")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--impl", choices=["bptt_jax", "flax"], help="(internal) run one process")
parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
parser.add_argument("--out", default=None)
args = parser.parse_args()
if args.quick:
  args.T, args.hidden, args.updates, args.eval_every, args.test_size = 20, 16, 40, 20, 100
  args.rounds = 1


def adding_batch(key, batch, T):
  """Inputs [B, T, 2], lengths [B] in [T/2, T], targets [B]; zeros past each length."""
  k_n, k_v, k_a, k_b = jax.random.split(key, 4)
  lengths = jax.random.randint(k_n, (batch,), T // 2, T + 1)
  values = jax.random.uniform(k_v, (batch, T))
  first = (jax.random.uniform(k_a, (batch,)) * (lengths // 2)).astype(jnp.int32)
  second = lengths // 2 + (jax.random.uniform(k_b, (batch,)) * (lengths - lengths // 2)).astype(
      jnp.int32)
  marker = jax.nn.one_hot(first, T) + jax.nn.one_hot(second, T)
  valid = jnp.arange(T)[None, :] < lengths[:, None]
  xs = jnp.where(valid[..., None], jnp.stack([values, marker], axis=-1), 0.0)
  return xs, lengths, jnp.sum(values * marker, axis=1)


class Regressor(nn.Module):
  impl: str
  hidden: int

  @nn.compact
  def __call__(self, xs, lengths):
    if self.impl == "bptt_jax":
      _, hs = bj.LinenRNN(bj.lstm(self.hidden))(xs, lengths=lengths)
    else:
      hs = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(xs, seq_lengths=lengths)
    return nn.Dense(1)(bj.last_step(hs, lengths))[:, 0]


def run_one(impl):
  """Trains one implementation in this process; returns its figures."""
  key = jax.random.key(args.seed)
  k_init, k_data, k_test = jax.random.split(key, 3)
  xs0, n0, _ = adding_batch(k_data, 2, args.T)
  flax_params = Regressor("flax", args.hidden).init(k_init, xs0, n0)["params"]
  if impl == "bptt_jax":  # the same starting weights, converted
    _, lstm_params = bj.from_flax_weights(nn.OptimizedLSTMCell(args.hidden),
                                   flax_params["OptimizedLSTMCell_0"])
    params = {"LinenRNN_0": {"cell": lstm_params}, "Dense_0": flax_params["Dense_0"]}
  else:
    params = flax_params
  model = Regressor(impl, args.hidden)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
  test = adding_batch(k_test, args.test_size, args.T)

  def loss_fn(params, batch):
    xs, lengths, ys = batch
    return jnp.mean((model.apply({"params": params}, xs, lengths) - ys) ** 2)

  @jax.jit
  def train(params, opt_state, start):
    def body(carry, i):
      params, opt_state = carry
      batch = adding_batch(jax.random.fold_in(k_data, start + i), args.batch, args.T)
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    return jax.lax.scan(body, (params, opt_state), jnp.arange(args.eval_every))

  test_mse = jax.jit(loss_fn)
  opt_state = tx.init(params)
  t0 = time.perf_counter()
  jax.block_until_ready(train.lower(params, opt_state, 0).compile())
  compile_s = time.perf_counter() - t0
  curve, seconds = [(0, float(test_mse(params, test)))], 0.0
  for start in range(0, args.updates, args.eval_every):
    t0 = time.perf_counter()
    (params, opt_state), losses = train(params, opt_state, start)
    jax.block_until_ready(losses)
    seconds += time.perf_counter() - t0
    curve.append((start + args.eval_every, float(test_mse(params, test))))
  return {"curve": curve, "train_seconds": seconds, "compile_seconds": compile_s,
          "baseline_mse": float(jnp.mean((test[2] - 1.0) ** 2))}


if args.impl:  # a child process: one implementation, figures as JSON on stdout
  print(json.dumps(run_one(args.impl)))
  sys.exit(0)

out = common.results_dir("flax_interop", args.out)
runs = {"bptt_jax": [], "flax": []}
child = [a for a in sys.argv[1:] if a != "--quick"]
child += ["--T", str(args.T), "--hidden", str(args.hidden), "--updates", str(args.updates),
          "--eval-every", str(args.eval_every), "--test-size", str(args.test_size)]
for r in range(args.rounds):
  for impl in (["bptt_jax", "flax"] if r % 2 == 0 else ["flax", "bptt_jax"]):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--impl", impl] + child,
                          capture_output=True, text=True, check=True)
    runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    last = runs[impl][-1]
    print(f"round {r + 1} {impl:8s} test MSE {last['curve'][-1][1]:.5f}  train "
          f"{last['train_seconds']:.1f} s  compile {last['compile_seconds']:.1f} s")

figures = {}
for impl, rs in runs.items():
  figures[impl] = {
      "final_test_mse": [r["curve"][-1][1] for r in rs],
      "curve": rs[0]["curve"],
      "train_seconds_median": statistics.median(r["train_seconds"] for r in rs),
      "train_seconds": [r["train_seconds"] for r in rs],
      "compile_seconds_median": statistics.median(r["compile_seconds"] for r in rs),
  }
figures["baseline_mse"] = runs["flax"][0]["baseline_mse"]
figures["flax_time_over_bptt_jax"] = (figures["flax"]["train_seconds_median"]
                                      / figures["bptt_jax"]["train_seconds_median"])
gap = np.abs(np.subtract([v for _, v in figures["bptt_jax"]["curve"]],
                         [v for _, v in figures["flax"]["curve"]]))
figures["max_test_mse_gap"] = float(gap.max())
print(f"Flax's training time / bptt_jax's: {figures['flax_time_over_bptt_jax']:.2f}; "
      f"largest test-MSE gap along the curve: {figures['max_test_mse_gap']:.2e}")

fig, ax = common.plt.subplots(figsize=(5.5, 4))
for impl in runs:
  s, v = zip(*figures[impl]["curve"])
  ax.plot(s, v, marker="o", label=f"{impl} ({figures[impl]['train_seconds_median']:.1f} s)")
ax.axhline(figures["baseline_mse"], color="k", ls="--", lw=0.8, label="predict the mean")
ax.set_yscale("log")
ax.set_xlabel("update")
ax.set_ylabel("test MSE")
ax.set_title(f"Flax model, LSTM H={args.hidden}, T={args.T}")
ax.legend(fontsize=8)
common.save_plot(fig, f"{out}/flax_interop.png")
common.write_json(f"{out}/flax_interop.json", figures, args)
