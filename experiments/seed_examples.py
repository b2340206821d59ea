"""The sketches of the three BPTT notes, each done right with bptt_jax.

Every section prints what it shows. The notes' numpy backward passes overwrite
gradients instead of accumulating them and reuse one hidden state for every
step; here the gradients come from autodiff through lax.scan, checked against
an explicit reverse-scan BPTT.

  python experiments/seed_examples.py
  python experiments/seed_examples.py --quick
"""

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bptt_jax as bj

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true", help="fewer epochs, for a smoke test")
parser.add_argument("--out", default=None)
args = parser.parse_args()
out = common.results_dir("seed_examples", args.out)
key = jax.random.key(args.seed)
keys = iter(jax.random.split(key, 64))
figures = {}

def section(title):
  print(f"\n== {title} ==")

def fit_full(loss_fn, params, batch, tx, epochs):
  """Full-batch training for ``epochs`` updates; returns params and the loss curve."""
  step = bj.train_step(loss_fn, tx)
  state, losses = bj.TrainState.create(params, tx), []
  for _ in range(epochs):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return state.params, losses

# --------------------------------------------------------------------------
section("Keras example: SimpleRNN(10, tanh) + Dense(1) on 1, 2, 3, 4; Adam, MSE, 100 epochs")
X = jnp.arange(1.0, 5.0).reshape(1, 4, 1)  # [B, T, D]
cell = bj.rnn(10, "tanh")
params = {"cell": cell.init(next(keys), 1), "head": bj.init_readout(next(keys), 10, 1)}

def seq_mse(params, batch, cell=cell):
  xs, ys = batch
  _, hs = bj.unroll(cell, params["cell"], xs)
  return bj.sequence_loss(bj.mse(bj.readout(params["head"], hs), ys), reduction="mean")

epochs = 10 if args.quick else 100
params, losses = fit_full(seq_mse, params, (X, X), optax.adam(1e-3), epochs)
_, hs = bj.unroll(cell, params["cell"], X)
pred = bj.readout(params["head"], hs)
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after {epochs} epochs (Keras' default lr 1e-3)")
print("predictions:", np.round(np.asarray(pred).ravel(), 3), "targets: [1 2 3 4]")
params_fast, losses_fast = fit_full(seq_mse, params, (X, X), optax.adam(3e-2), epochs)
print(f"with lr 3e-2 instead: loss {losses_fast[-1]:.4f}")
figures["keras_toy"] = {"loss_first": losses[0], "loss_last": losses[-1],
                        "loss_last_lr_3e-2": losses_fast[-1]}

# --------------------------------------------------------------------------
section("Forward pass: the unrolled scan equals the notes' Python loop")
cell = bj.rnn(3)
p = cell.init(next(keys), 3)
xs = jnp.array([[[1, 0, 1], [0, 1, 1], [1, 1, 0]]], jnp.float32)
_, hs = jax.jit(lambda p, xs: bj.unroll(cell, p, xs))(p, xs)
h = np.zeros(3)
for x in np.asarray(xs[0]):
  h = np.tanh(x @ np.asarray(p["W"]) + h @ np.asarray(p["U"]) + np.asarray(p["b"]))
print("final hidden state, scan:", np.round(np.asarray(hs[0, -1]), 5), " loop:", np.round(h, 5))
figures["forward_max_diff"] = float(np.max(np.abs(np.asarray(hs[0, -1]) - h)))

# --------------------------------------------------------------------------
section("Losses: MSE and cross-entropy (on logits, with integer labels)")
preds, targets = jnp.array([0.2, 0.7, 0.1]), jnp.array([0.0, 1.0, 0.0])
print("MSE:", float(jnp.mean(optax.losses.squared_error(preds, targets))))
logits = jnp.log(preds)  # the note's probabilities, as logits
print("cross-entropy, label 1:", float(bj.softmax_cross_entropy(logits, jnp.array(1))),
      "(= -log 0.7 =", round(-np.log(0.7), 6), ")")

# --------------------------------------------------------------------------
section("Backward pass: explicit BPTT (reverse scan) equals autodiff")
cell = bj.rnn(5)
p = cell.init(next(keys), 3)
head = bj.init_readout(next(keys), 5, 1)
xs = jax.random.normal(next(keys), (2, 6, 3))
ys = jax.random.normal(next(keys), (2, 6, 1))

def loss_of_hs(hs):
  return bj.sequence_loss(bj.mse(bj.readout(head, hs), ys))

loss, explicit = jax.jit(lambda p: bj.rnn_value_and_grad(p, xs, loss_of_hs, per_step=True))(p)
auto = jax.grad(lambda p: loss_of_hs(bj.unroll(cell, p, xs)[1]))(p)
for k in ("W", "U", "b"):
  diff = float(jnp.max(jnp.abs(explicit.grads[k] - auto[k])))
  print(f"d{k}: max |explicit - autodiff| = {diff:.2e};  per-step contributions sum to it: "
        f"{bool(jnp.allclose(explicit.per_step[k].sum(0), explicit.grads[k], atol=1e-6))}")
  figures[f"bptt_max_diff_{k}"] = diff

# --------------------------------------------------------------------------
section("Truncated BPTT: 100 steps, chunks of 10, the hidden state flowing between chunks")
cell = bj.rnn(3)
xs = jax.random.normal(next(keys), (1, 100, 3))
ys = jax.random.normal(next(keys), (1, 100, 1))
params = {"cell": cell.init(next(keys), 3), "head": bj.init_readout(next(keys), 3, 1)}

def step_loss(params, hs, ys):
  return bj.mse(bj.readout(params["head"], hs), ys)

tx = optax.sgd(0.01)
tbptt = bj.tbptt_step(cell, step_loss, tx, k1=10, reduction="sum")
state, m = tbptt(bj.TrainState.create(params, tx), {"xs": xs, "ys": ys})
print(f"{len(m['loss'])} updates, one per chunk; total loss {float(m['loss'].sum()):.3f}; "
      f"steps counted {int(m['steps'].sum())} of 100")
figures["tbptt_updates"] = int(state.step)

# --------------------------------------------------------------------------
section("Gradient clipping by global norm (Pascanu et al. 2013), with optax")
grads = [jax.random.normal(k, (3, 3)) * 10 for k in jax.random.split(next(keys), 3)]
clipped, _ = optax.clip_by_global_norm(5.0).update(grads, optax.EmptyState())
print(f"global norm before {float(optax.global_norm(grads)):.2f}, "
      f"after {float(optax.global_norm(clipped)):.2f}")

# --------------------------------------------------------------------------
section("Vanishing and exploding gradients: the idealised w^t beside a real tanh RNN")
for w in (0.5, 1.0, 1.5):
  print(f"w = {w}: w^99 = {w ** 99:.3e}")
cell = bj.rnn(32)
p = cell.init(next(keys), 4)
xs = jax.random.normal(next(keys), (8, 100, 4))
for radius in (0.5, 1.0, 1.5):
  q = {**p, "U": radius * p["U"]}
  _, norms = jax.jit(lambda q: bj.gradient_flow(cell, q, xs, lambda hs: jnp.sum(hs[:, -1])))(q)
  n = np.asarray(norms.mean(0))
  print(f"tanh RNN, spectral radius {radius}: ||dL/dh_1|| / ||dL/dh_100|| = {n[0] / n[-1]:.3e}"
        "  (see experiments/gradient_flow.py)")

# --------------------------------------------------------------------------
section("LSTM cell: one step")
cell = bj.lstm(5)
p = cell.init(next(keys), 10)
carry, h = cell.step(p, cell.initial_carry(1), jax.random.normal(next(keys), (1, 10)))
print("new hidden state:", np.round(np.asarray(carry.h[0]), 4))
print("new cell state:  ", np.round(np.asarray(carry.c[0]), 4))

# --------------------------------------------------------------------------
section("Sentiment toy: embedding + tanh RNN + sigmoid, trained on six labelled phrases")
vocab = {w: i + 1 for i, w in enumerate(
    "this movie was good bad great terrible amazing awful not".split())}
phrases = [("this movie was great", 1), ("this movie was amazing", 1), ("good movie", 1),
           ("this movie was terrible", 0), ("awful movie", 0), ("this was bad", 0)]
ids, lengths = bj.data.pad_sequences([[vocab[w] for w in s.split()] for s, _ in phrases])
labels = jnp.array([[y] for _, y in phrases], jnp.float32)
cell = bj.rnn(8)
params = {"embed": 0.1 * jax.random.normal(next(keys), (len(vocab) + 1, 4)),
          "cell": cell.init(next(keys), 4), "head": bj.init_readout(next(keys), 8, 1)}

def sentiment_logits(params, ids, lengths):
  _, hs = bj.unroll(cell, params["cell"], params["embed"][ids], lengths=lengths)
  return bj.readout(params["head"], bj.last_step(hs, lengths))

def bce(params, batch):
  ids, lengths, labels = batch
  return jnp.mean(bj.sigmoid_binary_cross_entropy(sentiment_logits(params, ids, lengths), labels))

params, losses = fit_full(bce, params, (ids, lengths, labels), optax.adam(0.05),
                          20 if args.quick else 200)
tests = ["this movie was good", "this movie was awful"]
t_ids, t_len = bj.data.pad_sequences([[vocab[w] for w in s.split()] for s in tests])
scores = jax.nn.sigmoid(sentiment_logits(params, t_ids, t_len))[:, 0]
for s, score in zip(tests, np.asarray(scores)):
  print(f"{s!r}: positive with probability {score:.3f}")
figures["sentiment_toy_scores"] = [float(s) for s in scores]

# --------------------------------------------------------------------------
section("Temperature toy: 20 + 10 sin(0.1 t) + noise, windows of 7, one-step-ahead RNN")
rng = np.random.default_rng(42)
temps = 20 + 10 * np.sin(np.arange(100) * 0.1) + rng.normal(0, 2, 100)
xs, ys = bj.data.windows(temps, 7)
mean, std = temps[:80].mean(), temps[:80].std()
xs, ys = (xs - mean) / std, (ys - mean) / std
cell = bj.rnn(10)
params = {"cell": cell.init(next(keys), 1), "head": bj.init_readout(next(keys), 10, 1)}

def forecast(params, xs):
  _, hs = bj.unroll(cell, params["cell"], xs)
  return bj.readout(params["head"], hs[:, -1])

def forecast_mse(params, batch):
  return jnp.mean(bj.mse(forecast(params, batch[0]), batch[1]))

params, _ = fit_full(forecast_mse, params, (xs[:70], ys[:70]), optax.adam(1e-2),
                     30 if args.quick else 300)
pred = np.asarray(forecast(params, xs[70:])) * std + mean
actual = ys[70:] * std + mean
rmse = float(np.sqrt(np.mean((pred - actual) ** 2)))
print("first 5 held-out temperatures:", np.round(actual[:5, 0], 2))
print("first 5 predictions:          ", np.round(pred[:5, 0], 2))
print(f"held-out RMSE {rmse:.2f} (the noise alone has std 2; see experiments/forecast.py)")
figures["temperature_toy_rmse"] = rmse

# --------------------------------------------------------------------------
section("Training loop on (100, 5, 3) random inputs, (100, 1) random targets, 10 epochs")
X = jax.random.normal(next(keys), (100, 5, 3))
Y = jax.random.normal(next(keys), (100, 1))
cell = bj.rnn(10)
params = {"cell": cell.init(next(keys), 3), "head": bj.init_readout(next(keys), 10, 1)}

def last_mse(params, batch):
  xs, ys = batch
  _, hs = bj.unroll(cell, params["cell"], xs)
  return jnp.mean(bj.mse(bj.readout(params["head"], hs[:, -1]), ys))

tx = bj.optimizer(0.01, name="sgd", max_norm=5.0)
state, history = bj.fit(bj.train_step(last_mse, tx), bj.TrainState.create(params, tx),
                        bj.data.shuffled_batches((X, Y), 1), epochs=2 if args.quick else 10,
                        key=next(keys), desc="train")
per_epoch = {}
for h in history:
  per_epoch.setdefault(h["epoch"], []).append(h["loss"])
for epoch, losses in per_epoch.items():
  print(f"epoch {epoch + 1}, loss {np.mean(losses):.4f}")
print("(the targets are noise: the loss falls only as far as memorising 100 examples allows)")

# --------------------------------------------------------------------------
section("Layer normalization (Ba et al. 2016) inside the recurrence")
cell = bj.rnn(10, layer_norm=True)
p = cell.init(next(keys), 3)
_, hs = bj.unroll(cell, p, jax.random.normal(next(keys), (4, 5, 3)) * 100)
print("layer-norm RNN on inputs scaled by 100: hidden state stays bounded, max |h| =",
      round(float(jnp.max(jnp.abs(hs))), 3), "; params:", sorted(p))

common.write_json(f"{out}/seed_examples.json", figures, args)
