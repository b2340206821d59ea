"""Recurrent cells as pure functions.

A cell is a :class:`Cell`: a NamedTuple of pure functions returned by a factory
(:func:`rnn`, :func:`lstm`, :func:`gru`, :func:`irnn`). It holds no arrays; its
parameters are a plain dict of arrays made by ``cell.init(key, input_size)``.

Every built-in cell splits its step into an input projection, which does not
depend on the carry and so can run for all ``T`` steps in one matmul, and a
recurrent part::

    step(params, carry, x_t) == recur(params, carry, project(params, x_t))

Shapes: ``B`` batch, ``D`` input features, ``H`` hidden units, ``G`` gates
(1 for the RNN, 4 for the LSTM, 3 for the GRU).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import _fused, _kernel
from bptt_jax._common import LSTMState, check_positive_int

Array = jax.Array
Params = Any
Carry = Any

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}
_LN_EPS = 1e-5


class Cell(NamedTuple):
  """A recurrent cell: a bundle of pure functions, no arrays.

  Attributes:
    init: ``init(key, input_size) -> params``.
    initial_carry: ``initial_carry(batch_size, dtype=jnp.float32) -> carry``
      (zeros).
    step: ``step(params, carry, x_t) -> (carry, h_t)`` with ``x_t`` ``[B, D]``
      and ``h_t`` ``[B, H]``: ``lax.scan``'s argument order.
    project: optional ``project(params, xs) -> ps`` mapping inputs ``[..., D]``
      to projected inputs ``[..., P]``; ``None`` if the cell has no separable
      input projection.
    recur: optional ``recur(params, carry, p_t) -> (carry, h_t)``, the step on a
      projected input. Present exactly when ``project`` is.
    hidden: ``hidden(carry) -> h`` reads the hidden state ``[B, H]`` out of a
      carry (also applied to carry-shaped gradients by the diagnostics).
    input_size: optional ``input_size(params) -> D``, used to check inputs.
    hidden_size: ``H``, or ``None`` if unknown.
    name: a short name for messages.
    sequence: optional ``sequence(params, xs, carry, mask, unroll=1) -> (carry,
      hs)`` over a whole time-major sequence (``xs`` ``[T, B, D]`` with masked
      steps already zero, ``mask`` ``None`` or ``[T, B, 1]`` booleans), with a
      hand-written backward pass; used by :func:`bptt_jax.unroll` when ``fused``.
    layers: for a :func:`stack`, the stacked cells (bottom first); ``unroll``
      then runs them one after another over the whole sequence, each on its
      own fastest path. ``None`` for a single cell.
    linear: for a cell linear in its state (:func:`bptt_jax.min_gru`,
      :func:`bptt_jax.min_lstm`, :func:`bptt_jax.lru`), how it maps onto
      ``s_t = a_t * s_{t-1} + b_t`` (a ``LinearRecurrence``); ``unroll`` then
      evaluates it with a parallel or a sequential scan. ``None`` otherwise.
    wraps: for a cell that wraps another with per-step maps
      (:func:`residual_block`), ``(inner, before, after)``: the inner cell
      (its params under ``params["cell"]``), ``before(params, xs) -> us`` and
      ``after(params, xs, hs) -> ys``, each applied to all steps at once
      (``[..., D]``), so that ``unroll`` runs the inner cell on its own fastest
      path. ``None`` otherwise.
  """

  init: Callable[..., Params] | None
  initial_carry: Callable[..., Carry] | None
  step: Callable[[Params, Carry, Array], tuple[Carry, Array]]
  project: Callable[[Params, Array], Array] | None = None
  recur: Callable[[Params, Carry, Array], tuple[Carry, Array]] | None = None
  hidden: Callable[[Carry], Array] = lambda carry: carry
  input_size: Callable[[Params], int] | None = None
  hidden_size: int | None = None
  name: str = "cell"
  sequence: Callable | None = None
  layers: tuple | None = None
  linear: Any = None
  wraps: Any = None


def as_cell(cell_or_step) -> Cell:
  """Returns ``cell_or_step`` as a :class:`Cell`.

  A user function ``step(params, carry, x_t) -> (carry, h_t)`` becomes a cell
  with that step, no initializer (give ``carry=`` to :func:`bptt_jax.unroll`)
  and the carry itself as its hidden state.

  Raises:
    TypeError: if the argument is neither a ``Cell`` nor callable.
  """
  if isinstance(cell_or_step, Cell):
    return cell_or_step
  if callable(cell_or_step):
    name = getattr(cell_or_step, "__name__", "step")
    return Cell(init=None, initial_carry=None, step=cell_or_step, name=name)
  raise TypeError(
      "expected a bptt_jax.Cell or a step function "
      f"step(params, carry, x_t) -> (carry, h_t), got {type(cell_or_step).__name__}"
  )


# ----------------------------------------------------------------------------
# Initializers.

_INPUT_INITS = {
    "glorot_uniform": jax.nn.initializers.glorot_uniform(),
    "lecun_normal": jax.nn.initializers.lecun_normal(),
}


def _input_init(name):
  if callable(name):
    return name
  if name not in _INPUT_INITS:
    raise ValueError(
        f"input_init must be one of {sorted(_INPUT_INITS)} or a callable, got {name!r}"
    )
  return _INPUT_INITS[name]


def _recurrent_init(name, gates, hidden_size):
  """Initializer for ``U`` ``[H, G*H]``: one ``[H, H]`` block per gate."""
  if callable(name):
    return name
  if name == "orthogonal":
    block = jax.nn.initializers.orthogonal()
  elif name == "identity":
    block = lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype)  # noqa: E731
  else:
    raise ValueError(
        f"recurrent_init must be 'orthogonal', 'identity' or a callable, got {name!r}"
    )

  def init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, gates)
    return jnp.concatenate(
        [block(k, (hidden_size, hidden_size), dtype) for k in keys], axis=1
    )

  return init


def _dense_init(key, input_size, hidden_size, gates, input_init, recurrent_init,
                dtype, layer_norm):
  check_positive_int("input_size", input_size)
  k_w, k_u = jax.random.split(key)
  gh = gates * hidden_size
  params = {
      "W": _input_init(input_init)(k_w, (input_size, gh), dtype),
      "U": _recurrent_init(recurrent_init, gates, hidden_size)(
          k_u, (hidden_size, gh), dtype
      ),
      "b": jnp.zeros((gh,), dtype),
  }
  if layer_norm:
    params.update(
        g_x=jnp.ones((gh,), dtype), beta_x=jnp.zeros((gh,), dtype),
        g_h=jnp.ones((gh,), dtype), beta_h=jnp.zeros((gh,), dtype),
    )
  return params


def _layer_norm(a, gain, bias):
  """Layer normalization over the last axis (Ba et al. 2016).

  The statistics are computed in at least float32 (as Flax does), so bf16 and
  float16 activations are normalized as accurately as their own rounding allows.
  """
  wide = a.astype(jnp.promote_types(a.dtype, jnp.float32))
  mean = jnp.mean(wide, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(wide - mean), axis=-1, keepdims=True)
  normed = ((wide - mean) * jax.lax.rsqrt(var + _LN_EPS)).astype(a.dtype)
  return normed * _row(gain, a) + _row(bias, a)


def _row(v, like):
  """``v`` ``[N]`` reshaped to ``[1, ..., 1, N]`` (rank of ``like``): an explicit broadcast."""
  return jnp.reshape(v, (1,) * (like.ndim - 1) + v.shape)


def _project(params, xs, layer_norm):
  xw = xs @ params["W"]
  if layer_norm:
    xw = _layer_norm(xw, params["g_x"], params["beta_x"])
  return xw + _row(params["b"], xw)


def _hu(params, h, layer_norm):
  hu = h @ params["U"]
  if layer_norm:
    hu = _layer_norm(hu, params["g_h"], params["beta_h"])
  return hu


def _make(name, hidden_size, layer_norm, init, initial_carry, recur, hidden,
          sequence=None):
  project = lambda params, xs: _project(params, xs, layer_norm)  # noqa: E731

  def step(params, carry, x_t):
    return recur(params, carry, project(params, x_t))

  return Cell(
      init=init,
      initial_carry=initial_carry,
      step=step,
      project=project,
      recur=recur,
      hidden=hidden,
      input_size=lambda params: params["W"].shape[0],
      hidden_size=hidden_size,
      name=name + ("_ln" if layer_norm else ""),
      sequence=None if layer_norm else sequence,
  )


def _by_unroll(name, fused_sequence):
  """``sequence(params, xs, carry, mask, unroll=1)``: oneDNN's kernel where it applies,
  else ``fused(unroll, ...)``."""
  def sequence(params, xs, carry, mask, unroll=1):
    if _kernel.usable(name, params, xs, carry, mask):
      return _kernel.sequence(name, params, xs, carry)
    return fused_sequence(unroll, params, xs, carry, mask)
  sequence.kernel = name  # the kernel that unroll calls itself where one applies
  return sequence


def _zeros_carry(hidden_size):
  def initial_carry(batch_size, dtype=jnp.float32):
    return jnp.zeros((batch_size, hidden_size), dtype)

  return initial_carry


# ----------------------------------------------------------------------------
# Cells.


def rnn(hidden_size: int, activation: str = "tanh", *, layer_norm: bool = False,
        input_init="glorot_uniform", recurrent_init="orthogonal",
        dtype=jnp.float32) -> Cell:
  r"""Vanilla (Elman) RNN cell.

  .. math::

    h_t = f(x_t W + h_{t-1} U + b)

  with ``f`` = tanh or ReLU. With ``layer_norm=True`` (Ba et al. 2016) the two
  terms are normalized separately:
  ``h_t = f(LN(x_t W; g_x, beta_x) + LN(h_{t-1} U; g_h, beta_h) + b)``.

  Params (a dict): ``W`` ``[D, H]``, ``U`` ``[H, H]``, ``b`` ``[H]``; with layer
  norm also ``g_x``, ``beta_x``, ``g_h``, ``beta_h``, each ``[H]``.
  The carry is ``h`` ``[B, H]``.

  Args:
    hidden_size: ``H``.
    activation: ``"tanh"`` or ``"relu"``.
    layer_norm: normalize the input and recurrent terms.
    input_init: ``"glorot_uniform"``, ``"lecun_normal"`` or an initializer
      ``(key, shape, dtype) -> array`` for ``W``.
    recurrent_init: ``"orthogonal"``, ``"identity"`` or an initializer for ``U``.
    dtype: parameter dtype.

  Returns:
    A :class:`Cell`.

  Raises:
    ValueError: unknown activation or initializer, or a non-positive size.
  """
  check_positive_int("hidden_size", hidden_size)
  if activation not in _ACTIVATIONS:
    raise ValueError(
        f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
    )
  _input_init(input_init)
  _recurrent_init(recurrent_init, 1, hidden_size)
  f = _ACTIVATIONS[activation]

  def init(key, input_size):
    return _dense_init(key, input_size, hidden_size, 1, input_init,
                       recurrent_init, dtype, layer_norm)

  def recur(params, h, p_t):
    h = f(p_t + _hu(params, h, layer_norm))
    return h, h

  def sequence(params, xs, carry, mask, unroll=1):
    if _kernel.usable(f"rnn_{activation}", params, xs, carry, mask):
      return _kernel.sequence(f"rnn_{activation}", params, xs, carry)
    return _fused.rnn_sequence((activation, unroll), params, xs, carry, mask)
  sequence.kernel = f"rnn_{activation}"

  return _make(f"rnn_{activation}", hidden_size, layer_norm, init,
               _zeros_carry(hidden_size), recur, lambda h: h, sequence)


def irnn(hidden_size: int, *, input_std: float = 1e-3, dtype=jnp.float32) -> Cell:
  """ReLU RNN with identity recurrent weights (IRNN, Le et al. 2015).

  ``U = I``, ``b = 0`` and ``W ~ N(0, input_std^2)``, as in the paper.

  References:
    Le, Jaitly and Hinton 2015, "A Simple Way to Initialize Recurrent Networks
    of Rectified Linear Units".
  """
  normal = jax.nn.initializers.normal(input_std)
  return rnn(hidden_size, "relu", input_init=normal, recurrent_init="identity",
             dtype=dtype)._replace(name="irnn")


def lstm(hidden_size: int, *, layer_norm: bool = False, forget_bias: float = 1.0,
         input_init="glorot_uniform", recurrent_init="orthogonal",
         dtype=jnp.float32) -> Cell:
  r"""LSTM cell (Hochreiter & Schmidhuber 1997), gates in PyTorch/cuDNN order.

  .. math::

    [i, f, g, o] = x_t W + h_{t-1} U + b \\
    c_t = \sigma(f) c_{t-1} + \sigma(i) \tanh(g) \\
    h_t = \sigma(o) \tanh(c_t)

  With ``layer_norm=True`` (Ba et al. 2016): the gate pre-activation is
  ``LN(x_t W; g_x, beta_x) + LN(h_{t-1} U; g_h, beta_h) + b`` and
  ``h_t = sigma(o) tanh(LN(c_t; g_c, beta_c))``.

  Params: ``W`` ``[D, 4H]``, ``U`` ``[H, 4H]``, ``b`` ``[4H]`` (the forget
  block initialized to ``forget_bias``); with layer norm also ``g_x``,
  ``beta_x``, ``g_h``, ``beta_h`` ``[4H]`` and ``g_c``, ``beta_c`` ``[H]``.
  PyTorch's ``weight_ih_l0.T`` is ``W``, ``weight_hh_l0.T`` is ``U`` and
  ``bias_ih_l0 + bias_hh_l0`` is ``b``. The carry is
  ``LSTMState(h [B, H], c [B, H])``.

  Returns:
    A :class:`Cell`.
  """
  check_positive_int("hidden_size", hidden_size)
  _input_init(input_init)
  _recurrent_init(recurrent_init, 4, hidden_size)
  H = hidden_size

  def init(key, input_size):
    params = _dense_init(key, input_size, H, 4, input_init, recurrent_init,
                         dtype, layer_norm)
    params["b"] = params["b"].at[H:2 * H].set(forget_bias)
    if layer_norm:
      params.update(g_c=jnp.ones((H,), dtype), beta_c=jnp.zeros((H,), dtype))
    return params

  def initial_carry(batch_size, dtype=jnp.float32):
    # Two buffers, not one twice: a train step may donate the carry.
    return LSTMState(jnp.zeros((batch_size, H), dtype), jnp.zeros((batch_size, H), dtype))

  def recur(params, carry, p_t):
    z = p_t + _hu(params, carry.h, layer_norm)
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
    c_out = _layer_norm(c, params["g_c"], params["beta_c"]) if layer_norm else c
    h = jax.nn.sigmoid(o) * jnp.tanh(c_out)
    return LSTMState(h, c), h

  return _make("lstm", H, layer_norm, init, initial_carry, recur,
               lambda carry: carry.h, _by_unroll("lstm", _fused.lstm_sequence))


def gru(hidden_size: int, *, reset_after: bool = True, layer_norm: bool = False,
        input_init="glorot_uniform", recurrent_init="orthogonal",
        dtype=jnp.float32) -> Cell:
  r"""GRU cell (Cho et al. 2014), by default in the PyTorch/cuDNN form.

  .. math::

    [a_r, a_z, a_n] = x_t W + b \qquad [u_r, u_z, u_n] = h_{t-1} U \\
    r = \sigma(a_r + u_r) \qquad z = \sigma(a_z + u_z) \\
    n = \tanh(a_n + r (u_n + b_{hn})) \\
    h_t = (1 - z) n + z h_{t-1}

  The reset gate multiplies ``(h U_n + b_hn)``, as in cuDNN and PyTorch. With
  ``layer_norm=True`` the ``x W`` and ``h U`` terms are layer-normalized
  (gains ``g_x``, ``g_h``, biases ``beta_x``, ``beta_h``, each ``[3H]``) before
  they are split into gates.

  With ``reset_after=False`` the reset gate multiplies ``h`` before the
  recurrent matmul, as in Cho et al. 2014 and Keras' ``GRU(reset_after=False)``:

  .. math::

    n = \tanh(a_n + (r h_{t-1}) U_n)

  with ``r``, ``z`` and ``h_t`` as above and no ``b_hn``. That cell is named
  ``"gru_reset_before"``; it runs as a ``lax.scan`` over its step with
  autodiff (it has no hand-written backward pass) and has no layer-norm form
  (``u_n`` depends on ``r``, so ``h U`` is not one term to normalize).

  Params: ``W`` ``[D, 3H]``, ``U`` ``[H, 3H]``, ``b`` ``[3H]`` holding
  ``(b_ir + b_hr, b_iz + b_hz, b_in)`` in PyTorch's terms, and ``b_hn`` ``[H]``
  (not with ``reset_after=False``). The carry is ``h`` ``[B, H]``.

  Args:
    hidden_size: ``H``.
    reset_after: apply the reset gate after the recurrent matmul (``True``,
      PyTorch/cuDNN, Keras' default) or before it (``False``, Cho et al.).
    layer_norm: normalize the input and recurrent terms (``reset_after=True``
      only).
    input_init: ``"glorot_uniform"``, ``"lecun_normal"`` or an initializer
      ``(key, shape, dtype) -> array`` for ``W``.
    recurrent_init: ``"orthogonal"``, ``"identity"`` or an initializer for ``U``.
    dtype: parameter dtype.

  Returns:
    A :class:`Cell`.

  Raises:
    TypeError: ``reset_after`` is not a bool.
    ValueError: unknown initializer, a non-positive size, or
      ``layer_norm=True`` with ``reset_after=False``.

  References:
    Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder
    for Statistical Machine Translation".
  """
  check_positive_int("hidden_size", hidden_size)
  if not isinstance(reset_after, (bool, np.bool_)):
    raise TypeError(f"reset_after must be a bool, got {reset_after!r}")
  if layer_norm and not reset_after:
    raise ValueError(
        "gru(layer_norm=True, reset_after=False) is not supported: the layer-norm GRU "
        "normalizes h U as one [B, 3H] term, but with the reset gate before the matmul "
        "the n block is (r * h) U_n, which needs r first. Use reset_after=True with "
        "layer_norm=True")
  _input_init(input_init)
  _recurrent_init(recurrent_init, 3, hidden_size)
  H = hidden_size

  if not reset_after:
    def init_before(key, input_size):
      return _dense_init(key, input_size, H, 3, input_init, recurrent_init, dtype, False)

    def recur_before(params, h, p_t):
      U = params["U"]
      rz = jax.nn.sigmoid(p_t[..., :2 * H] + h @ U[:, :2 * H])
      r, z = rz[..., :H], rz[..., H:]
      n = jnp.tanh(p_t[..., 2 * H:] + (r * h) @ U[:, 2 * H:])
      h = (1.0 - z) * n + z * h
      return h, h

    return _make("gru_reset_before", H, False, init_before, _zeros_carry(H), recur_before,
                 lambda h: h)

  def init(key, input_size):
    params = _dense_init(key, input_size, H, 3, input_init, recurrent_init,
                         dtype, layer_norm)
    params["b_hn"] = jnp.zeros((H,), dtype)
    return params

  def recur(params, h, p_t):
    u = _hu(params, h, layer_norm)
    a_r, a_z, a_n = jnp.split(p_t, 3, axis=-1)
    u_r, u_z, u_n = jnp.split(u, 3, axis=-1)
    r = jax.nn.sigmoid(a_r + u_r)
    z = jax.nn.sigmoid(a_z + u_z)
    n = jnp.tanh(a_n + r * (u_n + _row(params["b_hn"], u_n)))
    h = (1.0 - z) * n + z * h
    return h, h

  return _make("gru", H, layer_norm, init, _zeros_carry(H), recur, lambda h: h,
               _by_unroll("gru", _fused.gru_sequence))


# ----------------------------------------------------------------------------
# Combinators and adapters.


def stack(*cells: Cell) -> Cell:
  """Stacks cells: the hidden state of layer ``l`` is the input of ``l + 1``.

  Params are a tuple with one entry per layer, the carry a tuple of the layers'
  carries, and the output the top layer's hidden state. :func:`bptt_jax.unroll`
  runs a stack layer by layer, each over the whole sequence (as cuDNN does), so
  every built-in layer gets its hand-written backward pass; ``step`` advances
  all layers by one step, for sampling and the diagnostics.

  Raises:
    ValueError: if no cell is given or a layer has no ``init``/``hidden_size``.
  """
  if not cells:
    raise ValueError("stack needs at least one cell, got none")
  cells = tuple(as_cell(c) for c in cells)
  for c in cells[:-1]:
    if c.hidden_size is None:
      raise ValueError(f"stacked cell {c.name!r} must declare hidden_size")

  def init(key, input_size):
    keys = jax.random.split(key, len(cells))
    sizes = [input_size] + [c.hidden_size for c in cells[:-1]]
    return tuple(c.init(k, d) for c, k, d in zip(cells, keys, sizes))

  def initial_carry(batch_size, dtype=jnp.float32):
    return tuple(c.initial_carry(batch_size, dtype) for c in cells)

  def step(params, carry, x_t):
    new = []
    for c, p, h in zip(cells, params, carry):
      h, x_t = c.step(p, h, x_t)
      new.append(h)
    return tuple(new), x_t

  first = cells[0]
  return Cell(
      init=init,
      initial_carry=initial_carry,
      step=step,
      hidden=lambda carry: cells[-1].hidden(carry[-1]),
      input_size=(lambda params: first.input_size(params[0]))
      if first.input_size else None,
      hidden_size=cells[-1].hidden_size,
      name="stack(" + ", ".join(c.name for c in cells) + ")",
      layers=cells,
  )


def residual_block(cell: Cell, *, mlp_ratio: int = 4, dtype=jnp.float32) -> Cell:
  r"""A pre-norm residual block around ``cell``, with an MLP: the layer of Feng et
  al.'s minGRU/minLSTM language models (and of Transformers, with the cell in
  place of attention).

  .. math::

    u_t = \mathrm{LN}_1(x_t) \qquad (c_t, h_t) = \mathrm{cell}(c_{t-1}, u_t) \qquad
    y_t = x_t + h_t \\
    o_t = y_t + \mathrm{gelu}(\mathrm{LN}_2(y_t) W_1 + b_1) W_2 + b_2

  ``LN`` is layer normalization with a gain and a bias (statistics in at least
  float32), ``gelu`` its tanh approximation. The input and output size is
  the cell's ``H``, so put a plain cell or an encoder first when the inputs
  have another size: ``stack(min_gru(H), residual_block(min_gru(H)), ...)``.
  :func:`bptt_jax.unroll` runs the norm and the MLP over all steps at once and
  the inner cell on its own path (a minGRU's linear scan, a GRU's fused
  backward pass, ``method=`` passed on); ``step`` is the same computation
  for one step.

  Params: ``{"cell": the cell's params (input size H), "norm": {"g", "b"}
  [H], "mlp_norm": {"g", "b"} [H], "W1" [H, mH], "b1" [mH], "W2" [mH, H],
  "b2" [H]}`` with ``m = mlp_ratio``; ``W1``, ``W2`` Glorot-uniform, gains
  ones, biases zeros. The carry is the cell's.

  Args:
    cell: the recurrent cell inside (its ``hidden_size`` must be known).
    mlp_ratio: the MLP's hidden width as a multiple of ``H``.
    dtype: the dtype of the block's own params.

  Returns:
    A :class:`Cell`.

  Raises:
    TypeError: ``cell`` is not a cell.
    ValueError: a cell without ``hidden_size`` or ``init``, a non-positive
      ``mlp_ratio``; at ``init``, an input size other than ``H``.

  References:
    Feng, Tung, Ahmed, Bengio and Hajimirsadeghi 2024, "Were RNNs All We
    Needed?", appendix (language modelling).
  """
  if not isinstance(cell, Cell):
    raise TypeError(f"residual_block wraps a bptt_jax.Cell, got {type(cell).__name__}")
  if cell.hidden_size is None or cell.init is None:
    raise ValueError(f"residual_block needs a cell with hidden_size and init, got {cell.name!r}")
  check_positive_int("mlp_ratio", mlp_ratio)
  H, width = cell.hidden_size, mlp_ratio * cell.hidden_size
  glorot = jax.nn.initializers.glorot_uniform()

  def init(key, input_size):
    check_positive_int("input_size", input_size)
    if input_size != H:
      raise ValueError(
          f"residual_block adds its input to {cell.name}'s output: input_size must be "
          f"H = {H}, got {input_size}; put a plain cell or an encoder first")
    k_cell, k1, k2 = jax.random.split(key, 3)
    norm = lambda: {"g": jnp.ones((H,), dtype), "b": jnp.zeros((H,), dtype)}  # noqa: E731
    return {"cell": cell.init(k_cell, H), "norm": norm(), "mlp_norm": norm(),
            "W1": glorot(k1, (H, width), dtype), "b1": jnp.zeros((width,), dtype),
            "W2": glorot(k2, (width, H), dtype), "b2": jnp.zeros((H,), dtype)}

  def before(params, xs):
    return _layer_norm(xs, params["norm"]["g"], params["norm"]["b"])

  def after(params, xs, hs):
    ys = xs + hs
    u = _layer_norm(ys, params["mlp_norm"]["g"], params["mlp_norm"]["b"])
    u = jax.nn.gelu(u @ params["W1"] + _row(params["b1"], u))
    return ys + u @ params["W2"] + _row(params["b2"], ys)

  def step(params, carry, x_t):
    carry, h_t = cell.step(params["cell"], carry, before(params, x_t))
    return carry, after(params, x_t, h_t)

  return Cell(init=init, initial_carry=cell.initial_carry, step=step, hidden=cell.hidden,
              input_size=lambda params: params["W1"].shape[0], hidden_size=H,
              name=f"residual_block({cell.name})", wraps=(cell, before, after))
