"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015).

Each input step has two channels: a value drawn from U[0, 1] and a marker that
is 1 at exactly two steps (one in each half of the sequence) and 0 elsewhere.
The target, read at the last step, is the sum of the two marked values.
Predicting the mean, 1, gives MSE 1/6 ≈ 0.167; a network that learned to carry
the marked values across T steps goes far below. tanh RNN, IRNN, LSTM and GRU
get the same budget (updates, batch size, optimizer) at T = 50, 100 and 200.

  python experiments/adding_problem.py             # default budget
  python experiments/adding_problem.py --quick
"""

import argparse
import time

import common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import bptt_jax as bj

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200], help="values of T")
parser.add_argument("--models", nargs="+", default=["tanh", "irnn", "lstm", "gru"],
                    help="tanh, irnn, lstm, gru, min_gru (a stack of two minGRU layers)")
parser.add_argument("--hidden", type=int, default=64, help="hidden units H")
parser.add_argument("--updates", type=int, default=2500, help="optimizer updates per run")
parser.add_argument("--batch", type=int, default=64, help="sequences per update")
parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
parser.add_argument("--max-norm", type=float, default=1.0, help="global-norm clipping")
parser.add_argument("--test-size", type=int, default=1000)
parser.add_argument("--eval-every", type=int, default=250)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
parser.add_argument("--out", default=None)
args = parser.parse_args()
if args.quick:
  args.lengths, args.updates, args.hidden, args.test_size = [20], 30, 16, 200
  args.eval_every = 10
out = common.results_dir("adding_problem", args.out)

# Data: markers at one random step in each half.
def adding_batch(key, batch, T):
  k_v, k_a, k_b = jax.random.split(key, 3)
  values = jax.random.uniform(k_v, (batch, T))
  first = jax.random.randint(k_a, (batch,), 0, T // 2)
  second = jax.random.randint(k_b, (batch,), T // 2, T)
  marker = jax.nn.one_hot(first, T) + jax.nn.one_hot(second, T)
  xs = jnp.stack([values, marker], axis=-1)  # [B, T, 2]
  ys = jnp.sum(values * marker, axis=1, keepdims=True)  # [B, 1]
  return xs, ys

CELLS = {
    "tanh": lambda H: bj.rnn(H, "tanh"),
    "irnn": lambda H: bj.irnn(H),
    "lstm": lambda H: bj.lstm(H),
    "gru": lambda H: bj.gru(H),
    # Two minGRU layers (Feng et al. 2024): the gates read the input only, so one layer
    # cannot gate on the marker it sees together with a value; the second layer can.
    "min_gru": lambda H: bj.stack(bj.min_gru(H), bj.min_gru(H)),
}

figures, curves = {}, {}
key = jax.random.key(args.seed)
for T in args.lengths:
  test_xs, test_ys = adding_batch(jax.random.fold_in(key, 10_000 + T), args.test_size, T)
  for name in args.models:
    cell = CELLS[name](args.hidden)
    k_cell, k_head, k_data = jax.random.split(jax.random.fold_in(key, T), 3)
    params = {"cell": cell.init(k_cell, 2), "head": bj.init_readout(k_head, args.hidden, 1)}

    def loss_fn(params, batch, cell=cell):
      xs, ys = batch
      _, hs = bj.unroll(cell, params["cell"], xs)
      return jnp.mean(bj.mse(bj.readout(params["head"], hs[:, -1]), ys))

    tx = bj.optimizer(args.lr, max_norm=args.max_norm)
    step = bj.train_step(loss_fn, tx, max_norm=args.max_norm)
    test_mse = jax.jit(lambda p, f=loss_fn, batch=(test_xs, test_ys): f(p, batch))

    def batches(epoch, k, T=T):
      for i in range(args.updates):
        yield adding_batch(jax.random.fold_in(k, i), args.batch, T)

    start = time.perf_counter()
    state, history = bj.fit(step, bj.TrainState.create(params, tx), batches, epochs=1,
                            key=k_data, eval_fn=lambda p, f=test_mse: {"test_mse": f(p)},
                            eval_every=args.eval_every, desc=f"{name} T={T}")
    seconds = time.perf_counter() - start
    evals = [(h["step"], h["eval_test_mse"]) for h in history if "eval_test_mse" in h]
    final = evals[-1][1]
    figures[f"{name}_T{T}"] = {
        "test_mse": final,
        "best_test_mse": min(v for _, v in evals),
        "baseline_mse": float(jnp.mean((test_ys - 1.0) ** 2)),
        "seconds": seconds,
        "nonfinite_steps": history[-1]["nonfinite_total"],
    }
    curves[f"{name}_T{T}"] = evals
    baseline = figures[f"{name}_T{T}"]["baseline_mse"]
    print(f"T={T:4d} {name:5s} test MSE {final:.4f} (baseline {baseline:.3f})  {seconds:.0f} s")

fig, axes = plt.subplots(1, len(args.lengths), figsize=(5 * len(args.lengths), 4), squeeze=False)
for ax, T in zip(axes[0], args.lengths):
  for name in args.models:
    s, v = zip(*curves[f"{name}_T{T}"])
    ax.plot(s, v, label=name)
  ax.axhline(1 / 6, color="k", ls="--", lw=0.8, label="predict the mean (1/6)")
  ax.set_yscale("log")
  ax.set_title(f"adding problem, T = {T}")
  ax.set_xlabel("update")
  ax.set_ylabel("test MSE")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
common.save_plot(fig, f"{out}/adding_problem.png")
common.write_json(f"{out}/adding_problem.json", figures, args)
