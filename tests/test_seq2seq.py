"""Encoder-decoder models, teacher forcing, greedy decoding and beam search.

References: a numpy forward pass of the whole model written from the docstrings
(the encoder with ``cell_reference``'s LSTM loop, the bridge, the decoder and
attention from ``test_attention``'s numpy functions); a hand-built scoring
model whose best output is found by enumerating every sequence; greedy
decoding for beam width 1; a trace counter for retracing.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import F32, F64, loop_unroll, lstm_step, random_params, zeros_hc
from test_attention import np_attend

import bptt_jax as bj

B, S, T, E, HE, VS, VT = 3, 5, 4, 4, 3, 7, 6
HD = 2 * HE  # the decoder's hidden size: M, so dot attention fits
PAD, BOS, EOS = 0, 1, 2
SRC_LENGTHS = np.array([5, 2, 0], np.int32)
TGT_LENGTHS = np.array([4, 1, 3], np.int32)


def make(attention, dtype=F32):
  s2s = bj.seq2seq(bj.lstm(HE, dtype=dtype), bj.lstm(HD, dtype=dtype), source_vocab=VS,
                   target_vocab=VT, embed_size=E, attention=attention, bidirectional=True,
                   dtype=dtype)
  return s2s, random_params(jax.eval_shape(s2s.init, jax.random.key(0)), 7)


def batch(seed=8):
  rng = np.random.default_rng(seed)
  src = rng.integers(3, VS, (B, S)).astype(np.int32)
  xs = rng.integers(3, VT, (B, T)).astype(np.int32)
  xs[:, 0] = BOS
  ys = rng.integers(2, VT, (B, T)).astype(np.int32)
  return {"source": src, "source_lengths": SRC_LENGTHS, "xs": xs, "ys": ys,
          "lengths": TGT_LENGTHS}


def np_start(p, source, lengths):
  """The encoder, the memory and the bridged decoder state, in numpy."""
  emb = np.take(p["source_embed"], source, axis=0, mode="clip")  # padding ids are never read
  _, fw = loop_unroll(lstm_step, p["encoder"][0], emb, zeros_hc(B, HE), HE, lengths=lengths)
  _, bw = loop_unroll(lstm_step, p["encoder"][1], emb, zeros_hc(B, HE), HE, lengths=lengths,
                      reverse=True)
  last = np.stack([fw[b, n - 1] if n else np.zeros(HE) for b, n in enumerate(lengths)])
  flat = np.tanh(np.concatenate([last, bw[:, 0]], -1) @ p["bridge"]["W"] + p["bridge"]["b"])
  return np.concatenate([fw, bw], -1), bj.LSTMState(flat[:, :HD], flat[:, HD:])


def np_step(p, carry, token, memory, mask, attention):
  """One decoder step: ``(carry, logits)``."""
  carry, h = lstm_step(np, p["decoder"] if attention is None else p["decoder"]["cell"],
                       carry, p["target_embed"][token])
  if attention is not None:
    pd = p["decoder"]
    ctx, _ = np_attend(attention, pd["attention"], h, memory, mask)
    h = np.tanh(np.concatenate([ctx, h], -1) @ pd["W_c"] + pd["b_c"][None])
  return carry, h @ p["readout"]["W_hy"] + p["readout"]["b_y"][None]


def np_loss(p, data, attention, feed=None):
  """Mean cross-entropy over the valid target steps; ``feed="argmax"`` feeds back
  the previous prediction after the first step (scheduled sampling at 1)."""
  memory, carry = np_start(p, data["source"], data["source_lengths"])
  mask = np.arange(S)[None] < data["source_lengths"][:, None]
  total, count = 0.0, 0
  for b in range(B):
    c = bj.LSTMState(carry.h[b:b + 1], carry.c[b:b + 1])
    prev = None
    for t in range(data["lengths"][b]):
      token = data["xs"][b, t] if feed is None or t == 0 else prev
      c, logits = np_step(p, c, np.array([token]), memory[b:b + 1], mask[b:b + 1], attention)
      logp = logits[0] - np.log(np.exp(logits[0]).sum())
      total -= logp[data["ys"][b, t]]
      count += 1
      prev = int(np.argmax(logits[0]))
  return total / count


ATTENTIONS = {"none": None, "additive": bj.additive_attention(3, dtype=F64),
              "dot": bj.dot_attention()}


@pytest.mark.float64
@pytest.mark.parametrize("name", ["none", "additive"])
def test_teacher_forcing_and_scheduled_sampling_equal_the_numpy_model(name):
  s2s, p = make(ATTENTIONS[name], F64)
  data = batch()
  data["source"][2] = 99  # an empty source: its (out-of-range) ids are never read
  loss_fn = jax.jit(bj.seq2seq_loss(s2s))
  attention = None if name == "none" else name
  np.testing.assert_allclose(loss_fn(p, data), np_loss(p, data, attention), rtol=1e-10)
  sampled = {**data, "key": jax.random.key(0)}
  np.testing.assert_allclose(loss_fn(p, {**sampled, "sampling": 0.0}),
                             np_loss(p, data, attention), rtol=1e-10)
  np.testing.assert_allclose(loss_fn(p, {**sampled, "sampling": 1.0}),
                             np_loss(p, data, attention, feed="argmax"), rtol=1e-10)


# ----------------------------------------------------------------------------
# Decoding.

# A scoring model written by hand: the next token's log-probability depends on the
# last token only (table row = input token). Tokens: 0 pad, 1 start, 2 end, 3 "a", 4 "b".
TRAP = np.log(np.array([
    [0.2, 0.2, 0.2, 0.2, 0.2],    # after pad (never read)
    [1e-9, 1e-9, 1e-9, 0.6, 0.4],  # after start: "a" looks best ...
    [0.2, 0.2, 0.2, 0.2, 0.2],    # after end (never read)
    [1e-9, 1e-9, 0.3, 0.36, 0.34],  # ... but after "a" nothing is likely
    [1e-9, 1e-9, 0.9, 0.05, 0.05],  # after "b" the end is: "b </s>" has p = 0.36
]))
PLAIN = np.log(np.array([  # a second row, where greedy is right: "a </s>"
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [1e-9, 1e-9, 0.1, 0.7, 0.2],
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [1e-9, 1e-9, 0.6, 0.2, 0.2],
    [1e-9, 1e-9, 0.5, 0.25, 0.25],
]))
TABLES = np.stack([TRAP, PLAIN])


def table_step(carry, tokens):
  """``carry``: each row's table id ``[N]``; the logits are that table's row."""
  return carry, jnp.asarray(TABLES, jnp.float32)[carry, tokens], None


def enumerate_best(table, max_length):
  """The most likely sequence (ending with the end token, or max_length long), by brute force."""
  best, best_logp = None, -math.inf
  for n in range(1, max_length + 1):
    for seq in itertools.product(range(table.shape[1]), repeat=n):
      if EOS in seq[:-1]:
        continue
      if n < max_length and seq[-1] != EOS:
        continue
      logp, prev = 0.0, BOS
      for tok in seq:
        logp += table[prev, tok]
        prev = tok
      if logp > best_logp:
        best, best_logp = seq, logp
  return list(best), best_logp


def test_beam_search_finds_the_best_sequence_where_greedy_does_not():
  L = 5
  carry = jnp.array([0, 1], jnp.int32)
  greedy = jax.jit(lambda c: bj.greedy_decode(table_step, c, bos=BOS, eos=EOS, max_length=L))(
      carry)
  beam = jax.jit(lambda c: bj.beam_search(table_step, c, bos=BOS, eos=EOS, max_length=L,
                                          beam_width=2))(carry)
  for row, table in enumerate(TABLES):
    want, want_logp = enumerate_best(table, L)
    got = list(np.asarray(beam.tokens[row, 0, :len(want)]))
    assert got == want, (row, got, want)
    np.testing.assert_array_equal(beam.tokens[row, 0, len(want):], PAD)
    assert int(beam.lengths[row, 0]) == len(want) and bool(beam.finished[row, 0])
    np.testing.assert_allclose(beam.scores[row, 0], want_logp, rtol=1e-5)
  # The trap: greedy takes "a" and never finds the end within L tokens.
  assert list(np.asarray(greedy.tokens[0])) == [3, 3, 3, 3, 3] and not bool(greedy.finished[0])
  assert enumerate_best(TRAP, L)[0] == [4, EOS]
  np.testing.assert_allclose(greedy.scores[0], np.log(0.6) + 4 * np.log(0.36), rtol=1e-5)
  # Where greedy is right, both agree.
  assert list(np.asarray(greedy.tokens[1, :2])) == [3, EOS] == enumerate_best(PLAIN, L)[0]
  assert beam.scores[0, 0] >= beam.scores[0, 1]  # best first


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_beam_search_of_width_one_is_greedy_decoding(alpha):
  s2s, p = make(bj.additive_attention(3))
  p["readout"]["b_y"][EOS] = 0.7  # outputs of lengths 6 (unfinished), 2 and 1
  data = batch(9)

  @jax.jit
  def both(p, source, lengths):
    step, carry = s2s.decoding(p, source, lengths)
    return (bj.greedy_decode(step, carry, bos=BOS, eos=EOS, max_length=6),
            bj.beam_search(step, carry, bos=BOS, eos=EOS, max_length=6, beam_width=1,
                           length_penalty=alpha))

  greedy, beam = both(p, data["source"], SRC_LENGTHS)
  np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
  np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
  np.testing.assert_array_equal(beam.finished[:, 0], greedy.finished)
  np.testing.assert_allclose(beam.weights[:, 0], greedy.weights, rtol=1e-6, atol=1e-7)
  lp = ((5.0 + np.asarray(greedy.lengths)) / 6.0) ** alpha
  np.testing.assert_allclose(beam.scores[:, 0], np.asarray(greedy.scores) / lp, rtol=1e-5)
  assert len(set(np.asarray(greedy.lengths).tolist())) > 1  # ends at different steps
  # The weights: zero on padded source positions and after the end, rows sum to 1.
  w = np.asarray(greedy.weights)
  assert (w[1, :, 2:] == 0).all() and (w[2] == 0).all()  # lengths 2 and 0
  for b in range(2):
    n = int(greedy.lengths[b])
    np.testing.assert_allclose(w[b, :n].sum(-1), 1.0, rtol=1e-5)
    assert (w[b, n:] == 0).all()


def test_decoding_traces_once_whatever_the_lengths():
  traces = []

  def counted_step(carry, tokens):  # runs only when traced
    traces.append(1)
    countdown, table = carry
    end = jnp.where(countdown <= 0, 10.0, -10.0)[:, None]  # the end once the count is out
    logits = jnp.where((jnp.arange(5) == EOS)[None], end, jnp.asarray(TRAP, jnp.float32)[tokens])
    return (countdown - 1, table), logits, None

  greedy = jax.jit(lambda c: bj.greedy_decode(counted_step, c, bos=BOS, eos=EOS, max_length=8))
  beam = jax.jit(lambda c: bj.beam_search(counted_step, c, bos=BOS, eos=EOS, max_length=8,
                                          beam_width=3, length_penalty=0.6))
  counts = []
  for countdown in ([0, 5, 2], [7, 7, 7], [1, 1, 3]):
    carry = (jnp.array(countdown, jnp.int32), jnp.zeros((3,), jnp.int32))
    g, bm = greedy(carry), beam(carry)
    np.testing.assert_array_equal(g.lengths, np.array(countdown) + 1)  # ends where told
    np.testing.assert_array_equal(bm.lengths[:, 0], np.array(countdown) + 1)
    counts.append(len(traces))
  # Traced when first compiled (a shape probe and the loop body, per function), never again.
  assert counts[0] > 0 and counts == [counts[0]] * 3

  s2s, p = make(bj.general_attention())
  calls = []  # traces of the whole translation

  @jax.jit
  def translate(p, source, lengths):
    calls.append(1)
    return bj.beam_search(*s2s.decoding(p, source, lengths), bos=BOS, eos=EOS, max_length=6,
                          beam_width=2)

  for lengths in ([5, 2, 0], [1, 1, 1], [3, 5, 4]):
    out = translate(p, batch()["source"], np.array(lengths, np.int32))
    assert out.tokens.shape == (B, 2, 6) and out.weights.shape == (B, 2, 6, S)
  assert calls == [1]


def test_seq2seq_errors_name_what_is_wrong():
  with pytest.raises(ValueError, match="dot_attention needs queries and memory of one size"):
    bj.seq2seq(bj.lstm(3), bj.lstm(4), source_vocab=5, target_vocab=5, embed_size=2,
               attention=bj.dot_attention())
  with pytest.raises(ValueError, match="input_feeding, attention_size and style need an attention"):
    bj.seq2seq(bj.lstm(3), bj.lstm(3), source_vocab=5, target_vocab=5, embed_size=2,
               input_feeding=True)
  with pytest.raises(ValueError, match="target_vocab must be a positive int"):
    bj.seq2seq(bj.lstm(3), bj.lstm(3), source_vocab=5, target_vocab=0, embed_size=2)
  s2s, p = make(None)
  data = batch()
  loss_fn = bj.seq2seq_loss(s2s)
  with pytest.raises(TypeError, match="source must be integer token ids"):
    loss_fn(p, {**data, "source": data["source"].astype(F32)})
  with pytest.raises(TypeError, match="a seq2seq batch needs 'source_lengths'"):
    loss_fn(p, {k: v for k, v in data.items() if k != "source_lengths"})
  with pytest.raises(ValueError, match="scheduled sampling needs a PRNG key"):
    loss_fn(p, {**data, "sampling": 0.5})
  with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \(3,\)"):
    s2s.start(p, data["source"], np.array([1, 2], np.int32))
  carry = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="beam_width must be a positive int"):
    bj.beam_search(table_step, carry, bos=1, eos=2, max_length=4, beam_width=0)
  with pytest.raises(ValueError, match="length_penalty must be >= 0"):
    bj.beam_search(table_step, carry, bos=1, eos=2, max_length=4, beam_width=2,
                   length_penalty=-1.0)
  with pytest.raises(ValueError, match="max_length must be a positive int"):
    bj.greedy_decode(table_step, carry, bos=1, eos=2, max_length=0)
  with pytest.raises(ValueError, match=r"step_fn's logits must be \[N, V\]"):
    bj.greedy_decode(lambda c, t: (c, jnp.zeros((3,)), None), carry, bos=1, eos=2,
                     max_length=4)
