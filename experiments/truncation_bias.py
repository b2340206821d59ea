"""The bias of truncated BPTT, measured on a delayed-echo task.

A stream of random symbols (one of V) comes in; the target at step t is the
symbol seen at step t - L. To learn it, the gradient of the loss at t must
reach the input at t - L, L steps back. Truncated BPTT with chunks of K < L
steps cuts that path (the carry crosses chunk boundaries through
stop_gradient), so the network stays at chance (1/V); with K comfortably above
L it learns the task; TBPTT(k1, k2) with k1 < L < k2 updates as often as
small chunks but backpropagates far enough. Beside accuracy: time per epoch
and the peak temporary memory XLA plans for one training call, against K and
against full BPTT over the whole batch.

  python experiments/truncation_bias.py    # L = 20; K = 10, K = 40, TBPTT(10, 40)
  python experiments/truncation_bias.py --quick
"""

import argparse

import common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bptt_jax as bj

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--delay", type=int, default=20, help="L: the echo delay")
parser.add_argument("--symbols", type=int, default=4, help="V: alphabet size (chance = 1/V)")
parser.add_argument("--configs", nargs="+", default=["10", "40", "10:40"],
                    help="chunk lengths K, or k1:k2 for TBPTT(k1, k2)")
parser.add_argument("--cost-chunks", type=int, nargs="+", default=[5, 10, 20, 40, 100, 200],
                    help="K values to time and measure memory for (plus full BPTT)")
parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
parser.add_argument("--hidden", type=int, default=128)
parser.add_argument("--batch", type=int, default=32, help="parallel streams B")
parser.add_argument("--batch-steps", type=int, default=200, help="steps per batch T")
parser.add_argument("--batches", type=int, default=40, help="batches per epoch")
parser.add_argument("--epochs", type=int, default=60, help="at most this many epochs")
parser.add_argument("--stop-at", type=float, default=0.995,
                    help="stop a configuration once its test accuracy reaches this")
parser.add_argument("--lr", type=float, default=5e-3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true")
parser.add_argument("--out", default=None)
args = parser.parse_args()
if args.quick:
  args.delay, args.configs, args.cost_chunks = 4, ["2", "8"], [2, 8]
  args.hidden, args.batch, args.batch_steps, args.batches, args.epochs = 16, 4, 24, 3, 1
out = common.results_dir("truncation_bias", args.out)
L, V, H, B, T = args.delay, args.symbols, args.hidden, args.batch, args.batch_steps

# One long stream per row: xs[b, t] random, ys[b, t] = xs[b, t - L], the first L steps masked.
def echo_stream(key, length):
  tokens = jax.random.randint(key, (B, length), 0, V)
  ys = jnp.roll(tokens, L, axis=1)
  mask = jnp.broadcast_to(jnp.arange(length) >= L, (B, length))
  return tokens, ys, mask

def stream_batches(key, n_batches):
  xs, ys, mask = echo_stream(key, n_batches * T)
  return [{"xs": xs[:, i * T:(i + 1) * T], "ys": ys[:, i * T:(i + 1) * T],
           "mask": mask[:, i * T:(i + 1) * T]} for i in range(n_batches)]

cell = bj.lstm(H) if args.cell == "lstm" else bj.gru(H)

def apply(params, carry, tokens, mask):  # the model: one-hot symbols into the cell
  return bj.unroll(cell, params["cell"], jax.nn.one_hot(tokens, V), mask=mask, carry=carry)

model = bj.Model(apply, cell.initial_carry, name=cell.name)

def step_loss(params, hs, ys):
  return bj.softmax_cross_entropy(bj.readout(params["head"], hs), ys)

def init_params(key):
  k_cell, k_head = jax.random.split(key)
  return {"cell": cell.init(k_cell, V), "head": bj.init_readout(k_head, H, V)}

test_xs, test_ys, test_mask = echo_stream(jax.random.fold_in(jax.random.key(args.seed), 99), 4 * T)

@jax.jit
def accuracy(params):
  _, hs = apply(params, cell.initial_carry(B), test_xs, None)
  hit = jnp.argmax(bj.readout(params["head"], hs), -1) == test_ys
  return jnp.sum(hit & test_mask) / jnp.sum(test_mask)

def parse(config):
  k1, _, k2 = config.partition(":")
  return int(k1), int(k2 or k1)

def label(k1, k2):
  return f"K={k1}" if k1 == k2 else f"TBPTT({k1}, {k2})"

# 1. Accuracy against the truncation length.
figures, curves = {"chance": 1 / V}, {}
tx = bj.optimizer(args.lr, max_norm=1.0)
for config in args.configs:
  k1, k2 = parse(config)
  key = jax.random.key(args.seed)
  step = bj.tbptt_step(model, step_loss, tx, k1=k1, k2=k2)
  # The stream's state: the carry, and for k2 > k1 the last k2 - k1 steps too.
  carry = bj.stream_carry(cell.initial_carry(B), jnp.zeros((B, T), jnp.int32), k1=k1, k2=k2)
  state = bj.TrainState.create(init_params(key), tx, carry=carry)
  accs = []
  with common.Timer() as timer:
    for epoch in range(args.epochs):
      batches = stream_batches(jax.random.fold_in(key, epoch), args.batches)
      state, history = bj.fit(step, state, batches, epochs=1, desc=f"{label(k1, k2)} epoch {epoch}")
      accs.append(float(accuracy(state.params)))
      print(f"{label(k1, k2):16s} epoch {epoch}: train loss {history[-1]['loss']:.3f}  "
            f"test accuracy {accs[-1]:.3f}")
      if accs[-1] >= args.stop_at:
        break
  figures[label(k1, k2)] = {"test_accuracy": accs[-1], "epochs": len(accs),
                            "updates": int(state.step), "seconds": timer.seconds}
  curves[label(k1, k2)] = accs

# 2. Cost per epoch against K: time (median of 3 epochs after compiling) and XLA's planned memory.
cost = {}
batch = stream_batches(jax.random.key(1), 1)[0]
for K in sorted(set(args.cost_chunks + [T])):
  step = bj.tbptt_step(model, step_loss, tx, k1=K, jit=False)
  state = bj.TrainState.create(init_params(jax.random.key(0)), tx, carry=cell.initial_carry(B))
  fn = jax.jit(step)
  jax.block_until_ready(fn(state, batch))
  times = []
  for _ in range(3):
    with common.Timer() as timer:
      for _ in range(args.batches):
        state, m = fn(state, batch)
      jax.block_until_ready(state.params)
    times.append(timer.seconds)
  name = "full BPTT" if K == T else f"K={K}"
  cost[name] = {"K": K, "seconds_per_epoch": float(np.median(times)),
                "temp_memory_mb": common.compiled_memory_mb(step, state, batch),
                "updates_per_epoch": args.batches * -(-T // K)}
  print(f"{name:10s} {cost[name]['seconds_per_epoch']:.2f} s/epoch  "
        f"{cost[name]['temp_memory_mb']:.1f} MB temporary  "
        f"{cost[name]['updates_per_epoch']} updates/epoch")
figures["cost"] = cost

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for name, accs in curves.items():
  ax1.plot(range(1, len(accs) + 1), accs, marker="o", label=name)
ax1.axhline(1 / V, color="k", ls="--", lw=0.8, label=f"chance (1/{V})")
ax1.set_xlabel("epoch")
ax1.set_ylabel("test accuracy")
ax1.set_title(f"delayed echo, L = {L}")
ax1.legend()
ks = [c["K"] for c in cost.values()]
ax2.plot(ks, [c["seconds_per_epoch"] for c in cost.values()], "o-", label="seconds / epoch")
ax2.set_xscale("log")
ax2.set_xlabel(f"chunk length K (K = {T} is full BPTT over the batch)")
ax2.set_ylabel("seconds per epoch")
ax3 = ax2.twinx()
ax3.plot(ks, [c["temp_memory_mb"] for c in cost.values()], "s--", color="C1", label="temporary MB")
ax3.set_ylabel("temporary memory (MB)")
ax2.set_title("cost against truncation length")
ax2.legend(loc="upper left")
ax3.legend(loc="upper right")
common.save_plot(fig, f"{out}/truncation_bias.png")
common.write_json(f"{out}/truncation_bias.json", figures, args)
