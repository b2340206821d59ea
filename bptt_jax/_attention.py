"""Attention over recurrent states, and the attentional decoder as a cell.

An :class:`Attention` is a NamedTuple of pure functions returned by a factory
(:func:`additive_attention`, :func:`dot_attention`, :func:`general_attention`);
:func:`attend` scores a query against a memory of encoder states ``[B, S, M]``,
masked by the source lengths, and returns the context and the weights.

:func:`attention_cell` wraps any cell and an attention into a decoder that is
itself a :class:`bptt_jax.Cell`. The encoder states a decoder reads are
per-sequence constants, and they travel **in the carry**
(:class:`AttentionState`'s ``memory`` and ``mask``): each step reads them and
returns them unchanged. So they follow their row through every mask
(``where_rows``), ``jit``, ``vmap`` and streaming; they are cast with the carry
under the dtype rule; and the gradient reaches the encoder through the initial
carry. Truncated BPTT cuts the carry's gradient at every chunk boundary, so
``tbptt_step`` trains the decoder and the attention, not the encoder; train both
together with ``train_step`` or ``segmented_loss``. The projection of the memory
(``W_k k`` of additive attention) depends on the params, so it is computed from
the carry's memory inside the computation, never stored: once per sequence on
the cell's whole-sequence path (``unroll``'s default on CPU), once per step on
the per-step path.

Shapes: ``B`` batch, ``S`` source steps, ``M`` memory features (encoder states),
``Q`` query features (the decoder's hidden size), ``A`` attention units.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax._cells import Cell, as_cell
from bptt_jax._common import (
    check_positive_int,
    select_steps,
    step_mask,
    where_rows,
)

Array = jax.Array
Params = Any


class Attention(NamedTuple):
  """A scoring rule: pure functions, no arrays.

  Attributes:
    init: ``init(key, query_size, memory_size) -> params``.
    keys: ``keys(params, memory [B, S, M]) -> keys``: the part of the score
      that depends on the memory only, computed once per sequence.
    score: ``score(params, query [B, Q], keys) -> [B, S]`` unnormalized scores.
    check: ``check(params, query_size, memory_size)``: raises ``ValueError``
      when the sizes do not fit the params.
    name: a short name for messages.
  """

  init: Callable[..., Params]
  keys: Callable[[Params, Array], Any]
  score: Callable[[Params, Array, Any], Array]
  check: Callable[[Params, int, int], None]
  name: str = "attention"


def _check_shape(name, params, key, want):
  got = tuple(params[key].shape)
  if got != want:
    raise ValueError(f"{name}: {key} has shape {got} but the query and memory need {want}")


def additive_attention(units: int, *, dtype=jnp.float32) -> Attention:
  r"""Additive attention (Bahdanau, Cho and Bengio 2014).

  .. math::

    e_s = v^\top \tanh(q W_q + k_s W_k)

  Params: ``W_q`` ``[Q, A]``, ``W_k`` ``[M, A]``, ``v`` ``[A]`` (Glorot
  uniform, ``v`` uniform in ``±1/sqrt(A)``). ``k_s W_k`` is computed once per
  sequence (``keys``), as the paper notes it can be.

  Args:
    units: ``A``.
    dtype: parameter dtype.

  References:
    Bahdanau, Cho and Bengio 2014, "Neural Machine Translation by Jointly
    Learning to Align and Translate".
  """
  check_positive_int("units", units)

  def init(key, query_size, memory_size):
    check_positive_int("query_size", query_size)
    check_positive_int("memory_size", memory_size)
    k_q, k_k, k_v = jax.random.split(key, 3)
    glorot = jax.nn.initializers.glorot_uniform()
    bound = 1.0 / units ** 0.5
    return {"W_q": glorot(k_q, (query_size, units), dtype),
            "W_k": glorot(k_k, (memory_size, units), dtype),
            "v": jax.random.uniform(k_v, (units,), dtype, -bound, bound)}

  def keys(params, memory):
    return memory @ params["W_k"]  # [B, S, A]

  def score(params, query, keys):
    q = (query @ params["W_q"])[:, None, :]  # [B, 1, A]
    return jnp.tanh(keys + q) @ params["v"]  # [B, S]

  def check(params, query_size, memory_size):
    _check_shape("additive_attention", params, "W_q", (query_size, units))
    _check_shape("additive_attention", params, "W_k", (memory_size, units))

  return Attention(init, keys, score, check, f"additive_attention({units})")


def dot_attention(*, scale: bool = False) -> Attention:
  r"""Dot-product attention (Luong, Pham and Manning 2015, "dot").

  .. math::

    e_s = q^\top k_s \quad (\text{divided by } \sqrt{M} \text{ with } scale=True)

  No params (an empty dict); the query and the memory must have the same size
  (``Q == M``).

  References:
    Luong, Pham and Manning 2015, "Effective Approaches to Attention-based
    Neural Machine Translation".
  """

  def init(key, query_size, memory_size):
    del key
    if query_size != memory_size:
      raise ValueError(
          f"dot_attention needs queries and memory of one size, got Q = {query_size} and "
          f"M = {memory_size} (general_attention maps one to the other)")
    return {}

  def keys(params, memory):
    return memory

  def score(params, query, keys):
    e = jnp.einsum("bsm,bm->bs", keys, query)
    return e / jnp.sqrt(jnp.asarray(keys.shape[-1], e.dtype)) if scale else e

  def check(params, query_size, memory_size):
    init(None, query_size, memory_size)

  return Attention(init, keys, score, check, "dot_attention" + ("(scaled)" if scale else ""))


def general_attention(*, dtype=jnp.float32) -> Attention:
  r"""Bilinear attention (Luong, Pham and Manning 2015, "general").

  .. math::

    e_s = q^\top W_a k_s

  Params: ``W_a`` ``[Q, M]`` (Glorot uniform). The query is mapped into the
  memory's space (``q W_a``, one ``[B, Q] x [Q, M]`` matmul per step), so the
  memory itself needs no projection.

  References:
    Luong, Pham and Manning 2015, "Effective Approaches to Attention-based
    Neural Machine Translation".
  """

  def init(key, query_size, memory_size):
    check_positive_int("query_size", query_size)
    check_positive_int("memory_size", memory_size)
    return {"W_a": jax.nn.initializers.glorot_uniform()(key, (query_size, memory_size), dtype)}

  def keys(params, memory):
    return memory

  def score(params, query, keys):
    return jnp.einsum("bsm,bm->bs", keys, query @ params["W_a"])

  def check(params, query_size, memory_size):
    _check_shape("general_attention", params, "W_a", (query_size, memory_size))

  return Attention(init, keys, score, check, "general_attention")


def masked_softmax(scores: Array, mask: Array) -> Array:
  """Softmax over the last axis of ``scores`` ``[B, S]`` restricted to ``mask``.

  Positions outside the mask get exactly zero weight and zero gradient, by
  selection (whatever their score, NaN included); a row with no valid position
  gets all zeros.
  """
  neg = jnp.finfo(scores.dtype).min
  s = jnp.where(mask, scores, neg)
  top = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  z = jnp.where(mask, s - top, jnp.zeros((), s.dtype))  # finite everywhere
  e = jnp.where(mask, jnp.exp(z), jnp.zeros((), s.dtype))
  total = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(total > 0, total, jnp.ones((), s.dtype))


def _as_attention(attention) -> Attention:
  if not isinstance(attention, Attention):
    raise TypeError(
        "expected a bptt_jax.Attention (additive_attention, dot_attention, general_attention), "
        f"got {type(attention).__name__}")
  return attention


def source_mask(memory, *, lengths=None, mask=None) -> Array:
  """The ``[B, S]`` mask of valid source positions (all true if neither is given).

  Raises:
    ValueError, TypeError: as the lengths and mask checks of :func:`bptt_jax.unroll`.
  """
  if not hasattr(memory, "ndim") or memory.ndim != 3:
    raise ValueError(
        f"memory must be encoder states [B, S, M], got "
        f"{getattr(memory, 'shape', type(memory).__name__)}")
  B, S = memory.shape[:2]
  valid = step_mask(B, S, lengths=lengths, mask=mask)
  return jnp.ones((B, S), bool) if valid is None else valid


def _context(weights, memory):
  return jnp.einsum("bs,bsm->bm", weights, memory)


def attend(attention: Attention, params, query, memory, *, lengths=None, mask=None):
  r"""Attention of ``query`` over ``memory``: ``(context [B, M], weights [B, S])``.

  .. math::

    e_s = \mathrm{score}(q, k_s) \qquad
    \alpha_s = \frac{\exp e_s}{\sum_{s' < L} \exp e_{s'}} \ (s < L), \quad 0 \ (s \ge L)
    \qquad c = \sum_s \alpha_s k_s

  Padded source positions (``s >= lengths[b]``, or ``mask`` false) are
  selected out of the memory before any arithmetic and get exactly zero
  weight: padding that holds NaN or Inf reaches neither the context nor a
  gradient. A sequence of length 0 gets zero weights and a zero context.

  Args:
    attention: an :class:`Attention`.
    params: its params.
    query: ``[B, Q]``.
    memory: encoder states ``[B, S, M]``.
    lengths: optional source lengths ``[B]`` in ``[0, S]``.
    mask: optional ``[B, S]`` booleans (instead of ``lengths``).

  Returns:
    ``(context [B, M], weights [B, S])``.

  Raises:
    ValueError: shapes that do not fit each other or the params.
  """
  attention = _as_attention(attention)
  m = source_mask(memory, lengths=lengths, mask=mask)
  if not hasattr(query, "ndim") or query.ndim != 2 or query.shape[0] != memory.shape[0]:
    raise ValueError(
        f"query must be [B, Q] with B = {memory.shape[0]}, got "
        f"{getattr(query, 'shape', type(query).__name__)}")
  attention.check(params, query.shape[-1], memory.shape[-1])
  memory = select_steps(m, memory)
  weights = masked_softmax(attention.score(params, query, attention.keys(params, memory)), m)
  return _context(weights, memory), weights


# ----------------------------------------------------------------------------
# The attentional decoder cell.


class AttentionState(NamedTuple):
  """The carry of an :func:`attention_cell`.

  Attributes:
    cell: the wrapped cell's carry.
    attention: the last output ``a_{t-1}``, ``[B, A]`` (what input feeding feeds
      back; zeros at the start).
    weights: the last step's attention weights ``[B, S]`` (zeros at the start).
    memory: the encoder states ``[B, S, M]``, zeros at padded positions; the
      same at every step.
    mask: ``[B, S]`` booleans, the valid source positions; the same at every step.
  """

  cell: Any
  attention: Array
  weights: Array
  memory: Array
  mask: Array


_STYLES = ("luong", "bahdanau")


def attention_cell(cell, attention: Attention, *, memory_size: int,
                   attention_size: int | None = None, input_feeding: bool = False,
                   style: str = "luong", dtype=jnp.float32) -> Cell:
  r"""An attentional decoder: ``cell`` reading encoder states through ``attention``.

  ``style="luong"`` (Luong et al. 2015; TensorFlow's ``AttentionWrapper``)
  queries with the state the cell has just computed::

      x'_t       = [x_t, a_{t-1}] if input_feeding else x_t
      carry, h_t = cell.step(carry, x'_t)
      c_t, α_t   = attend(h_t, memory)
      a_t        = tanh([c_t, h_t] W_c + b_c)          # the output, [B, A]

  ``style="bahdanau"`` (Bahdanau et al. 2014) queries with the previous state
  and feeds the context into the cell::

      c_t, α_t   = attend(hidden(carry), memory)
      carry, h_t = cell.step(carry, [x_t, c_t])
      a_t        = tanh([c_t, h_t] W_c + b_c)

  (one ``tanh`` layer where the paper has a maxout output layer). Either
  attention works in either style.

  Params: ``{"cell": the cell's params (its input [D + A] with input feeding,
  [D + M] in Bahdanau's style, else [D]), "attention": the attention's,
  "W_c": [M + H, A], "b_c": [A]}``. The carry is an :class:`AttentionState`
  holding the encoder states; build it with :func:`attention_carry` (the cell
  has no ``initial_carry``: it cannot know the memory). ``hidden(carry)`` is
  ``a_t``, the output, so :func:`bptt_jax.gradient_flow` reports
  ``||dL/da_t||``.

  The step computes the memory's keys from the carry every step;
  ``cell.sequence`` (the whole-sequence path :func:`bptt_jax.unroll` takes by
  default on CPU, and with ``fused=True``) computes them once per sequence.

  Args:
    cell: any cell with a ``hidden_size`` (a :func:`bptt_jax.stack` too).
    attention: an :class:`Attention`.
    memory_size: ``M``, the size of an encoder state.
    attention_size: ``A``, the output size; the cell's ``H`` by default.
    input_feeding: feed ``a_{t-1}`` back as input (Luong et al. 2015, 3.3).
    style: ``"luong"`` or ``"bahdanau"``.
    dtype: dtype of ``W_c`` and ``b_c``.

  Returns:
    A :class:`bptt_jax.Cell`.

  Raises:
    ValueError: unknown style, input feeding with Bahdanau's style (the context
      is already an input), a cell without ``hidden_size``, non-positive sizes.
    TypeError: ``attention`` is not an :class:`Attention`.

  References:
    Bahdanau, Cho and Bengio 2014; Luong, Pham and Manning 2015.
  """
  return attention_parts(cell, attention, memory_size=memory_size,
                         attention_size=attention_size, input_feeding=input_feeding,
                         style=style, dtype=dtype)[0]


def attention_parts(cell, attention, *, memory_size, attention_size=None,
                    input_feeding=False, style="luong", dtype=jnp.float32):
  """``(decoder cell, keyed_step, keys)``: the cell of :func:`attention_cell`, its
  step on precomputed keys ``keyed_step(params, carry, x_t, keys)`` and
  ``keys(params, memory)`` (for decoding loops that compute the keys once)."""
  cell = as_cell(cell)
  attention = _as_attention(attention)
  if style not in _STYLES:
    raise ValueError(f"style must be one of {_STYLES}, got {style!r}")
  if style == "bahdanau" and input_feeding:
    raise ValueError("input_feeding is for style='luong': Bahdanau's style already feeds "
                     "the context to the cell")
  if cell.hidden_size is None or cell.init is None:
    raise ValueError(f"attention_cell needs a cell with init and hidden_size, got {cell.name!r}")
  check_positive_int("memory_size", memory_size)
  H, M = cell.hidden_size, memory_size
  A = H if attention_size is None else attention_size
  check_positive_int("attention_size", A)

  def init(key, input_size):
    check_positive_int("input_size", input_size)
    k_cell, k_att, k_c = jax.random.split(key, 3)
    extra = A if input_feeding else (M if style == "bahdanau" else 0)
    return {"cell": cell.init(k_cell, input_size + extra),
            "attention": attention.init(k_att, H, M),
            "W_c": jax.nn.initializers.glorot_uniform()(k_c, (M + H, A), dtype),
            "b_c": jnp.zeros((A,), dtype)}

  def check(params, carry):
    if not isinstance(carry, AttentionState):
      raise ValueError(
          f"{name}: the carry must be an AttentionState holding the encoder states "
          f"(bj.attention_carry(params, carry, memory, lengths=...)), got "
          f"{type(carry).__name__}")
    if carry.memory.shape[-1] != M:
      raise ValueError(f"{name}: memory has M = {carry.memory.shape[-1]} features but the "
                       f"cell was built for memory_size = {M}")
    attention.check(params["attention"], H, M)

  def output(params, context, h):
    return jnp.tanh(jnp.concatenate([context, h], axis=-1) @ params["W_c"]
                    + params["b_c"][None, :])

  def keyed_step(params, carry, x_t, keys):
    if style == "luong":
      x_in = jnp.concatenate([x_t, carry.attention], axis=-1) if input_feeding else x_t
      inner, h = cell.step(params["cell"], carry.cell, x_in)
      weights = masked_softmax(attention.score(params["attention"], h, keys), carry.mask)
      context = _context(weights, carry.memory)
    else:
      query = cell.hidden(carry.cell)
      weights = masked_softmax(attention.score(params["attention"], query, keys), carry.mask)
      context = _context(weights, carry.memory)
      inner, h = cell.step(params["cell"], carry.cell,
                           jnp.concatenate([x_t, context.astype(x_t.dtype)], axis=-1))
    a = output(params, context, h)
    return AttentionState(inner, a, weights, carry.memory, carry.mask), a

  def step(params, carry, x_t):
    check(params, carry)
    return keyed_step(params, carry, x_t, attention.keys(params["attention"], carry.memory))

  def sequence(params, xs, carry, mask, unroll=1):
    check(params, carry)
    keys = attention.keys(params["attention"], carry.memory)

    def body(c, inp):
      if mask is None:
        return keyed_step(params, c, inp, keys)
      x_t, m_t = inp
      new, a = keyed_step(params, c, x_t, keys)
      m_t = m_t[:, 0]
      return where_rows(m_t, new, c), where_rows(m_t, a, jnp.zeros_like(a))

    return jax.lax.scan(body, carry, xs if mask is None else (xs, mask), unroll=unroll)

  name = f"attention_cell({cell.name}, {attention.name}, {style})"
  decoder = Cell(
      init=init, initial_carry=None, step=step, hidden=lambda carry: carry.attention,
      input_size=lambda params: _input_size(cell, params, A, M, input_feeding, style),
      hidden_size=A, name=name, sequence=sequence)
  keys = lambda params, memory: attention.keys(params["attention"], memory)  # noqa: E731
  return decoder, keyed_step, keys


def _input_size(cell, params, A, M, input_feeding, style):
  if cell.input_size is None:
    return None
  inner = cell.input_size(params["cell"])
  if inner is None:
    return None
  return inner - (A if input_feeding else (M if style == "bahdanau" else 0))


def attention_carry(params, carry, memory, *, lengths=None, mask=None) -> AttentionState:
  """The starting carry of an :func:`attention_cell`: its cell's carry plus the memory.

  The memory's padded positions are replaced by zeros (by selection: NaN
  padding is gone), ``attention`` and ``weights`` start at zero.

  Args:
    params: the attention cell's params (``A`` is read from ``b_c``).
    carry: the wrapped cell's starting carry (e.g. ``cell.initial_carry(B)``,
      or one computed from the encoder's final state).
    memory: encoder states ``[B, S, M]``.
    lengths: optional source lengths ``[B]``.
    mask: optional ``[B, S]`` booleans (instead of ``lengths``).

  Returns:
    An :class:`AttentionState`, in ``memory``'s float dtype.

  Raises:
    ValueError: a memory that is not ``[B, S, M]`` or a carry of another batch size.
  """
  m = source_mask(memory, lengths=lengths, mask=mask)
  B, S, _ = memory.shape
  for leaf in jax.tree_util.tree_leaves(carry):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != B:
      raise ValueError(
          f"the cell's carry has batch size {(jnp.shape(leaf) or ('none',))[0]} but memory "
          f"has B = {B}")
  if "b_c" not in params:
    raise ValueError("params must be an attention_cell's params (with 'b_c' [A])")
  dt = memory.dtype
  A = params["b_c"].shape[0]
  return AttentionState(carry, jnp.zeros((B, A), dt), jnp.zeros((B, S), dt),
                        select_steps(m, memory), m)
