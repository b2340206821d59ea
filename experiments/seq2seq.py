"""What attention buys an encoder-decoder: date normalization and addition.

(a) Dates written in many human formats ("Tuesday, 3 March 1998", "03/03/98",
"3 mar 98", ...) are mapped, character by character, to ISO "1998-03-03".
Test sets: held-out dates in the training formats, and held-out dates in whole
formats never seen in training (built from pieces the training formats use).
(b) Addition of numbers written as strings ("123+4567" -> "4690"; Zaremba and
Sutskever 2014), trained on operands of 1 to 3 digits and tested on longer ones.

For each task, three models with the same encoder (a bidirectional LSTM), the
same decoder (an LSTM) and the same budget (updates, batch, optimizer): no
attention (the decoder starts from the encoder's summary and sees nothing
else), additive attention (Bahdanau et al. 2014) and dot attention (Luong et
al. 2015). Reported: exact-match accuracy (greedy decoding) against input
length, greedy against beam search, and heatmaps of the attention weights.
All data come from the standard library's `random` and `datetime`, seeded.

  python experiments/seq2seq.py           # 43 min on 2 CPU cores shared with other jobs
  python experiments/seq2seq.py --quick
"""

import argparse
import datetime
import random
import time

import common
import jax
import matplotlib.pyplot as plt
import numpy as np

import bptt_jax as bj

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--tasks", nargs="+", default=["dates", "addition"])
parser.add_argument("--models", nargs="+", default=["none", "additive", "dot"],
                    help="attention: none, additive, dot")
parser.add_argument("--hidden", type=int, default=64, help="encoder units per direction")
parser.add_argument("--embed", type=int, default=32, help="character embedding size")
parser.add_argument("--updates", type=int, default=1500, help="optimizer updates per model")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
parser.add_argument("--max-norm", type=float, default=1.0, help="global-norm clipping")
parser.add_argument("--train-size", type=int, default=20000, help="training examples per task")
parser.add_argument("--test-size", type=int, default=1000, help="examples per test set")
parser.add_argument("--beam", type=int, default=5, help="beam width")
parser.add_argument("--length-penalty", type=float, default=0.6)
parser.add_argument("--train-digits", type=int, default=3, help="addition: longest operand")
parser.add_argument("--test-digits", type=int, default=6, help="addition: longest test operand")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
parser.add_argument("--out", default=None)
args = parser.parse_args()
if args.quick:  # one model per task: compiling dominates a run this small
  args.hidden, args.embed, args.updates, args.batch, args.models = 16, 8, 20, 16, ["additive"]
  args.train_size, args.test_size, args.beam, args.test_digits = 400, 40, 2, 4
out = common.results_dir("seq2seq", args.out)
PAD, BOS, EOS = 0, 1, 2  # token ids shared by every vocabulary

# ----------------------------------------------------------------------------
# Data. (a) dates: train formats, and formats held out whole.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

def ordinal(n):
  return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"

TRAIN_FORMATS = {  # day/month order wherever the month is a number
    "Tuesday, 3 March 1998":
        lambda d: f"{DAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
    "03/03/98": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year % 100:02d}",
    "3 mar 98": lambda d: f"{d.day} {MONTHS[d.month - 1][:3].lower()} {d.year % 100:02d}",
    "March 3, 1998": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "3.3.1998": lambda d: f"{d.day}.{d.month}.{d.year}",
    "03.03.98": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year % 100:02d}",
    "Mar 3 1998": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    "tue 3 mar 1998": lambda d: f"{DAYS[d.weekday()][:3].lower()} {d.day} "
                                f"{MONTHS[d.month - 1][:3].lower()} {d.year}",
    "the 3rd of March 1998": lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    "3/3/1998": lambda d: f"{d.day}/{d.month}/{d.year}",
    "19980303": lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
}
HELD_OUT_FORMATS = {
    "3 March, 98": lambda d: f"{d.day} {MONTHS[d.month - 1]}, {d.year % 100:02d}",
    "03.03.1998": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    "Tue, Mar 3, 1998": lambda d: f"{DAYS[d.weekday()][:3]}, {MONTHS[d.month - 1][:3]} "
                                  f"{d.day}, {d.year}",
}
FIRST, DAYS_SPAN = datetime.date(1950, 1, 1), 36524  # 1950-01-01 .. 2049-12-31: yy is unambiguous

def date_pairs(rng, n, formats, exclude=frozenset()):
  """``n`` (text, ISO) pairs: a random date (not in ``exclude``) in a random format."""
  pairs, names = [], sorted(formats)
  while len(pairs) < n:
    d = FIRST + datetime.timedelta(days=rng.randrange(DAYS_SPAN))
    if d not in exclude:
      pairs.append((formats[rng.choice(names)](d), d.isoformat(), d))
  return pairs

# (b) addition: operands with a uniform number of digits, then a uniform value.
def number(rng, digits):
  return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)

def addition_pairs(rng, n, lo, hi):
  """Sums whose longer operand has between ``lo`` and ``hi`` digits."""
  pairs = []
  while len(pairs) < n:
    a, b = number(rng, rng.randint(1, hi)), number(rng, rng.randint(1, hi))
    if lo <= max(len(str(a)), len(str(b))) <= hi:
      pairs.append((f"{a}+{b}", str(a + b), max(len(str(a)), len(str(b)))))
  return pairs

class Vocab:
  """Characters to ids 3, 4, ...; 0, 1, 2 are pad, start and end."""

  def __init__(self, texts):
    self.chars = sorted(set("".join(texts)))
    self.ids = {c: i + 3 for i, c in enumerate(self.chars)}

  def __len__(self):
    return len(self.chars) + 3

  def encode(self, text):
    return [self.ids[c] for c in text]

  def decode(self, ids):
    return "".join(self.chars[i - 3] for i in ids if i >= 3)

def encode_batch(pairs, src_vocab, tgt_vocab, S, T):
  """Padded arrays: source [N, S], decoder inputs [N, T] (BOS + target), outputs
  [N, T] (target + EOS), and both lengths."""
  n = len(pairs)
  source, xs, ys = (np.zeros((n, S), np.int32), np.zeros((n, T), np.int32),
                    np.zeros((n, T), np.int32))
  src_len, tgt_len = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for i, (text, target, *_) in enumerate(pairs):
    s, t = src_vocab.encode(text), tgt_vocab.encode(target)
    source[i, :len(s)], src_len[i] = s, len(s)
    xs[i, :len(t) + 1] = [BOS] + t
    ys[i, :len(t) + 1] = t + [EOS]
    tgt_len[i] = len(t) + 1
  return {"source": source, "source_lengths": src_len, "xs": xs, "ys": ys, "lengths": tgt_len}

rng = random.Random(args.seed)
tasks = {}
if "dates" in args.tasks:
  train = date_pairs(rng, args.train_size, TRAIN_FORMATS)
  seen = frozenset(d for *_, d in train)
  tests = {"held-out dates": date_pairs(rng, args.test_size, TRAIN_FORMATS, seen),
           "held-out formats": date_pairs(rng, args.test_size, HELD_OUT_FORMATS, seen)}
  tasks["dates"] = (train, tests)
if "addition" in args.tasks:
  train = addition_pairs(rng, args.train_size, 1, args.train_digits)
  seen = frozenset(text for text, *_ in train)
  tests = {f"{k} digits": [p for p in addition_pairs(rng, 3 * args.test_size, k, k)
                           if p[0] not in seen][:args.test_size]
           for k in range(1, args.test_digits + 1)}
  # Only sums never seen in training; all 100 one-digit sums usually are.
  tests = {name: pairs for name, pairs in tests.items() if pairs}
  tasks["addition"] = (train, tests)

# ----------------------------------------------------------------------------
# Models and training: the same encoder, decoder and budget for every attention.
H = args.hidden
ATTENTIONS = {"none": None, "additive": bj.additive_attention(H), "dot": bj.dot_attention()}

def build(name, src_vocab, tgt_vocab):
  return bj.seq2seq(bj.lstm(H), bj.lstm(2 * H), source_vocab=len(src_vocab),
                    target_vocab=len(tgt_vocab), embed_size=args.embed,
                    attention=ATTENTIONS[name], bidirectional=True)

def accuracy(tokens, pairs, tgt_vocab):
  """Exact match: the decoded characters before the end token are the target."""
  hits = []
  for row, (_, target, *_) in zip(np.asarray(tokens), pairs):
    row = list(row)
    row = row[:row.index(EOS)] if EOS in row else None
    hits.append(row is not None and tgt_vocab.decode(row) == target)
  return np.array(hits)

figures, curves, heatmaps = {}, {}, {}
for task, (train, tests) in tasks.items():
  every = [p for ps in [train] + list(tests.values()) for p in ps]
  src_vocab, tgt_vocab = Vocab([p[0] for p in every]), Vocab([p[1] for p in every])
  S = max(len(p[0]) for p in every)
  T = max(len(p[1]) for p in every) + 1
  train_data = encode_batch(train, src_vocab, tgt_vocab, S, T)
  test_data = {name: encode_batch(ps, src_vocab, tgt_vocab, S, T) for name, ps in tests.items()}
  figures[task] = {"source_steps": S, "target_steps": T, "train_examples": len(train),
                   "test_examples": {k: len(v) for k, v in tests.items()},
                   "source_vocab": len(src_vocab), "target_vocab": len(tgt_vocab), "models": {}}
  for name in args.models:
    s2s = build(name, src_vocab, tgt_vocab)
    key = jax.random.key(args.seed)
    params = s2s.init(key)
    tx = bj.optimizer(args.lr, max_norm=args.max_norm)
    step = bj.train_step(bj.seq2seq_loss(s2s), tx, max_norm=args.max_norm)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))

    def batches(epoch, k, data=train_data):
      rows = np.random.default_rng([args.seed, epoch]).integers(
          0, len(data["source"]), (args.updates, args.batch))
      for idx in rows:
        yield {key: v[idx] for key, v in data.items()}

    start = time.perf_counter()
    state, history = bj.fit(step, bj.TrainState.create(params, tx), batches, epochs=1,
                            key=jax.random.fold_in(key, 1), desc=f"{task} {name}")
    train_seconds = time.perf_counter() - start

    greedy = jax.jit(lambda p, s, l, s2s=s2s, T=T: bj.greedy_decode(
        *s2s.decoding(p, s, l), bos=BOS, eos=EOS, max_length=T))
    beam = jax.jit(lambda p, s, l, s2s=s2s, T=T: bj.beam_search(
        *s2s.decoding(p, s, l), bos=BOS, eos=EOS, max_length=T, beam_width=args.beam,
        length_penalty=args.length_penalty))
    row = {"params": int(n_params), "train_seconds": train_seconds,
           "final_train_loss": history[-1]["loss"],
           "nonfinite_steps": history[-1]["nonfinite_total"], "tests": {}}
    for test_name, data in test_data.items():
      pairs = tests[test_name]
      g = greedy(state.params, data["source"], data["source_lengths"])
      b = beam(state.params, data["source"], data["source_lengths"])
      hit_g = accuracy(g.tokens, pairs, tgt_vocab)
      hit_b = accuracy(b.tokens[:, 0], pairs, tgt_vocab)
      lengths = data["source_lengths"]
      by_length = {int(n): float(hit_g[lengths == n].mean()) for n in np.unique(lengths)}
      row["tests"][test_name] = {"greedy_exact_match": float(hit_g.mean()),
                                 "beam_exact_match": float(hit_b.mean()),
                                 "greedy_by_source_length": by_length,
                                 "examples": int(len(pairs))}
      print(f"{task:8s} {name:8s} {test_name:16s} greedy {hit_g.mean():.3f} "
            f"beam({args.beam}) {hit_b.mean():.3f}")
      if g.weights is not None and test_name == list(test_data)[-1]:
        heatmaps[(task, name)] = [(pairs[i][0], tgt_vocab, np.asarray(g.tokens[i]),
                                   np.asarray(g.weights[i]), int(g.lengths[i]))
                                  for i in range(2)]
    figures[task]["models"][name] = row
    curves[(task, name)] = [(h["step"], h["loss"]) for h in history]
    print(f"{task:8s} {name:8s} {n_params:,} params, {train_seconds:.0f} s of training")

# ----------------------------------------------------------------------------
# Plots: accuracy against input length; learning curves; attention heatmaps.
for task in tasks:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  ax = axes[0]
  for name in args.models:
    tests = figures[task]["models"][name]["tests"]
    if task == "addition":  # against the longer operand's digits
      xs = [int(k.split()[0]) for k in tests]
      ys = [v["greedy_exact_match"] for v in tests.values()]
      ax.plot(xs, ys, "o-", label=f"{name} attention")
    else:
      for test_name, style in (("held-out dates", "-"), ("held-out formats", "--")):
        pts = sorted((int(n), a) for n, a in tests[test_name]["greedy_by_source_length"].items())
        ax.plot(*zip(*pts), style, label=f"{name}, {test_name}")
  if task == "addition":
    ax.axvspan(0.5, args.train_digits + 0.5, color="0.9", label="trained on")
    ax.set_xlabel("digits of the longer operand")
  else:
    ax.set_xlabel("source length (characters)")
  ax.set_ylabel("exact match (greedy)")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{task}: accuracy against input length")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  for name in args.models:
    steps, losses = zip(*curves[(task, name)])
    axes[1].plot(steps, losses, label=f"{name} attention")
  axes[1].set_yscale("log")
  axes[1].set_xlabel("update")
  axes[1].set_ylabel("training cross-entropy")
  axes[1].legend(fontsize=8)
  axes[1].grid(alpha=0.3, which="both")
  common.save_plot(fig, f"{out}/{task}_accuracy.png")

if heatmaps:
  fig, axes = plt.subplots(len(heatmaps), 2, figsize=(11, 3 * len(heatmaps)), squeeze=False)
  for ax_row, ((task, name), examples) in zip(axes, heatmaps.items()):
    for ax, (source, vocab, tokens, weights, n) in zip(ax_row, examples):
      ax.imshow(weights[:n, :len(source)], cmap="Greys", vmin=0, vmax=1, aspect="auto")
      ax.set_xticks(range(len(source)), list(source), fontsize=7)
      ax.set_yticks(range(n), [vocab.decode([t]) or "</s>" for t in tokens[:n]], fontsize=7)
      ax.set_title(f"{task}, {name} attention: {source!r} -> {vocab.decode(tokens[:n])!r}",
                   fontsize=8)
  common.save_plot(fig, f"{out}/attention.png")

common.write_json(f"{out}/seq2seq.json", figures, args)
