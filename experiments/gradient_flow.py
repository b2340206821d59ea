"""Vanishing and exploding gradients, measured in real networks.

For a loss at the last step only, L = MSE(readout(h_T), y), we measure the norm
of dL/dh_t at every step t with one backward pass (bptt_jax.gradient_flow) for
tanh RNNs whose recurrent matrix has spectral radius 0.5, 1.0 and 1.5, an IRNN,
an LSTM and a GRU, and plot them on a log scale beside the idealised w^(T-t)
curves of a scalar recurrence. The per-step growth factor is the geometric mean
of ||dL/dh_t|| / ||dL/dh_{t+1}|| fitted over the steps before the last.

  python experiments/gradient_flow.py            # T = 100, B = 64, H = 64
  python experiments/gradient_flow.py --quick
"""

import argparse

import common  # noqa: F401  (sets the Agg backend, puts the checkout on sys.path)
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bptt_jax as bj

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=100, help="sequence length T")
parser.add_argument("--batch", type=int, default=64, help="sequences averaged over")
parser.add_argument("--hidden", type=int, default=64, help="hidden units H")
parser.add_argument("--inputs", type=int, default=8, help="input features D")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
parser.add_argument("--out", default=None, help="output folder (default results/gradient_flow)")
args = parser.parse_args()
if args.quick:
  args.steps, args.batch, args.hidden = 20, 4, 8
out = common.results_dir("gradient_flow", args.out)
T, B, H, D = args.steps, args.batch, args.hidden, args.inputs

# The networks: (label, cell, how to change its initial params).
def spectral(radius):
  # Orthogonal U has every eigenvalue on the unit circle: scaling sets the radius.
  return lambda p: {**p, "U": radius * p["U"]}

networks = [
    ("tanh RNN, radius 0.5", bj.rnn(H), spectral(0.5)),
    ("tanh RNN, radius 1.0", bj.rnn(H), spectral(1.0)),
    ("tanh RNN, radius 1.5", bj.rnn(H), spectral(1.5)),
    ("IRNN (ReLU, U = I)", bj.irnn(H, input_std=0.1), lambda p: p),
    ("LSTM", bj.lstm(H), lambda p: p),
    ("GRU", bj.gru(H), lambda p: p),
]

key = jax.random.key(args.seed)
k_x, k_y, k_head, k_cells = jax.random.split(key, 4)
xs = jax.random.normal(k_x, (B, T, D))
ys = jax.random.normal(k_y, (B, 1))
head = bj.init_readout(k_head, H, 1)

def last_step_loss(hs):
  return jnp.mean(bj.mse(bj.readout(head, hs[:, -1]), ys))

figures, curves = {}, {}
for (label, cell, adjust), k in zip(networks, jax.random.split(k_cells, len(networks))):
  params = adjust(cell.init(k, D))
  flow = jax.jit(lambda p, xs, cell=cell: bj.gradient_flow(cell, p, xs, last_step_loss))
  _, norms = flow(params, xs)
  norm_t = np.asarray(jnp.mean(norms, axis=0))  # [T], mean over the batch
  # Growth per step, backwards in time: fit log ||dL/dh_t|| against T - t.
  back = np.arange(T)[::-1]  # T - 1 - t
  finite = (norm_t > 0) & np.isfinite(norm_t)
  slope = float("nan")
  if finite.sum() > 2:
    slope = np.polyfit(back[finite][:-1], np.log(norm_t[finite][:-1]), 1)[0]
  figures[label] = {
      "norm_at_T": float(norm_t[-1]),
      "norm_at_1": float(norm_t[0]),
      "ratio_1_to_T": float(norm_t[0] / norm_t[-1]),
      "growth_per_step": float(np.exp(slope)),
  }
  curves[label] = norm_t
  print(f"{label:24s} ||dL/dh_T|| = {norm_t[-1]:.3e}  ||dL/dh_1|| = {norm_t[0]:.3e}  "
        f"growth per step back = {np.exp(slope):.3f}")

fig, ax = plt.subplots(figsize=(8, 5))
steps = np.arange(1, T + 1)
for label, norm_t in curves.items():
  ax.plot(steps, norm_t, label=label)
for w, style in ((0.5, ":"), (1.0, "--"), (1.5, "-.")):
  ideal = w ** (T - steps) * np.mean([c[-1] for c in curves.values()])
  ax.plot(steps, ideal, "k" + style, lw=0.8, label=f"idealised w^(T-t), w = {w}")
ax.set_yscale("log")
ax.set_ylim(1e-12, 1e6)
ax.set_xlabel("time step t")
ax.set_ylabel("||dL/dh_t||  (loss at step T only)")
ax.set_title(f"Gradient flow through time (T = {T}, H = {H}, mean over {B} sequences)")
ax.legend(fontsize=8)
ax.grid(True, which="both", alpha=0.3)
common.save_plot(fig, f"{out}/gradient_flow.png")
common.write_json(f"{out}/gradient_flow.json", figures, args)
