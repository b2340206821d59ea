"""Character-level language models of the Python standard library's source.

In the spirit of min-char-rnn and char-rnn: read text one character at a time,
predict the next, train with truncated BPTT on a stream whose hidden state is
handed from one chunk to the next. The text is the CPython standard library
(top-level ``*.py``), which ships with every Python. Whole files are held out
for validation and test, so the models are scored on code they never saw.

Models, trained on the same data for the same wall-clock budget:
  rnn   min-char-rnn: tanh RNN, 100 units, chunks of 25, Adagrad 0.1,
        gradients clipped element-wise to [-5, 5], one stream (batch 1);
  lstm  char-rnn style: LSTM, 256 units, chunks of 50, 16 streams, Adam 4e-3,
        gradients clipped to global norm 1;
  min_gru  a stack of minGRU layers (Feng et al. 2024; 3 x 256 units by default),
        unrolled by unroll's default linear scan, otherwise the LSTM's settings.
Baselines: unigram, bigram and trigram counts with add-one smoothing, and an
interpolated Kneser-Ney trigram, on the same split and vocabulary. Scores are
bits per character on the held-out files, read as one stream from start to end
with the carry flowing through; every model scores the same characters.

  python experiments/char_lm.py           # the full comparison (~5 minutes)
  python experiments/char_lm.py --demo    # LSTM only, ~2 minutes
  python experiments/char_lm.py --quick   # smoke test, seconds
"""

import argparse
import collections
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import Timer, results_dir, save_plot, write_json
from tqdm.auto import tqdm

import bptt_jax as bj

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--quick", action="store_true", help="tiny text, a few seconds each (CI)")
p.add_argument("--demo", action="store_true", help="LSTM only, a short run (~2 min)")
p.add_argument("--out", default=None, help="results folder (default results/char_lm*/)")
p.add_argument("--seed", type=int, default=0, help="file split, init and sampling")
p.add_argument("--models", default="rnn,lstm", help="comma-separated: rnn, lstm, min_gru")
# Data.
p.add_argument("--train-bytes", type=int, default=1_500_000, help="training text size")
p.add_argument("--val-bytes", type=int, default=100_000, help="validation text size")
p.add_argument("--test-bytes", type=int, default=150_000, help="test text size")
p.add_argument("--min-count", type=int, default=2,
               help="rarer training characters become the out-of-vocabulary id")
# Training budget, the same for every model.
p.add_argument("--budget", type=float, default=120.0,
               help="training seconds per model (not counting compilation or evaluation)")
p.add_argument("--max-epochs", type=int, default=50, help="stop earlier if reached")
p.add_argument("--min-batches", type=int, default=0,
               help="train on past the budget until this many batches (--quick: 40, so a "
                    "loaded machine still trains each model past chance)")
p.add_argument("--eval-every", type=float, default=30.0,
               help="seconds of training between validation passes")
p.add_argument("--eval-streams", type=int, default=1,
               help="read the held-out text as this many parallel streams, each from a zero "
                    "state (faster, but a cold start mid-file can derail a weak LSTM)")
# min-char-rnn.
p.add_argument("--rnn-hidden", type=int, default=100, help="hidden units")
p.add_argument("--rnn-k1", type=int, default=25, help="steps per update (seq_length)")
p.add_argument("--rnn-batch", type=int, default=1, help="parallel streams")
p.add_argument("--rnn-lr", type=float, default=0.1, help="Adagrad learning rate")
p.add_argument("--rnn-clip", type=float, default=5.0, help="element-wise gradient clip")
# LSTM.
p.add_argument("--lstm-hidden", type=int, default=256, help="hidden units")
p.add_argument("--lstm-k1", type=int, default=50, help="steps per update")
p.add_argument("--lstm-batch", type=int, default=16, help="parallel streams")
p.add_argument("--lstm-lr", type=float, default=4e-3,
               help="Adam learning rate (char-rnn's 2e-3 learns slower in a 2-minute budget)")
p.add_argument("--lstm-clip", type=float, default=1.0, help="global-norm gradient clip")
# minGRU stack.
p.add_argument("--min-gru-layers", type=int, default=3, help="stacked minGRU layers")
p.add_argument("--min-gru-hidden", type=int, default=256, help="hidden units per layer")
# Sampling.
p.add_argument("--prime", default="def ", help="text the samples start from")
p.add_argument("--sample-len", type=int, default=500, help="characters per sample")
p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature")
args = p.parse_args()
if not args.prime:
  p.error("--prime must hold at least one character")
name = "char_lm"
if args.demo:
  name = "char_lm_demo"
  args.models, args.budget, args.eval_every = "lstm", 60.0, 20.0
if args.quick:
  name = "char_lm_quick"
  args.train_bytes, args.val_bytes, args.test_bytes = 40_000, 8_000, 8_000
  args.budget, args.eval_every, args.min_batches = 2.0, 1.0, 40
  args.lstm_hidden, args.min_gru_hidden, args.sample_len = 64, 64, 120
models = [m for m in args.models.split(",") if m]
out = results_dir(name, args.out)
key = jax.random.key(args.seed)
started, load_at_start = time.perf_counter(), os.getloadavg()[0]
print(f"Next-character prediction on the Python standard library's own source: "
      f"{' and '.join(models)}, {args.budget:.0f} s of training each, against n-gram counts; "
      f"whole files held out for validation and test.")

# ----------------------------------------------------------------------------
# Data: whole files of the standard library, split by a seeded shuffle. Each
# file goes to the first of test, val, train that still has room for it.

files = bj.data.stdlib_files()
room = {"test": args.test_bytes, "val": args.val_bytes, "train": args.train_bytes}
split = {s: [] for s in room}
for i in np.random.default_rng(args.seed).permutation(len(files)):
  size = os.path.getsize(files[i])
  for s in room:
    if size <= room[s]:
      split[s].append(files[i])
      room[s] -= size
      break
text = {s: "".join(open(f, encoding="utf-8").read() for f in fs) for s, fs in split.items()}

# Vocabulary from the training text; id 0 is out-of-vocabulary (OOV), for
# characters seen fewer than --min-count times in training or never.
counts = collections.Counter(text["train"])
chars = sorted(c for c, n in counts.items() if n >= args.min_count)
OOV, V = 0, len(chars) + 1
char_id = {c: i + 1 for i, c in enumerate(chars)}
tokens = {s: np.array([char_id.get(c, OOV) for c in t], np.int32) for s, t in text.items()}
decode = lambda ids: "".join(chars[i - 1] if i != OOV else "\ufffd" for i in ids)
for s in ("train", "val", "test"):
  print(f"{s:5s} {len(split[s]):3d} files {len(tokens[s]):>9,} chars  "
        f"OOV {np.mean(tokens[s] == OOV):.5%}")
print(f"vocabulary: {V} ids ({V - 1} characters + OOV)")

# ----------------------------------------------------------------------------
# Count models. Every model scores the same targets: each held-out character
# after the first, given what came before it (for the n-grams, the n - 1
# characters before it; the first context is padded with newlines).

NL = char_id["\n"]


def ngram_counts(ids, n):
  """Counts of every n-gram as a dense array ``[V] * n`` (one bincount)."""
  flat = np.zeros(len(ids) - n + 1, np.int64)
  for j in range(n):
    flat = flat * V + ids[j:len(ids) - n + 1 + j]
  return np.bincount(flat, minlength=V**n).reshape((V,) * n).astype(np.float64)


def discount(c):
  """Absolute discount ``n1 / (n1 + 2 n2)`` (Ney, Essen and Kneser 1994)."""
  n1, n2 = np.sum(c == 1), np.sum(c == 2)
  return n1 / (n1 + 2 * n2) if n1 + n2 else 0.75


def interpolate(c, lower):
  """``max(c - D, 0) / c(ctx) + D N1+(ctx .) / c(ctx) * lower``; ``lower`` if unseen."""
  D = discount(c)
  total = c.sum(-1, keepdims=True)
  seen = np.sum(c > 0, axis=-1, keepdims=True)
  mixed = (np.maximum(c - D, 0) + D * seen * lower) / np.maximum(total, 1)
  return np.where(total > 0, mixed, lower)


c1, c2, c3 = (ngram_counts(tokens["train"], n) for n in (1, 2, 3))
add_one = lambda c: (c + 1) / (c.sum(-1, keepdims=True) + V)
# Interpolated Kneser-Ney (Chen and Goodman 1998): the lower orders count
# distinct left contexts ("continuation counts") instead of occurrences.
cont2 = np.sum(c3 > 0, axis=0).astype(np.float64)  # [b, c]: distinct a in (a, b, c)
cont1 = np.sum(cont2 > 0, axis=0).astype(np.float64)  # [c]: distinct b in (b, c)
kn1 = interpolate(cont1, np.full(V, 1.0 / V))
kn2 = interpolate(cont2, kn1[None, :])
kn3 = interpolate(c3, kn2[None, :, :])
count_models = {"unigram (add-one)": add_one(c1), "bigram (add-one)": add_one(c2),
                "trigram (add-one)": add_one(c3), "trigram (Kneser-Ney)": kn3}
for table in count_models.values():
  assert np.allclose(table.sum(-1), 1.0), "a count model does not sum to one"


def ngram_bpc(table, ids):
  n = table.ndim
  ctx = np.concatenate([np.full(n - 1, NL, np.int32), ids])
  grams = tuple(ctx[j:len(ctx) - n + 1 + j] for j in range(n))
  return float(-np.mean(np.log2(table[grams][1:])))


bpc = {m: {s: ngram_bpc(t, tokens[s]) for s in ("val", "test")}
       for m, t in count_models.items()}
for m, r in bpc.items():
  print(f"{m:22s} val {r['val']:.3f}  test {r['test']:.3f} bits/char")

# ----------------------------------------------------------------------------
# Recurrent models: one-hot characters in, a linear readout to V logits out.
# Params are {"cell": ..., "out": ...}; the model reads its cell's part.

one_hot = lambda ids: jax.nn.one_hot(ids, V)


def char_model(cell):
  """A bptt_jax.Model over character ids ``[B, K]``: one-hot, then the cell."""

  def apply(params, carry, ids, mask):
    return bj.unroll(cell, params["cell"], one_hot(ids), mask=mask, carry=carry)

  return bj.Model(apply, cell.initial_carry, name=cell.name)


def step_loss(params, hs, ys):
  """Cross-entropy of each step, ``hs [B, K, H]``, ``ys [B, K]`` -> ``[B, K]``."""
  return bj.softmax_cross_entropy(bj.readout(params["out"], hs), ys)


def heldout(cell):
  """``bpc(params, ids)``: bits per character on the text ``ids``, read from
  start to end (as --eval-streams streams) in chunks of 1000 steps, the carry
  passed from chunk to chunk, one jitted scan over the chunks."""

  @jax.jit
  def nats(params, xs, ys, mask):  # each [N chunks, streams, 1000]
    def body(carry, chunk):
      x, y, m = chunk
      carry, hs = bj.unroll(cell, params["cell"], one_hot(x), carry=carry)
      return carry, jnp.sum(jnp.where(m, step_loss(params, hs, y), 0.0))

    _, per_chunk = jax.lax.scan(body, cell.initial_carry(args.eval_streams), (xs, ys, mask))
    return jnp.sum(per_chunk)

  def bpc(params, ids):
    batches = bj.data.stream_batches(ids, args.eval_streams, 1000)
    xs, ys, mask = (np.stack([b[k] for b in batches]) for k in ("xs", "ys", "mask"))
    return float(nats(params, xs, ys, mask)) / mask.sum() / np.log(2)

  return bpc


def sampler(cell, length):
  """``sample(params, key, prime ids [P], temperature) -> ids [length]``."""

  @jax.jit
  def sample(params, key, prime, temperature):
    carry, hs = bj.unroll(cell, params["cell"], one_hot(prime[None]))

    def body(loop, key):
      carry, h = loop
      logits = bj.readout(params["out"], h) / temperature
      x = jax.random.categorical(key, logits.at[:, OOV].set(-jnp.inf))  # [1]
      carry, h = cell.step(params["cell"], carry, one_hot(x))
      return (carry, h), x[0]

    _, ids = jax.lax.scan(body, (carry, hs[:, -1]), jax.random.split(key, length))
    return ids

  return sample


class Budget:
  """Seconds of training so far, not counting the first step (which compiles)
  nor evaluation; the batches so far; and when the next evaluation is due."""

  def __init__(self, seconds):
    self.seconds, self.created, self.start = seconds, time.perf_counter(), None
    self.first_step, self.paused, self.next_eval = 0.0, 0.0, args.eval_every
    self.batches = 0

  def started(self):
    if self.start is None:
      self.start = time.perf_counter()
      self.first_step = self.start - self.created

  def spent(self):
    return 0.0 if self.start is None else time.perf_counter() - self.start - self.paused

  def over(self):
    return (self.start is not None and self.spent() >= self.seconds
            and self.batches >= args.min_batches)


settings = {
    "rnn": dict(cell=bj.rnn(args.rnn_hidden), k1=args.rnn_k1, batch=args.rnn_batch,
                # min-char-rnn sums the loss over the chunk and clips each entry.
                reduction="sum", max_norm=None, chunks_per_batch=40,
                tx=bj.optimizer(args.rnn_lr, name="adagrad", max_norm=None,
                                clip_value=args.rnn_clip)),
    "lstm": dict(cell=bj.lstm(args.lstm_hidden), k1=args.lstm_k1, batch=args.lstm_batch,
                 reduction="mean", max_norm=args.lstm_clip, chunks_per_batch=4,
                 tx=bj.optimizer(args.lstm_lr, name="adam", max_norm=args.lstm_clip)),
    "min_gru": dict(cell=bj.stack(*[bj.min_gru(args.min_gru_hidden)
                                    for _ in range(args.min_gru_layers)]),
                    k1=args.lstm_k1, batch=args.lstm_batch, reduction="mean",
                    max_norm=args.lstm_clip, chunks_per_batch=4,
                    tx=bj.optimizer(args.lstm_lr, name="adam", max_norm=args.lstm_clip)),
}
evaluate_bpc = {m: heldout(settings[m]["cell"]) for m in models}


def train(m, key):
  """Trains model ``m`` for --budget seconds; returns ``(params, history, budget)``."""
  cfg = settings[m]
  cell, B, k1 = cfg["cell"], cfg["batch"], cfg["k1"]
  k_cell, k_out = jax.random.split(key)
  params = {"cell": cell.init(k_cell, V), "out": bj.init_readout(k_out, cell.hidden_size, V)}
  step = bj.tbptt_step(char_model(cell), step_loss, cfg["tx"], k1=k1,
                       reduction=cfg["reduction"], max_norm=cfg["max_norm"])
  # Streaming: B contiguous streams of the training text; the carry at the end
  # of one batch is where the next batch starts. Each batch holds
  # chunks_per_batch chunks of k1 steps, one optimizer update per chunk. Every
  # epoch starts the streams again from zeros ("reset").
  state = bj.TrainState.create(params, cfg["tx"], carry=cell.initial_carry(B))
  batches = bj.data.stream_batches(tokens["train"], B, k1 * cfg["chunks_per_batch"])
  for i, batch in enumerate(batches):
    batch["reset"] = np.full(B, i == 0)
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
  print(f"\n{m}: {n_params:,} params, batch {B} x {k1 * cfg['chunks_per_batch']} steps, "
        f"{len(batches)} batches per epoch, budget {args.budget:.0f} s")
  budget = Budget(args.budget)

  def epoch_batches(epoch, key):
    for batch in batches:
      if budget.over():
        return
      yield batch
      budget.started()  # the first step, compilation included, has run
      budget.batches += 1

  def evaluate(params, force=False):
    """Validation bits/char every --eval-every seconds and after the last step."""
    if not (force or budget.over() or budget.spent() >= budget.next_eval):
      return {}
    with Timer() as t:
      v = evaluate_bpc[m](params, tokens["val"])
    if budget.start is not None:
      budget.paused += t.seconds
    budget.next_eval = budget.spent() + args.eval_every
    tqdm.write(f"  {m}: {budget.spent():6.1f} s  val {v:.3f} bits/char")
    return {"bpc": v, "seconds": budget.spent()}

  # A fresh run: fit would resume from an earlier run's checkpoints, which
  # mark the run as finished (once the budget is spent the remaining epochs
  # are empty, so fit's epoch counter ends at --max-epochs).
  ckpt_dir = os.path.join(out, "checkpoints", m)
  shutil.rmtree(ckpt_dir, ignore_errors=True)
  state, history = bj.fit(step, state, epoch_batches, epochs=args.max_epochs,
                          eval_fn=evaluate, eval_every=1,
                          log_path=os.path.join(out, f"{m}_log.jsonl"),
                          checkpoint_dir=ckpt_dir, checkpoint_every=200, desc=m)
  if "eval_bpc" not in history[-1]:  # --max-epochs reached before the budget
    history[-1].update({f"eval_{k}": v for k, v in evaluate(state.params, True).items()})
  return state.params, history, budget


trained, curves, training, samples = {}, {}, {}, {}
for m in models:
  key, k = jax.random.split(key)
  trained[m], history, budget = train(m, k)
  cfg = settings[m]
  B, upb = cfg["batch"], cfg["chunks_per_batch"]
  # Per batch: mean training loss per character, in bits. With the "sum"
  # reduction each update's loss is summed over its k1 steps (per stream).
  if cfg["reduction"] == "sum":
    loss = [r["loss"] * B * upb / r["steps"] / np.log(2) for r in history]
  else:
    loss = [r["loss"] / np.log(2) for r in history]
  evals = [r for r in history if "eval_bpc" in r]
  curves[m] = {"updates": [r["step"] * upb for r in history], "train_bpc": loss,
               "eval_updates": [r["step"] * upb for r in evals],
               "eval_seconds": [r["eval_seconds"] for r in evals],
               "val_bpc": [r["eval_bpc"] for r in evals]}
  chars_seen = sum(r["steps"] for r in history)
  ckpt_dir = os.path.join(out, "checkpoints", m)
  training[m] = {
      "params": int(sum(a.size for a in jax.tree_util.tree_leaves(trained[m]))),
      "hidden": cfg["cell"].hidden_size, "k1": cfg["k1"], "batch": B,
      "train_seconds": budget.spent(), "first_step_seconds": budget.first_step,
      "eval_seconds": budget.paused, "updates": len(history) * upb,
      "chars_seen": int(chars_seen), "epochs": chars_seen / (len(tokens["train"]) - 1),
      "chars_per_second": chars_seen / max(budget.spent(), 1e-9),
      "checkpoint": os.path.join("checkpoints", m, sorted(os.listdir(ckpt_dir))[-1]),
  }
  bpc[m] = {"val": curves[m]["val_bpc"][-1], "test": evaluate_bpc[m](trained[m], tokens["test"])}
  t = training[m]
  print(f"{m}: {t['updates']:,} updates, {t['chars_seen']:,} chars ({t['epochs']:.2f} epochs) "
        f"in {t['train_seconds']:.0f} s of training (+{t['first_step_seconds']:.0f} s first "
        f"step, +{t['eval_seconds']:.0f} s validation); test {bpc[m]['test']:.3f} bits/char")

# ----------------------------------------------------------------------------
# Samples: temperature sampling, one character per step of a jitted scan. The
# recurrent models' params come back from their last checkpoint on disk.

prime = np.array([char_id.get(c, OOV) for c in args.prime], np.int32)
for m in models:
  cell = settings[m]["cell"]
  template = {"state": bj.TrainState.create(trained[m], settings[m]["tx"],
                                            carry=cell.initial_carry(settings[m]["batch"])),
              "epoch": 0, "position": 0, "step": 0, "key": key}
  step_at, restored = bj.restore_latest(os.path.join(out, "checkpoints", m), template)
  params = restored["state"].params
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, trained[m]))
  key, k = jax.random.split(key)
  ids = sampler(cell, args.sample_len)(params, k, jnp.asarray(prime), args.temperature)
  samples[m] = args.prime + decode(np.asarray(ids))
  print(f"restored {m} from its checkpoint (step {step_at}): same params as trained")

# The Kneser-Ney trigram, sampled with numpy at the same temperature.
rng = np.random.default_rng(args.seed)
ctx = list(np.concatenate([[NL, NL], prime])[-2:])
ids = []
for _ in range(args.sample_len):
  q = kn3[ctx[-2], ctx[-1]] ** (1.0 / args.temperature)
  q[OOV] = 0.0
  ids.append(int(rng.choice(V, p=q / q.sum())))
  ctx.append(ids[-1])
samples["trigram (Kneser-Ney)"] = args.prime + decode(ids)

with open(os.path.join(out, "samples.txt"), "w") as f:
  for m, s in samples.items():
    block = f"==== {m} (temperature {args.temperature}) ====\n{s}\n"
    print("\n" + block, end="")
    f.write(block + "\n")
print(f"wrote {os.path.relpath(os.path.join(out, 'samples.txt'))}")

# ----------------------------------------------------------------------------
# Results: the table, a plot and the figures.

print(f"\n{'model':22s} {'val':>6s} {'test':>6s}  bits per character")
for m, r in bpc.items():
  print(f"{m:22s} {r['val']:6.3f} {r['test']:6.3f}")
below = None
if "lstm" in bpc:
  kn = bpc["trigram (Kneser-Ney)"]["test"]
  below = bool(bpc["lstm"]["test"] < kn)
  print(f"LSTM test {bpc['lstm']['test']:.3f} bits/char is {'' if below else 'NOT '}below "
        f"the Kneser-Ney trigram's {kn:.3f}")

import matplotlib.pyplot as plt  # noqa: E402 (common chose the Agg backend)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
colors = {"rnn": "tab:blue", "lstm": "tab:red", "min_gru": "tab:green"}
for m in models:
  c = curves[m]
  ax1.plot(c["updates"], c["train_bpc"], color=colors[m], alpha=0.2, lw=0.7)
  decay, avg, smooth = 1 - 50 / len(c["train_bpc"]), 0.0, []  # average over ~2% of the run
  for i, v in enumerate(c["train_bpc"]):
    avg = decay * avg + (1 - decay) * v
    smooth.append(avg / (1 - decay ** (i + 1)))  # bias-corrected, as in Adam
  ax1.plot(c["updates"], smooth, color=colors[m], label=f"{m}, training")
  ax2.plot(c["eval_seconds"], c["val_bpc"], "o-", color=colors[m], label=f"{m}, validation")
for ax in (ax1, ax2):
  for cm, style in (("bigram (add-one)", ":"), ("trigram (add-one)", "-."),
                    ("trigram (Kneser-Ney)", "--")):
    ax.axhline(bpc[cm]["val"], color="gray", ls=style, lw=1, label=f"{cm}, validation")
  ax.set_ylabel("bits per character")
  ax.set_ylim(1.0, 5.0)
  ax.legend(fontsize=7, loc="upper right")
ax1.set_xscale("log")
ax1.set_xlabel("optimizer updates (one per chunk of k1 steps; mean over each batch)")
ax1.set_title("training loss")
ax2.set_xlabel(f"training seconds (budget {args.budget:.0f} s per model)")
ax2.set_xlim(0, args.budget * 1.05)
ax2.set_title("held-out validation files")
save_plot(fig, os.path.join(out, "loss.png"))

write_json(os.path.join(out, "char_lm.json"), {
    "bits_per_char": bpc, "lstm_below_kneser_ney_trigram": below, "training": training,
    "split": {s: {"files": [os.path.basename(f) for f in split[s]], "chars": len(tokens[s]),
                  "oov_rate": float(np.mean(tokens[s] == OOV))} for s in split},
    "vocabulary_size": V, "samples": samples,
    # Every validation pass, and the training loss of at most ~500 batches
    # (each batch's is in <model>_log.jsonl).
    "curves": {m: {k: v[::max(1, len(v) // 500)] if k in ("updates", "train_bpc") else v
                   for k, v in c.items()} for m, c in curves.items()},
    "total_seconds": time.perf_counter() - started,
    "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
}, args)
print(f"\n{time.perf_counter() - started:.0f} s in all. In {os.path.relpath(out)}/: "
      "char_lm.json (the numbers), loss.png, samples.txt, and per model a JSON-lines "
      "training log (<model>_log.jsonl) and checkpoints (checkpoints/<model>/).")
