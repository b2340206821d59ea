"""Encoder-decoder models over token ids: teacher forcing, greedy decoding, beam search.

A :class:`Seq2Seq` is a NamedTuple of pure functions returned by
:func:`seq2seq`: an encoder (any cell or stack, optionally bidirectional) reads
the source; a learned bridge maps its summary to the decoder's starting state;
the decoder (any cell, or an :func:`bptt_jax.attention_cell` reading every
encoder state) predicts the target one token at a time. ``s2s.model`` is a
:class:`bptt_jax.Model` over target ids, so the decoder trains through every
path of the model contract; :func:`seq2seq_loss` trains encoder and decoder
together (teacher forcing, scheduled sampling as an option).

:func:`greedy_decode` and :func:`beam_search` take any ``step_fn(carry, tokens
[N]) -> (carry, logits [N, V], weights [N, S] | None)`` and a carry (what
``s2s.decoding`` returns), and run one ``lax.while_loop`` up to a static
``max_length``, stopping early once every sequence has ended: under ``jit``
there is one trace whatever the sources' lengths and wherever the outputs end.

Shapes: ``B`` batch, ``S`` source steps, ``T`` target steps, ``V`` target
vocabulary, ``K`` beam width, ``L`` maximum decoded length, ``M`` memory
features (encoder states), ``E`` embedding size.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax._attention import Attention, attention_carry, attention_parts
from bptt_jax._cells import Cell, as_cell
from bptt_jax._common import check_lengths, check_positive_int, step_mask, where_rows
from bptt_jax._losses import last_step, readout, sequence_loss, softmax_cross_entropy
from bptt_jax._model import Model, batch_xs_ys, check_reduction, segmented_loss
from bptt_jax._unroll import bidirectional as run_bidirectional
from bptt_jax._unroll import unroll

Array = jax.Array


class Seq2Seq(NamedTuple):
  """An encoder-decoder: pure functions, no arrays.

  Attributes:
    init: ``init(key) -> params``, a dict: ``source_embed`` ``[V_src, E]``,
      ``target_embed`` ``[V, E]``, ``encoder`` (a pair ``(forward, backward)``
      when bidirectional), ``bridge`` ``{"W": [M, N], "b": [N]}`` (``N``: the
      sizes of the decoder cell's carry leaves, end to end), ``decoder``,
      ``readout`` ``{"W_hy": [A, V], "b_y": [V]}``.
    encode: ``encode(params, source [B, S], lengths [B]) -> memory [B, S, M]``,
      zero at padded positions.
    start: ``start(params, source, lengths) -> carry``: the decoder's starting
      carry (the encoder run, the bridge applied, and with attention the memory
      inside an :class:`bptt_jax.AttentionState`).
    model: a :class:`bptt_jax.Model` over target ids: ``apply(params, carry,
      ids [B, K], mask) -> (carry, logits [B, K, V])``, teacher forcing.
    decoding: ``decoding(params, source, lengths) -> (step_fn, carry)`` for
      :func:`greedy_decode` and :func:`beam_search`.
    step: ``step(params, carry, tokens [N]) -> (carry, logits [N, V], weights
      [N, S] | None)``, one decoder step on the carry ``decoding`` returns.
    encoder, decoder: the encoder's and the decoder's cells.
    attention: the :class:`bptt_jax.Attention`, or ``None``.
    name: a short name for messages.
  """

  init: Callable
  encode: Callable
  start: Callable
  model: Model
  decoding: Callable
  step: Callable
  encoder: Cell
  decoder: Cell
  attention: Attention | None
  name: str


def _check_ids(name, ids, ndim=2):
  if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must be integer token ids, got "
                    f"{getattr(ids, 'dtype', type(ids).__name__)}")
  if ids.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim} ([B, S] token ids), got shape "
                     f"{tuple(ids.shape)}")


def seq2seq(encoder, decoder, *, source_vocab: int, target_vocab: int, embed_size: int,
            attention: Attention | None = None, bidirectional: bool = False,
            input_feeding: bool = False, attention_size: int | None = None,
            style: str = "luong", dtype=jnp.float32) -> Seq2Seq:
  """An encoder-decoder over token ids (Sutskever et al. 2014; Cho et al. 2014),
  with attention over the encoder states if ``attention`` is given (Bahdanau et
  al. 2014; Luong et al. 2015).

  The encoder reads the embedded source (with ``bidirectional``, a second copy
  of ``encoder`` reads it from each sequence's end; the states are
  concatenated: ``M = 2 H_enc``). Its summary, the forward state at each
  sequence's last valid step (and the backward state at step 0), starts the
  decoder through a learned bridge, every leaf of the decoder cell's carry
  being ``tanh(summary W + b)`` (Bahdanau et al. start the decoder the same
  way). Without attention that summary is all the decoder knows about the
  source; with it, the decoder is an :func:`bptt_jax.attention_cell` that
  reads every encoder state at every step. The logits are a linear readout of
  the decoder's output.

  Args:
    encoder: a cell or a :func:`bptt_jax.stack` with ``hidden_size``.
    decoder: a cell or a stack with ``hidden_size``.
    source_vocab, target_vocab: vocabulary sizes.
    embed_size: ``E``, for source and target embeddings.
    attention: an :class:`bptt_jax.Attention` or ``None``.
    bidirectional: run a backward copy of the encoder too.
    input_feeding, attention_size, style: as :func:`bptt_jax.attention_cell`.
    dtype: parameter dtype of the embeddings, bridge and readout (the cells
      take their own).

  Returns:
    A :class:`Seq2Seq`.

  Raises:
    ValueError: non-positive sizes, a cell without ``hidden_size``, sizes that
      do not fit the attention (``dot_attention`` needs the decoder's hidden
      size to equal ``M``), attention settings without an attention.

  References:
    Sutskever, Vinyals and Le 2014; Cho et al. 2014; Bahdanau, Cho and Bengio
    2014; Luong, Pham and Manning 2015.
  """
  encoder, inner = as_cell(encoder), as_cell(decoder)
  for label, v in (("source_vocab", source_vocab), ("target_vocab", target_vocab),
                   ("embed_size", embed_size)):
    check_positive_int(label, v)
  for label, c in (("encoder", encoder), ("decoder", inner)):
    if c.hidden_size is None or c.init is None or c.initial_carry is None:
      raise ValueError(f"the {label} must be a cell with init, initial_carry and hidden_size, "
                       f"got {c.name!r}")
  M = encoder.hidden_size * (2 if bidirectional else 1)
  if attention is None:
    if input_feeding or attention_size is not None or style != "luong":
      raise ValueError("input_feeding, attention_size and style need an attention")
    dec_cell, keyed, keys_of = inner, None, None
    out_size = inner.hidden_size
  else:
    dec_cell, keyed, keys_of = attention_parts(
        inner, attention, memory_size=M, attention_size=attention_size,
        input_feeding=input_feeding, style=style, dtype=dtype)
    out_size = dec_cell.hidden_size
    # Sizes that do not fit the attention (dot_attention: Q != M) fail here, not later.
    jax.eval_shape(lambda: attention.init(jax.random.key(0), inner.hidden_size, M))
  leaf_shapes = [tuple(leaf.shape[1:]) for leaf in
                 jax.tree_util.tree_leaves(jax.eval_shape(lambda: inner.initial_carry(1, dtype)))]
  leaf_sizes = [math.prod(s) for s in leaf_shapes]

  def init(key):
    k = jax.random.split(key, 7)
    normal = jax.nn.initializers.normal(1.0)
    enc = encoder.init(k[2], embed_size)
    if bidirectional:
      enc = (enc, encoder.init(k[3], embed_size))
    return {
        "source_embed": normal(k[0], (source_vocab, embed_size), dtype),
        "target_embed": normal(k[1], (target_vocab, embed_size), dtype),
        "encoder": enc,
        "bridge": {"W": jax.nn.initializers.glorot_uniform()(k[4], (M, sum(leaf_sizes)), dtype),
                   "b": jnp.zeros((sum(leaf_sizes),), dtype)},
        "decoder": dec_cell.init(k[5], embed_size),
        "readout": {"W_hy": jax.nn.initializers.glorot_uniform()(
            k[6], (out_size, target_vocab), dtype), "b_y": jnp.zeros((target_vocab,), dtype)},
    }

  def encode_all(params, source, lengths):
    _check_ids("source", source)
    B, S = source.shape
    lengths = check_lengths(lengths, B, S)
    xs = params["source_embed"][source]
    if bidirectional:
      (fw, _), memory = run_bidirectional(encoder, encoder, params["encoder"], xs,
                                          lengths=lengths)
      H = encoder.hidden_size
      summary = jnp.concatenate([last_step(memory[..., :H], lengths), memory[:, 0, H:]], -1)
    else:
      _, memory = unroll(encoder, params["encoder"], xs, lengths=lengths)
      summary = last_step(memory, lengths)
    return memory, summary, lengths

  def encode(params, source, lengths):
    return encode_all(params, source, lengths)[0]

  def bridge(params, summary):
    flat = jnp.tanh(summary @ params["bridge"]["W"] + params["bridge"]["b"][None, :])
    template = jax.eval_shape(lambda: inner.initial_carry(summary.shape[0], flat.dtype))
    leaves, tree = jax.tree_util.tree_flatten(template)
    cuts = list(itertools.accumulate(leaf_sizes))[:-1]
    parts = jnp.split(flat, cuts, axis=-1)
    return jax.tree_util.tree_unflatten(
        tree, [p.reshape(leaf.shape).astype(leaf.dtype) for p, leaf in zip(parts, leaves)])

  def start(params, source, lengths):
    memory, summary, lengths = encode_all(params, source, lengths)
    carry = bridge(params, summary)
    if attention is None:
      return carry
    return attention_carry(params["decoder"], carry, memory, lengths=lengths)

  def apply(params, carry, ids, mask):
    carry, outs = unroll(dec_cell, params["decoder"], params["target_embed"][ids], mask=mask,
                         carry=carry)
    return carry, readout(params["readout"], outs)

  def step(params, state, tokens):
    carry, keys = state
    x = params["target_embed"][tokens]
    if attention is None:
      carry, out = dec_cell.step(params["decoder"], carry, x)
      weights = None
    else:
      carry, out = keyed(params["decoder"], carry, x, keys)
      weights = carry.weights
    return (carry, keys), readout(params["readout"], out), weights

  def decoding(params, source, lengths):
    carry = start(params, source, lengths)
    keys = None if attention is None else keys_of(params["decoder"], carry.memory)
    return (lambda state, tokens: step(params, state, tokens)), (carry, keys)

  name = (f"seq2seq({'bi' if bidirectional else ''}{encoder.name} -> {dec_cell.name})")
  return Seq2Seq(init=init, encode=encode, start=start,
                 model=Model(apply, initial_carry=None, name=name), decoding=decoding,
                 step=step, encoder=encoder, decoder=dec_cell, attention=attention, name=name)


def _ce(params, logits, ids):
  return softmax_cross_entropy(logits, ids)


def seq2seq_loss(s2s: Seq2Seq, *, reduction: str = "mean", remat=None) -> Callable:
  """``loss_fn(params, batch)`` for :func:`bptt_jax.train_step`: the encoder and the
  decoder trained together by teacher forcing (full BPTT through both).

  ``batch`` is a dict: ``"source"`` ``[B, S]`` ids and ``"source_lengths"``
  ``[B]``; ``"xs"`` ``[B, T]`` the decoder's input ids (the target shifted
  right behind a start token), ``"ys"`` ``[B, T]`` the ids to predict, and
  ``"lengths"`` ``[B]`` (or ``"mask"`` ``[B, T]``). Masked steps count for
  nothing, whatever ids they hold. The loss is the cross-entropy of ``ys``
  (``reduction`` as in :func:`bptt_jax.sequence_loss`), computed with
  :func:`bptt_jax.segmented_loss` on ``s2s.model`` from ``s2s.start`` (so
  ``remat="sqrt"`` keeps O(sqrt(T)) of the decoder's activations).

  Scheduled sampling (Bengio et al. 2015): with ``"sampling"`` (a probability,
  traced: a schedule changes it without a retrace) and ``"key"`` in the batch,
  each decoder input after the first is, with that probability, the model's
  own previous prediction (its argmax) instead of the reference token.

  Raises:
    TypeError, ValueError: a batch that is not such a dict, shapes that
      disagree, ``"sampling"`` without ``"key"``.

  References:
    Williams and Zipser 1989 (teacher forcing); Bengio, Vinyals, Jaitly and
    Shazeer 2015, "Scheduled Sampling for Sequence Prediction with Recurrent
    Neural Networks".
  """
  check_reduction(reduction)

  def loss_fn(params, batch):
    xs, ys = batch_xs_ys(batch)
    for key in ("source", "source_lengths"):
      if key not in batch:
        raise TypeError(f"a seq2seq batch needs {key!r}, got keys {sorted(batch)}")
    _check_ids("xs", xs)
    _check_ids("ys", ys)
    carry = s2s.start(params, batch["source"], batch["source_lengths"])
    if "sampling" not in batch:
      return segmented_loss(s2s.model, params, xs, ys, _ce, lengths=batch.get("lengths"),
                            mask=batch.get("mask"), carry=carry, remat=remat,
                            reduction=reduction)[0]
    if "key" not in batch:
      raise ValueError("scheduled sampling needs a PRNG key: batch['key']")
    return _sampled_loss(s2s, params, carry, batch, reduction)

  return loss_fn


def _sampled_loss(s2s, params, carry, batch, reduction):
  xs, ys = batch["xs"], batch["ys"]
  B, T = xs.shape
  if ys.shape != (B, T):
    raise ValueError(f"xs and ys must both be [B, T], got {xs.shape} and {ys.shape}")
  mask = step_mask(B, T, lengths=batch.get("lengths"), mask=batch.get("mask"))
  mask = jnp.ones((B, T), bool) if mask is None else mask
  coins = jax.random.bernoulli(batch["key"], batch["sampling"], (B, T)).at[:, 0].set(False)
  state = (carry, _keys_for(s2s, params, carry))

  def body(c, inp):
    state, prev = c
    gold, m_t, coin = inp
    tokens = jnp.where(coin, prev, jnp.where(m_t, gold, 0))
    new, logits, _ = s2s.step(params, state, tokens)
    state = (where_rows(m_t, new[0], state[0]), state[1])
    pred = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1)).astype(gold.dtype)
    return (state, pred), logits

  tm = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731
  _, logits = jax.lax.scan(body, (state, xs[:, 0]), (tm(xs), tm(mask), tm(coins)))
  losses = _ce(params, tm(logits), jnp.where(mask, ys, 0))
  return sequence_loss(losses, mask=mask, reduction=reduction)


def _keys_for(s2s, params, carry):
  if s2s.attention is None:
    return None
  return s2s.attention.keys(params["decoder"]["attention"], carry.memory)


# ----------------------------------------------------------------------------
# Decoding.


class Decoded(NamedTuple):
  """What :func:`greedy_decode` and :func:`beam_search` return.

  Greedy: ``tokens`` ``[B, L]``, the rest ``[B]`` (``weights`` ``[B, L, S]``).
  Beam search: one more axis ``K`` after ``B``, best hypothesis first.

  Attributes:
    tokens: the decoded ids, up to and including the end token, then ``pad``.
    lengths: the number of tokens, the end token included (``L`` if it never came).
    scores: greedy: the sum of the tokens' log-probabilities; beam search: that
      sum divided by the length penalty (what the hypotheses are ranked by).
    finished: whether the hypothesis ended with the end token.
    weights: the attention weights of every decoded step, zeros after the end;
      ``None`` when the step function returns none.
  """

  tokens: Array
  lengths: Array
  scores: Array
  finished: Array
  weights: Array | None


def _batch_size(carry) -> int:
  leaves = jax.tree_util.tree_leaves(carry)
  if not leaves:
    raise ValueError("the decoder carry holds no arrays")
  return leaves[0].shape[0]


def _check_decode(bos, eos, pad, max_length):
  check_positive_int("max_length", max_length)
  for label, v in (("bos", bos), ("eos", eos), ("pad", pad)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"{label} must be a non-negative int token id, got {v!r}")


def _probe(step_fn, carry, B):
  """Shapes of one step: ``(V, weights shape or None)``; checks the contract."""
  out = jax.eval_shape(step_fn, carry, jnp.zeros((B,), jnp.int32))
  if not isinstance(out, tuple) or len(out) != 3:
    raise ValueError("step_fn must return (carry, logits [N, V], weights [N, S] or None)")
  new, logits, weights = out
  if jax.tree_util.tree_structure(new) != jax.tree_util.tree_structure(carry):
    raise ValueError("step_fn must return a carry of the structure it takes")
  if logits.ndim != 2 or logits.shape[0] != B:
    raise ValueError(f"step_fn's logits must be [N, V] with N = {B}, got {logits.shape}")
  if weights is not None and (weights.ndim != 2 or weights.shape[0] != B):
    raise ValueError(f"step_fn's weights must be [N, S] with N = {B}, got {weights.shape}")
  return logits.shape[1], (None if weights is None else weights.shape[1:]), logits.dtype


def greedy_decode(step_fn: Callable, carry, *, bos: int, eos: int, max_length: int,
                  pad: int = 0) -> Decoded:
  """Greedy decoding: the most likely token at each step, fed back as the next input.

  One ``lax.while_loop`` over at most ``max_length`` steps, ending as soon as
  every sequence has produced ``eos``; a sequence that has ended keeps its
  carry and emits ``pad``. Call it under ``jax.jit``: the trace does not depend
  on where the sequences end.

  Args:
    step_fn: ``step_fn(carry, tokens [B]) -> (carry, logits [B, V], weights
      [B, S] or None)``, e.g. from ``s2s.decoding(params, source, lengths)``.
    carry: the starting carry (every leaf ``[B, ...]``).
    bos: the start token, the first input.
    eos: the end token.
    max_length: ``L``, the most tokens decoded (static: the output's size).
    pad: the id written after the end.

  Returns:
    A :class:`Decoded` with ``tokens`` ``[B, L]``.

  Raises:
    ValueError: non-positive ``max_length``, token ids that are not ints, a
      ``step_fn`` that breaks its contract.
  """
  _check_decode(bos, eos, pad, max_length)
  B, L = _batch_size(carry), max_length
  V, w_shape, dt = _probe(step_fn, carry, B)
  weights = None if w_shape is None else jnp.zeros((B, L) + w_shape, dt)
  init = (jnp.zeros((), jnp.int32), carry, jnp.full((B,), bos, jnp.int32),
          jnp.zeros((B,), bool), jnp.full((B, L), pad, jnp.int32), jnp.zeros((B,), jnp.float32),
          jnp.zeros((B,), jnp.int32), weights)

  def cond(state):
    t, done = state[0], state[3]
    return (t < L) & ~jnp.all(done)

  def body(state):
    t, carry, prev, done, tokens, scores, lengths, weights = state
    new, logits, w = step_fn(carry, prev)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    gain = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(done, pad, tok)
    scores = scores + jnp.where(done, 0.0, gain)
    tokens = tokens.at[:, t].set(tok)
    if weights is not None:
      weights = weights.at[:, t].set(jnp.where(done[:, None], 0, w).astype(weights.dtype))
    carry = where_rows(done, carry, new)
    lengths = jnp.where(done, lengths, t + 1)
    done = done | (tok == eos)
    return t + 1, carry, tok, done, tokens, scores, lengths, weights

  _, _, _, done, tokens, scores, lengths, weights = jax.lax.while_loop(cond, body, init)
  return Decoded(tokens, lengths, scores, done, weights)


def _penalty(length, alpha):
  """GNMT's length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016)."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(step_fn: Callable, carry, *, bos: int, eos: int, max_length: int,
                beam_width: int, length_penalty: float = 0.0, pad: int = 0) -> Decoded:
  """Beam search: the ``beam_width`` best hypotheses under length-normalized log-probability.

  ``K`` hypotheses per sequence. Each step extends every live hypothesis by
  every token; a finished one (it produced ``eos``) is its own only
  extension, appending ``pad`` at no cost. Of all extensions the ``K`` best
  are kept, ranked by ``log p / lp(n)`` with ``n`` the hypothesis' length
  (``eos`` included) and GNMT's length penalty ``lp(n) = ((5 + n) / 6) **
  length_penalty`` (Wu et al. 2016). The search ends when all ``K`` have
  finished or after ``max_length`` steps; hypotheses still alive then are
  returned with ``finished=False``. One ``lax.while_loop``: call it under
  ``jax.jit``. With ``beam_width=1`` it is greedy decoding, token for token.

  Args:
    step_fn: ``step_fn(carry, tokens [N]) -> (carry, logits [N, V], weights
      [N, S] or None)``; it is called with ``N = B K`` rows (hypothesis ``k``
      of sequence ``b`` in row ``b K + k``).
    carry: the starting carry, every leaf ``[B, ...]`` (repeated ``K`` times).
    bos, eos, max_length, pad: as :func:`greedy_decode`.
    beam_width: ``K``.
    length_penalty: ``alpha >= 0``; 0 ranks by the plain log-probability
      (which favours short outputs), about 0.6-1 normalizes by length.

  Returns:
    A :class:`Decoded` with ``tokens`` ``[B, K, L]``, best first; ``scores``
    are ``log p / lp(n)``.

  Raises:
    ValueError: as :func:`greedy_decode`; a non-positive ``beam_width``, a
      negative ``length_penalty``.

  References:
    Graves 2012, "Sequence Transduction with Recurrent Neural Networks";
    Sutskever, Vinyals and Le 2014 (beam search for seq2seq); Wu et al. 2016,
    "Google's Neural Machine Translation System" (length penalty).
  """
  _check_decode(bos, eos, pad, max_length)
  check_positive_int("beam_width", beam_width)
  if not length_penalty >= 0:
    raise ValueError(f"length_penalty must be >= 0, got {length_penalty!r}")
  B, K, L = _batch_size(carry), beam_width, max_length
  carry = jax.tree_util.tree_map(lambda a: jnp.repeat(a, K, axis=0), carry)
  V, w_shape, dt = _probe(step_fn, carry, B * K)
  with_w = w_shape is not None
  neg = jnp.float32(-1e9)  # an empty slot (before the first step, K > V**t)

  def gather(a, idx):  # a [B, N, ...], idx [B, M] -> [B, M, ...]
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

  def ranked(logp, length):
    return jnp.where(logp > neg / 2, logp / _penalty(length, length_penalty), neg)

  init = (jnp.zeros((), jnp.int32), carry, jnp.full((B, K, L), pad, jnp.int32),
          jnp.where(jnp.arange(K) == 0, 0.0, neg)[None].repeat(B, 0).astype(jnp.float32),
          jnp.zeros((B, K), bool), jnp.zeros((B, K), jnp.int32),
          jnp.zeros((B, K, L) + w_shape, dt) if with_w else None)

  def cond(s):
    t, done = s[0], s[4]
    return (t < L) & ~jnp.all(done)

  def body(s):
    t, carry, seq, logp, done, length, weights = s
    prev = jnp.where(t == 0, bos, jax.lax.dynamic_index_in_dim(
        seq, jnp.maximum(t - 1, 0), axis=2, keepdims=False))
    new, logits, w = step_fn(carry, prev.reshape(B * K))
    step_logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, K, V)
    live = logp[:, :, None] + step_logp
    kept = jnp.where(jnp.arange(V) == pad, logp[:, :, None], neg)  # a finished one: itself
    raw = jnp.where(done[:, :, None], kept, live).reshape(B, K * V)
    n = jnp.repeat(jnp.where(done, length, t + 1), V, axis=1)  # [B, K V]
    _, idx = jax.lax.top_k(ranked(raw, n), K)
    beam, tok = idx // V, (idx % V).astype(jnp.int32)
    was_done = gather(done, beam)
    logp = gather(raw, idx)
    at_t = jnp.arange(L) == t
    seq = jnp.where(at_t, jnp.where(was_done, pad, tok)[..., None], gather(seq, beam))
    length = jnp.where(was_done, gather(length, beam), t + 1)
    done = was_done | ((tok == eos) & (logp > neg / 2))
    parent = (jnp.arange(B)[:, None] * K + beam).reshape(B * K)
    carry = where_rows(was_done.reshape(B * K), jax.tree_util.tree_map(lambda a: a[parent], carry),
                       jax.tree_util.tree_map(lambda a: a[parent], new))
    if with_w:
      w = jnp.where(was_done[..., None], 0, gather(w.reshape((B, K) + w_shape), beam))
      w_at = at_t.reshape((L,) + (1,) * len(w_shape))
      weights = jnp.where(w_at, w[:, :, None].astype(dt), gather(weights, beam))
    return t + 1, carry, seq, logp, done, length, weights

  _, _, seq, logp, done, length, weights = jax.lax.while_loop(cond, body, init)
  scores, idx = jax.lax.top_k(ranked(logp, length), K)
  return Decoded(tokens=gather(seq, idx), lengths=gather(length, idx), scores=scores,
                 finished=gather(done, idx), weights=gather(weights, idx) if with_w else None)
