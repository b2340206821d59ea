"""Recurrences linear in the state: minGRU, minLSTM and the LRU, unrolled by a parallel scan.

Each of these cells computes, from the inputs alone, two coefficients per step
and unit, and then runs the element-wise linear recurrence

    s_t = a_t * s_{t-1} + b_t

Every matmul is outside the recurrence (``[T*B, D] x [D, G*H]`` products, with
no dependence between steps), and the recurrence itself can be evaluated in
two ways:

- ``"parallel"``: ``jax.lax.associative_scan`` over the pairs ``(a_t, b_t)``
  with the composition ``(a, b) . (a', b') = (a' a, a' b + b')``: ``O(log T)``
  depth and about ``2 T`` multiply-adds per unit (Blelloch 1990; Martin and
  Cundy 2018). Pairs are combined as affine maps, so no cumulative product of
  ``a`` is ever divided by: nothing overflows or underflows as it would in the
  closed form ``s_t = A_t (s_0 + sum_k b_k / A_k)``, and no log-space form is
  needed for stability.
- ``"sequential"``: a loop of ``T`` steps of one multiply-add. In ``unroll``
  it runs over chunks of time (``CHUNK_BYTES`` of coefficients each): a
  chunk's input projection and coefficients, then its steps, so that the
  coefficients never exist for all ``T`` steps at once; the backward pass
  recomputes them chunk by chunk in reverse. Only the states ``[B, T, N]``
  are kept for it.

Both have a hand-written backward pass (``jax.custom_vjp``): the BPTT adjoint of
a linear recurrence is a linear recurrence running backwards,

    lambda_t = g_t + a_{t+1} * lambda_{t+1}       (g_t = dL/ds_t from outside)
    dL/da_t = lambda_t * s_{t-1},  dL/db_t = lambda_t,  dL/ds_0 = a_1 * lambda_1

so it is evaluated by the same kind of scan, reversed. The gradients of the
cell's weights then follow by autodiff through the (hoisted) input projection:
a few large matmuls.

Masked steps keep the state: ``a_t = 1`` and ``b_t = 0`` there, by selection.

Shapes: ``T`` time, ``B`` batch, ``D`` inputs, ``H`` hidden units, ``N`` the
state size (``H`` for minGRU and minLSTM; the LRU's ``state_size``).

References:
  Feng, Tung, Ahmed, Bengio and Hajimirsadeghi 2024, "Were RNNs All We Needed?".
  Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu and De 2023, "Resurrecting
  Recurrent Neural Networks for Long Sequences".
  Martin and Cundy 2018, "Parallelizing Linear Recurrent Neural Nets Over
  Sequence Length".
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax._cells import Cell, _input_init, _row
from bptt_jax._common import check_positive_int

Array = jax.Array

METHODS = ("parallel", "sequential")


class LinearRecurrence(NamedTuple):
  """How a cell linear in its state maps onto ``s_t = a_t * s_{t-1} + b_t``.

  Attributes:
    coefficients: ``coefficients(params, xs [T, B, D]) -> (a, b)``, each
      ``[T, B, N]`` (or broadcastable ``a``, e.g. ``[1, 1, N]``).
    output: ``output(params, states [T, B, N], xs [T, B, D]) -> hs [T, B, H]``.
    to_state: ``to_state(carry) -> s [B, N]``.
    from_state: ``from_state(s [B, N]) -> carry``.
  """

  coefficients: Callable
  output: Callable
  to_state: Callable
  from_state: Callable


def default_method(num_steps: int) -> str:
  """The linear-recurrence scan used when ``unroll(method=None)``.

  ``"sequential"`` on CPU, where the associative scan's extra passes over
  memory cost more than its shorter depth saves (measured: the benchmark's
  ``--parallel-vs-T``); ``"parallel"`` on GPU and TPU, where the ``O(log T)``
  depth keeps the device busy.
  """
  del num_steps
  return "sequential" if jax.default_backend() == "cpu" else "parallel"


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS} for a linear recurrence, got {method!r}")


# ----------------------------------------------------------------------------
# The scan and its hand-written backward pass.


def _compose(first, second):
  """The affine map ``s -> a2 (a1 s + b1) + b2``, as a pair."""
  a1, b1 = first
  a2, b2 = second
  return a2 * a1, a2 * b1 + b2


def _solve(method: str, a: Array, b: Array, *, reverse: bool = False, unroll: int = 1,
           axis: int = 0) -> Array:
  """``s_t = a_t s_{t-1} + b_t`` from ``s = 0`` (``reverse``: from the end backwards).

  ``unroll`` is ``jax.lax.scan``'s, for the sequential method; ``axis`` is the time axis.
  """
  if method == "parallel":
    a = jnp.broadcast_to(a, b.shape)
    return jax.lax.associative_scan(_compose, (a, b), reverse=reverse, axis=axis)[1]
  zeros = jnp.zeros_like(jax.lax.index_in_dim(b, 0, axis, keepdims=False))
  return _sequential(a, b, zeros, reverse=reverse, unroll=unroll, axis=axis)


def _at(x: Array, t, axis: int) -> Array:
  """Step ``t`` of ``x`` along ``axis``; step 0 where ``x`` is broadcast in time (size 1).

  A dynamic ``t`` outside ``[0, T)`` is clamped, as ``jax.lax.dynamic_slice`` does.
  """
  if x.shape[axis] == 1:
    return jax.lax.index_in_dim(x, 0, axis, keepdims=False)
  return jax.lax.dynamic_index_in_dim(x, t, axis, keepdims=False)


def _sequential(a: Array, b: Array, s0: Array, *, reverse: bool = False, shift: bool = False,
                unroll: int = 1, axis: int = 0) -> Array:
  """``s_t = a_t s_{t-1} + b_t`` from ``s0``, ``unroll`` steps per loop iteration, in place.

  The loop carries only the state and writes each block of ``unroll`` states
  over the block of ``b`` it read (one slice in, one update out): no buffer of
  zeros for the outputs and no copy of ``b`` with ``s0`` folded in. With
  ``reverse`` it runs from the last step back to the first; with ``shift``
  step ``t`` uses ``a_{t+1}`` (the BPTT adjoint, ``lambda_t = g_t + a_{t+1}
  lambda_{t+1}``), read in place rather than from a shifted copy of ``a``: at
  ``t = T - 1`` the index is clamped and multiplies the zero state, as
  ``a_{T+1} = 0`` would. The ``T % unroll`` steps left over run after the loop.
  """
  T = b.shape[axis]
  size = min(unroll, T)
  n, rest = divmod(T, size)

  def block(t0, length, carry):  # steps t0 .. t0 + length - 1
    s, out = carry
    bs = jax.lax.dynamic_slice_in_dim(out, t0, length, axis)
    as_ = a if a.shape[axis] == 1 else jax.lax.dynamic_slice_in_dim(a, t0, length, axis)
    states = [None] * length
    for c in (range(length - 1, -1, -1) if reverse else range(length)):
      if shift:
        a_c = _at(as_, c + 1, axis) if c + 1 < length else _at(a, t0 + length, axis)
      else:
        a_c = _at(as_, c, axis)
      s = a_c * s + jax.lax.index_in_dim(bs, c, axis, keepdims=False)
      states[c] = s
    return s, jax.lax.dynamic_update_slice_in_dim(out, jnp.stack(states, axis), t0, axis)

  def body(i, carry):
    return block((n - 1 - i) * size + rest if reverse else i * size, size, carry)

  carry = jax.lax.fori_loop(0, n, body, (s0, b))
  if rest:  # the T % unroll steps left: the last ones, or the first ones in reverse
    carry = block(0 if reverse else n * size, rest, carry)
  return carry[1]


def _with_start(a, b, s0, axis=0):
  """``b`` with ``a_1 s_0`` folded into its first step, so the scan starts from zero."""
  a0 = jnp.broadcast_to(jax.lax.index_in_dim(a, 0, axis, keepdims=False), s0.shape)
  first = jnp.expand_dims(a0 * s0 + jax.lax.index_in_dim(b, 0, axis, keepdims=False), axis)
  return jnp.concatenate([first, jax.lax.slice_in_dim(b, 1, None, axis=axis)], axis=axis)


def linear_scan(config, a: Array, b: Array, s0: Array) -> Array:
  """All states of ``s_t = a_t * s_{t-1} + b_t``, ``t = 1..T``, from ``s_0``.

  Args:
    config: ``(method, unroll)``: ``"parallel"`` (``jax.lax.associative_scan``)
      or ``"sequential"`` (a loop with ``unroll`` steps per iteration); the
      backward pass is the same kind of scan, reversed.
    a: ``[T, B, N]`` (or broadcastable to it, e.g. ``[1, 1, N]``).
    b: ``[T, B, N]``.
    s0: ``[B, N]``.

  Returns:
    ``[T, B, N]``: ``s_1 .. s_T``.
  """
  method, unroll = config
  return _scan((method, unroll, 0), a, b, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(config, a: Array, b: Array, s0: Array) -> Array:
  """:func:`linear_scan` along time axis ``axis`` (``config = (method, unroll, axis)``):
  ``a`` and ``b`` ``[T, B, N]`` (axis 0) or ``[B, T, N]`` (axis 1), ``s0`` ``[B, N]``."""
  method, unroll, axis = config
  if method == "parallel":
    return _solve(method, a, _with_start(a, b, s0, axis), axis=axis)
  return _sequential(a, b, s0, unroll=unroll, axis=axis)


def _scan_fwd(config, a, b, s0):
  states = _scan(config, a, b, s0)
  return states, (a, s0, states)


def _scan_bwd(config, res, g):
  method, unroll, axis = config
  a, s0, states = res
  T = g.shape[axis]
  # lambda_t = g_t + a_{t+1} lambda_{t+1}: a reverse scan with the coefficients shifted by one.
  if method == "parallel":
    a_full = jnp.broadcast_to(a, g.shape)
    a_next = jnp.concatenate([jax.lax.slice_in_dim(a_full, 1, None, axis=axis),
                              jnp.zeros_like(jax.lax.slice_in_dim(a_full, 0, 1, axis=axis))],
                             axis=axis)
    lam = _solve(method, a_next, g, reverse=True, axis=axis)
  else:
    lam = _sequential(a, g, jnp.zeros_like(s0), reverse=True, shift=True, unroll=unroll,
                      axis=axis)
  s_prev = jnp.concatenate(
      [jnp.expand_dims(s0, axis), jax.lax.slice_in_dim(states, 0, T - 1, axis=axis)], axis=axis)
  da = lam * s_prev
  if a.shape != g.shape:  # a was broadcast: sum its gradient back to its shape
    axes = tuple(i for i, (n, m) in enumerate(zip(a.shape, g.shape)) if n == 1 and m != 1)
    da = jnp.sum(da, axis=axes, keepdims=True)
  a_1 = jnp.broadcast_to(_at(a, 0, axis), s0.shape)
  return da, lam, a_1 * jax.lax.index_in_dim(lam, 0, axis, keepdims=False)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------
# The sequential method over time chunks: coefficients, scan and backward per chunk.

# Bytes of one chunk's coefficient array (``[B, chunk, N]``): the chunk's work stays
# in the cache, and no ``[B, T, ...]`` array but the states is made.
CHUNK_BYTES = 1 << 20


def chunk_size(batch: int, width: int, itemsize: int) -> int:
  """Steps per chunk for :func:`_chunked`: ``CHUNK_BYTES`` of ``[batch, chunk, width]``."""
  return max(1, CHUNK_BYTES // max(1, batch * width * itemsize))


def _masked_coefficients(linear, params, xs, mask):
  a, b = linear.coefficients(params, xs)
  if mask is not None:
    a = jnp.where(mask, a, jnp.ones((), a.dtype))
    b = jnp.where(mask, b, jnp.zeros((), b.dtype))
  return a, b


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(config, params, xs: Array, s0: Array, mask) -> Array:
  """All states ``[B, T, N]`` of a linear-recurrence cell over batch-major ``xs``
  ``[B, T, D]`` from ``s0`` ``[B, N]``, a chunk of ``size`` steps at a time
  (``config = (linear, unroll, size)``): the chunk's coefficients, then its steps.

  The backward pass runs the chunks in reverse: it recomputes a chunk's
  coefficients, runs the adjoint ``lambda_t = g_t + a_{t+1} lambda_{t+1}`` over
  it, and takes the gradients of the weights and inputs through that chunk's
  coefficients. Only the states are kept between the passes.
  """
  return _chunked_fwd(config, params, xs, s0, mask)[0]


def _chunk(x, t0, length):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, t0, length, 1)


def _chunked_fwd(config, params, xs, s0, mask):
  linear, unroll, size = config
  B, T = xs.shape[:2]

  def block(t0, length, carry):
    s, states = carry
    a, b = _masked_coefficients(linear, params, _chunk(xs, t0, length), _chunk(mask, t0, length))
    block_states = _sequential(a, b, s, unroll=unroll, axis=1)
    return (block_states[:, -1],
            jax.lax.dynamic_update_slice_in_dim(states, block_states, t0, 1))

  states = jax.lax.empty((B, T) + s0.shape[1:], s0.dtype)  # every step is written
  size = min(size, T)
  n, rest = divmod(T, size)
  carry = jax.lax.fori_loop(0, n, lambda i, c: block(i * size, size, c), (s0, states))
  if rest:
    carry = block(n * size, rest, carry)
  return carry[1], (params, xs, s0, mask, carry[1])


def _chunked_bwd(config, res, g):
  linear, unroll, size = config
  params, xs, s0, mask, states = res
  T = xs.shape[1]

  def block(t0, length, carry):
    # mu = a_{t1} lambda_{t1} from the chunk after this one (t1 = t0 + length).
    mu, dparams, dxs = carry
    m = _chunk(mask, t0, length)
    (a, _), vjp = jax.vjp(lambda p, x: _masked_coefficients(linear, p, x, m), params,
                          _chunk(xs, t0, length))
    g_c = _chunk(g, t0, length)
    g_c = jax.lax.dynamic_update_index_in_dim(
        g_c, jax.lax.index_in_dim(g_c, length - 1, 1, keepdims=False) + mu, length - 1, 1)
    lam = _sequential(a, g_c, jnp.zeros_like(mu), reverse=True, shift=True, unroll=unroll,
                      axis=1)
    before = jax.lax.dynamic_index_in_dim(states, jnp.maximum(t0 - 1, 0), 1, keepdims=False)
    before = jnp.where(t0 > 0, before, s0)
    s_prev = jnp.concatenate(
        [before[:, None], jax.lax.dynamic_slice_in_dim(states, t0, length - 1, 1)], axis=1)
    da = lam * s_prev
    if a.shape != lam.shape:  # a was broadcast: sum its gradient back to its shape
      axes = tuple(i for i, (k, l) in enumerate(zip(a.shape, lam.shape)) if k == 1 and l != 1)
      da = jnp.sum(da, axis=axes, keepdims=True)
    dp, dx = vjp((da, lam))
    mu = jnp.broadcast_to(_at(a, 0, 1), mu.shape) * jax.lax.index_in_dim(lam, 0, 1, False)
    return (mu, jax.tree.map(jnp.add, dparams, dp),
            jax.lax.dynamic_update_slice_in_dim(dxs, dx, t0, 1))

  carry = (jnp.zeros_like(s0), jax.tree.map(jnp.zeros_like, params),
           jax.lax.empty(xs.shape, xs.dtype))  # every step is written
  size = min(size, T)
  n, rest = divmod(T, size)
  if rest:  # the last T % size steps first
    carry = block(n * size, rest, carry)
  carry = jax.lax.fori_loop(0, n, lambda i, c: block((n - 1 - i) * size, size, c), carry)
  mu, dparams, dxs = carry
  return dparams, dxs, mu, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def run(linear: LinearRecurrence, params, carry, inputs, mask, method: str, unroll: int = 1):
  """``(carry, hs)`` of a linear-recurrence cell over time-major ``inputs`` ``[T, B, D]``.

  ``mask`` is ``None`` or ``[T, B]`` booleans; masked steps keep the state and
  output zeros. Masked inputs are already zeros (``unroll`` selects them out).

  The scans work batch-major (``[B, T, ...]``, time on axis 1): the
  transposes here cancel against :func:`bptt_jax.unroll`'s, so that no
  ``[T, B, H]`` array is transposed for a batch-major caller.
  """
  T = inputs.shape[0]
  s0 = linear.to_state(carry)
  if T == 0:
    return carry, linear.output(params, jnp.zeros((0,) + s0.shape, s0.dtype), inputs)
  xs = jnp.swapaxes(inputs, 0, 1)
  m = None if mask is None else jnp.swapaxes(mask, 0, 1)[..., None]
  if method == "sequential":
    size = chunk_size(s0.shape[0], s0.shape[-1], s0.dtype.itemsize)
    states = _chunked((linear, unroll, size), params, xs, s0, m)
  else:
    a, b = _masked_coefficients(linear, params, xs, m)
    states = _scan((method, unroll, 1), a, b, s0)
  hs = linear.output(params, states, xs)
  if mask is not None:
    hs = jnp.where(m, hs, jnp.zeros((), hs.dtype))
  last = jax.lax.index_in_dim(states, -1, 1, keepdims=False)
  return linear.from_state(last), jnp.swapaxes(hs, 0, 1)


def _cell(name, hidden_size, init, initial_carry, linear, hidden, input_size) -> Cell:
  def step(params, carry, x_t):
    a, b = linear.coefficients(params, x_t[None])
    s = a[0] * linear.to_state(carry) + b[0]
    return linear.from_state(s), linear.output(params, s[None], x_t[None])[0]

  return Cell(init=init, initial_carry=initial_carry, step=step, hidden=hidden,
              input_size=input_size, hidden_size=hidden_size, name=name, linear=linear)


def _zeros(width):
  def initial_carry(batch_size, dtype=jnp.float32):
    return jnp.zeros((batch_size, width), dtype)
  return initial_carry


def _identity(x):
  return x


def _dense(key, input_size, width, input_init, dtype):
  check_positive_int("input_size", input_size)
  return {"W": _input_init(input_init)(key, (input_size, width), dtype),
          "b": jnp.zeros((width,), dtype)}


def _matmul(xs, w):
  """``xs [..., D] @ w [D, K]`` as one 2-D matmul ``[prod(...), D] x [D, K]``.

  For the weight gradient ``xs^T g`` of a batched (3-D) product, XLA on CPU
  first copies ``g`` ``[..., K]`` into a transposed ``[K, prod(...)]`` layout;
  of a 2-D product it does not.
  """
  return (xs.reshape(-1, xs.shape[-1]) @ w).reshape(xs.shape[:-1] + w.shape[1:])


def _affine_blocks(params, xs, n):
  """``xs W + b`` as ``n`` arrays ``[..., K/n]``, one matmul per column block of ``W``.

  Separate products keep each block's gradient its own array: the backward pass
  concatenates no ``[..., K]`` gradient and copies no block out of one.
  """
  W, bias = params["W"], params["b"]
  width = W.shape[1] // n
  blocks = (slice(i * width, (i + 1) * width) for i in range(n))
  return [_matmul(xs, W[:, c]) + _row(bias[c], xs) for c in blocks]


# ----------------------------------------------------------------------------
# Cells.


def min_gru(hidden_size: int, *, input_init="glorot_uniform", dtype=jnp.float32) -> Cell:
  r"""minGRU (Feng et al. 2024): a GRU whose gates read the input only.

  .. math::

    [k_t, \tilde h_t] = x_t W + b \qquad z_t = \sigma(k_t) \\
    h_t = (1 - z_t) h_{t-1} + z_t \tilde h_t

  Linear in ``h``: ``a_t = 1 - z_t = sigma(-k_t)``, ``b_t = z_t h~_t``
  (``z_t`` computed as ``1 - a_t``: one ``exp``; ``a_t``, which carries the state
  over time, keeps its full relative precision), so
  :func:`bptt_jax.unroll` evaluates it with a parallel or a sequential scan
  (``method=``) and a hand-written backward pass; ``fused=False`` runs the
  plain step under ``lax.scan`` with autodiff instead.

  Params: ``W`` ``[D, 2H]`` (blocks ``k``, ``h~``), ``b`` ``[2H]``. The carry
  is ``h`` ``[B, H]``.

  Args:
    hidden_size: ``H``.
    input_init: ``"glorot_uniform"``, ``"lecun_normal"`` or an initializer.
    dtype: parameter dtype.

  Returns:
    A :class:`bptt_jax.Cell`.

  References:
    Feng et al. 2024, "Were RNNs All We Needed?", section 3.1.
  """
  check_positive_int("hidden_size", hidden_size)
  _input_init(input_init)

  def coefficients(params, xs):
    k, h_tilde = _affine_blocks(params, xs, 2)
    a = jax.nn.sigmoid(-k)
    return a, (1 - a) * h_tilde

  linear = LinearRecurrence(coefficients, lambda params, s, xs: s, _identity, _identity)
  return _cell("min_gru", hidden_size,
               lambda key, d: _dense(key, d, 2 * hidden_size, input_init, dtype),
               _zeros(hidden_size), linear, _identity, lambda p: p["W"].shape[0])


def min_lstm(hidden_size: int, *, input_init="glorot_uniform", dtype=jnp.float32) -> Cell:
  r"""minLSTM (Feng et al. 2024) with the paper's normalized gates.

  .. math::

    [f_t, i_t, \tilde h_t] = x_t W + b \\
    f'_t = \frac{\sigma(f_t)}{\sigma(f_t) + \sigma(i_t)} \qquad
    i'_t = \frac{\sigma(i_t)}{\sigma(f_t) + \sigma(i_t)} \\
    h_t = f'_t h_{t-1} + i'_t \tilde h_t

  The normalized forget gate is computed in log space,
  ``f' = sigmoid(softplus(-i) - softplus(-f))``, which stays exact where
  ``sigma(f)`` and ``sigma(i)`` both underflow, and ``i' = 1 - f'``.

  Params: ``W`` ``[D, 3H]`` (blocks ``f``, ``i``, ``h~``), ``b`` ``[3H]``.
  The carry is ``h`` ``[B, H]``.

  Returns:
    A :class:`bptt_jax.Cell`.

  References:
    Feng et al. 2024, "Were RNNs All We Needed?", section 3.2.
  """
  check_positive_int("hidden_size", hidden_size)
  _input_init(input_init)

  def coefficients(params, xs):
    f, i, h_tilde = _affine_blocks(params, xs, 3)
    log_ratio = jax.nn.softplus(-i) - jax.nn.softplus(-f)  # log(sigma(f) / sigma(i))
    a = jax.nn.sigmoid(log_ratio)
    return a, (1 - a) * h_tilde

  linear = LinearRecurrence(coefficients, lambda params, s, xs: s, _identity, _identity)
  return _cell("min_lstm", hidden_size,
               lambda key, d: _dense(key, d, 3 * hidden_size, input_init, dtype),
               _zeros(hidden_size), linear, _identity, lambda p: p["W"].shape[0])


def lru(hidden_size: int, state_size: int | None = None, *, r_min: float = 0.0,
        r_max: float = 1.0, max_phase: float = 2 * math.pi, dtype=jnp.float32) -> Cell:
  r"""Linear Recurrent Unit (Orvieto et al. 2023): a diagonal complex recurrence.

  .. math::

    \lambda = \exp(-\exp(\nu) + i \exp(\theta)) \qquad \gamma = \exp(\gamma_{\log}) \\
    s_t = \lambda \odot s_{t-1} + \gamma \odot (x_t B) \qquad
    y_t = \mathrm{Re}(s_t C) + D \odot x_t

  with ``B = B_re + i B_im``, ``C = C_re + i C_im``. Initialization as in the
  paper: ``|lambda|`` uniform on the ring ``[r_min, r_max]`` (``nu_log``),
  phases uniform in ``[0, max_phase]`` (``theta_log``), ``gamma`` the
  normalization ``sqrt(1 - |lambda|^2)`` (trainable, stored as its log), ``B``
  and ``C`` Glorot-scaled normal, ``D`` standard normal.

  The LRU maps ``H`` features to ``H`` (the skip ``D`` is diagonal), so its
  input size is ``H``; put a dense encoder in front of it for other inputs.

  Params: ``nu_log``, ``theta_log``, ``gamma_log`` ``[N]``; ``B_re``, ``B_im``
  ``[H, N]``; ``C_re``, ``C_im`` ``[N, H]``; ``D`` ``[H]``. The carry is the
  complex state as real numbers, ``[B, 2N]`` (real parts, then imaginary
  parts), so masks, dtype casts and truncated BPTT treat it like any carry;
  ``unroll`` returns ``y`` ``[B, T, H]``.

  Args:
    hidden_size: ``H``, the input and output features.
    state_size: ``N``, the complex state size; ``H`` by default.
    r_min, r_max: the ring of initial ``|lambda|``, ``0 <= r_min < r_max <= 1``.
    max_phase: the largest initial phase of ``lambda``.
    dtype: parameter dtype (the state is complex of the matching width).

  Returns:
    A :class:`bptt_jax.Cell`.

  Raises:
    ValueError: a non-positive size or a ring outside ``[0, 1]``.

  References:
    Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
    Sequences", section 3 and appendix A.
  """
  check_positive_int("hidden_size", hidden_size)
  N = hidden_size if state_size is None else state_size
  check_positive_int("state_size", N)
  if not 0.0 <= r_min < r_max <= 1.0:
    raise ValueError(f"the ring needs 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
  if not max_phase > 0:
    raise ValueError(f"max_phase must be positive, got {max_phase}")
  H = hidden_size

  def init(key, input_size):
    check_positive_int("input_size", input_size)
    if input_size != H:
      raise ValueError(
          f"lru maps H = {H} features to H (its skip D is diagonal): input_size must be "
          f"{H}, got {input_size}; put a dense encoder in front")
    k_nu, k_th, k_bre, k_bim, k_cre, k_cim, k_d = jax.random.split(key, 7)
    u1 = jax.random.uniform(k_nu, (N,), dtype)
    u2 = jax.random.uniform(k_th, (N,), dtype)
    nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
    theta_log = jnp.log(max_phase * u2)
    gamma_log = 0.5 * jnp.log1p(-jnp.exp(-2.0 * jnp.exp(nu_log)))  # log sqrt(1 - |lambda|^2)
    normal = jax.random.normal
    return {
        "nu_log": nu_log, "theta_log": theta_log, "gamma_log": gamma_log,
        "B_re": normal(k_bre, (H, N), dtype) / math.sqrt(2 * H),
        "B_im": normal(k_bim, (H, N), dtype) / math.sqrt(2 * H),
        "C_re": normal(k_cre, (N, H), dtype) / math.sqrt(N),
        "C_im": normal(k_cim, (N, H), dtype) / math.sqrt(N),
        "D": normal(k_d, (H,), dtype),
    }

  def coefficients(params, xs):
    lam = jnp.exp(-jnp.exp(params["nu_log"]) + 1j * jnp.exp(params["theta_log"]))
    gamma = jnp.exp(params["gamma_log"])
    bx = (_matmul(xs, params["B_re"]) * _row(gamma, xs)
          + 1j * (_matmul(xs, params["B_im"]) * _row(gamma, xs)))
    return lam.reshape((1,) * (xs.ndim - 1) + lam.shape), bx

  def output(params, states, xs):
    y = _matmul(states.real, params["C_re"]) - _matmul(states.imag, params["C_im"])
    return y + xs * _row(params["D"], xs)

  def to_state(carry):
    return jax.lax.complex(carry[..., :N], carry[..., N:])

  def from_state(s):
    return jnp.concatenate([s.real, s.imag], axis=-1)

  linear = LinearRecurrence(coefficients, output, to_state, from_state)
  return _cell("lru", H, init, _zeros(2 * N), linear, _identity, lambda p: p["B_re"].shape[0])
