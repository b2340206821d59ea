"""Flax both ways: Flax cells in bptt_jax, bptt_jax cells in Flax models, weights either way.

- :func:`from_flax` runs any Flax recurrent cell (linen or NNX) as a
  :class:`bptt_jax.Cell`, Flax's own step inside bptt_jax's scan.
- :func:`from_flax_weights` turns a Flax ``LSTMCell``, ``OptimizedLSTMCell``,
  ``GRUCell`` or ``SimpleCell`` (linen or NNX) into the built-in bptt_jax cell
  with the same equations and its weights into that cell's params, so it gets
  the hand-written backward pass; :func:`to_flax_weights` goes back.
- :class:`LinenRNN` and :class:`NNXRNN` put any bptt_jax cell (a stack too)
  inside a Flax model, running :func:`bptt_jax.unroll` (fused backward pass,
  lengths, masks) on params that Flax owns.

Flax's LSTM gates are ``(i, f, g, o)`` with the bias on the recurrent term, as
here. Flax linen's ``GRUCell`` is PyTorch's GRU (``b_hn`` is linen's ``hn``
bias); NNX's ``GRUCell`` has no ``b_hn`` (its recurrent layer has no bias), so
it is bptt_jax's GRU with ``b_hn = 0``, and a GRU with a non-zero ``b_hn`` has
no NNX equivalent.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from bptt_jax._cells import Cell, as_cell, gru, lstm, rnn
from bptt_jax._common import cast_floats, check_positive_int, is_concrete
from bptt_jax._unroll import unroll

Array = jax.Array

_LSTM_GATES = ("i", "f", "g", "o")
_GRU_GATES = ("r", "z", "n")


def _flax_kind(module) -> str:
  """``"linen"`` or ``"nnx"`` for a Flax recurrent cell; ``TypeError`` otherwise."""
  if isinstance(module, linen.RNNCellBase):
    return "linen"
  if isinstance(module, nnx.RNNCellBase):
    return "nnx"
  raise TypeError(
      "expected a Flax recurrent cell (a flax.linen.RNNCellBase or flax.nnx.RNNCellBase "
      f"instance), got {type(module).__name__}")


# ----------------------------------------------------------------------------
# Flax cells as bptt_jax cells (Flax's own step).

# Where a linen cell keeps its input kernel [D, ...]: a fixed part of each class.
_LINEN_INPUT_KERNEL = {
    linen.LSTMCell: "ii", linen.OptimizedLSTMCell: "ii", linen.GRUCell: "ir",
    linen.SimpleCell: "i", linen.MGUCell: "if",
}


def _linen_input_size(module):
  path = next((p for cls, p in _LINEN_INPUT_KERNEL.items() if type(module) is cls), None)
  if path is None:
    return None  # a user's own linen cell: Flax checks the shapes itself

  def input_size(params):
    return _unwrap_variables(params)[path]["kernel"].shape[0]

  return input_size


def _unwrap_variables(params):
  """Flax's ``variables`` (``{"params": ...}``) or its ``params``: the params."""
  if hasattr(params, "keys") and set(params.keys()) == {"params"}:
    return params["params"]
  return params


def from_flax(module) -> Cell:
  """Runs a Flax recurrent cell, linen or NNX, as a bptt_jax cell.

  The cell's step is Flax's own ``__call__``; :func:`bptt_jax.unroll` scans it
  (so lengths, masks, ``reverse``, ``remat`` and the training paths work), with
  autodiff for the backward pass. For the hand-written backward pass, convert
  the weights instead (:func:`from_flax_weights`).

  - **linen** (``flax.linen.LSTMCell(features=H)``, ``OptimizedLSTMCell``,
    ``GRUCell``, ``SimpleCell``, ``MGUCell`` or any ``nn.RNNCellBase``): the
    params are Flax's ``variables["params"]`` (``cell.init(key, D)`` draws them
    with Flax's initializers). A linen cell learns its input size from its
    first input; for Flax's own cells the params are checked against the
    inputs' ``D`` (read from the input kernel of that class).
  - **NNX** (``flax.nnx.LSTMCell(D, H, rngs=nnx.Rngs(0))``, ...): the module
    holds its params, drawn from its ``rngs`` when it was built; the cell's
    params are ``nnx.state(module, nnx.Param)``, and ``cell.init(key, D)``
    returns a copy of them (the key is not used: build the module with
    ``nnx.Rngs(key)`` for another draw) after checking ``D`` against the
    module's ``in_features``. ``nnx.update(module, params)`` puts trained
    params back.

  The carry is Flax's (``(c, h)`` for an LSTM), zeros, cast to the compute
  dtype; the hidden state is the last element of a tuple carry or the carry.

  Args:
    module: a Flax linen or NNX recurrent cell.

  Returns:
    A :class:`bptt_jax.Cell`.

  Raises:
    TypeError: ``module`` is not a Flax recurrent cell.
  """
  kind = _flax_kind(module)

  def hidden(carry):
    return carry[-1] if isinstance(carry, tuple) else carry

  if kind == "linen":
    def init(key, input_size):
      check_positive_int("input_size", input_size)
      x = jnp.zeros((1, input_size), module.param_dtype)
      carry = module.initialize_carry(jax.random.key(0), x.shape)
      return module.init(key, carry, x)["params"]

    def initial_carry(batch_size, dtype=jnp.float32):
      return cast_floats(module.initialize_carry(jax.random.key(0), (batch_size, 1)), dtype)

    def step(params, carry, x_t):
      return module.apply({"params": _unwrap_variables(params)}, carry, x_t)

    return Cell(init=init, initial_carry=initial_carry, step=step, hidden=hidden,
                input_size=_linen_input_size(module),
                hidden_size=getattr(module, "features", None),
                name=f"flax.{type(module).__name__}")

  graphdef, own_params, rest = nnx.split(module, nnx.Param, ...)
  in_features = getattr(module, "in_features", None)

  def nnx_init(key, input_size):
    del key  # The module drew its params from its rngs when it was built.
    check_positive_int("input_size", input_size)
    if in_features is not None and input_size != in_features:
      raise ValueError(
          f"flax.nnx.{type(module).__name__} was built for in_features = {in_features}, "
          f"got input_size = {input_size}")
    return jax.tree.map(jnp.copy, own_params)

  def nnx_initial_carry(batch_size, dtype=jnp.float32):
    shape = (batch_size, in_features if in_features is not None else 1)
    return cast_floats(module.initialize_carry(shape, rngs=nnx.Rngs(0)), dtype)

  def nnx_step(params, carry, x_t):
    return nnx.merge(graphdef, params, rest)(carry, x_t)

  return Cell(init=nnx_init, initial_carry=nnx_initial_carry, step=nnx_step, hidden=hidden,
              input_size=None if in_features is None else (lambda params: in_features),
              hidden_size=getattr(module, "hidden_features", None),
              name=f"flax.nnx.{type(module).__name__}")


# ----------------------------------------------------------------------------
# Weights: Flax cell <-> built-in bptt_jax cell.


def _check_functions(module, **expected):
  """Raises unless each named function of ``module`` is the expected one."""
  for attr, allowed in expected.items():
    fn = getattr(module, attr)
    if not any(fn is f for f in allowed):
      names = " or ".join(getattr(f, "__name__", repr(f)) for f in allowed)
      raise ValueError(
          f"{type(module).__name__} with {attr}={getattr(fn, '__name__', fn)!r} has no "
          f"bptt_jax equivalent: the built-in cells use {attr} = {names}")


def _cell_spec(module):
  """``(family, kind, activation, H)`` of a Flax cell with a bptt_jax equivalent.

  ``family`` is ``"lstm"``, ``"gru"`` or ``"rnn"``; ``kind`` ``"linen"`` or ``"nnx"``.
  """
  kind = _flax_kind(module)
  fl = linen if kind == "linen" else nnx
  H = module.features if kind == "linen" else module.hidden_features
  cls = type(module)
  sigmoid, tanh, relu = (jax.nn.sigmoid,), (jnp.tanh,), (jax.nn.relu,)
  if cls in (fl.LSTMCell, fl.OptimizedLSTMCell):
    _check_functions(module, gate_fn=sigmoid, activation_fn=tanh)
    return "lstm", kind, None, H
  if cls is fl.GRUCell:
    _check_functions(module, gate_fn=sigmoid, activation_fn=tanh)
    return "gru", kind, None, H
  if cls is fl.SimpleCell:
    _check_functions(module, activation_fn=tanh + relu)
    if module.residual:
      raise ValueError(
          "SimpleCell(residual=True) adds h_{t-1} inside the activation; bptt_jax's rnn "
          "has no such term (no bptt_jax equivalent)")
    act = "tanh" if module.activation_fn is jnp.tanh else "relu"
    return "rnn", kind, act, H
  raise ValueError(
      f"{kind} {cls.__name__} has no built-in bptt_jax equivalent; weights convert for "
      "LSTMCell, OptimizedLSTMCell, GRUCell and SimpleCell (use from_flax to run any "
      "Flax cell as it is)")


def _pure(params, module, kind):
  """The Flax params as a plain nested dict of arrays."""
  if params is None:
    if kind == "linen":
      raise ValueError(
          "a linen cell holds no weights: pass its params (variables['params'])")
    params = nnx.state(module, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  return _unwrap_variables(params)


def _get(params, *path):
  node = params
  for i, key in enumerate(path):
    if not hasattr(node, "keys") or key not in node:
      where = "/".join(path[:i]) or "the top level"
      have = sorted(node.keys()) if hasattr(node, "keys") else type(node).__name__
      raise ValueError(f"Flax params have no {key!r} under {where} (found {have})")
    node = node[key]
  return jnp.asarray(node)


def _nnx_lstm_name(gate_pair):
  # NNX's LSTMCell calls its input-forget layer if_ (if is a keyword).
  return "if_" if gate_pair == "if" else gate_pair


def _from_flax_params(family, kind, cls_name, p, H):
  """bptt_jax params from plain Flax params (any of the supported layouts)."""
  if family == "lstm":
    if kind == "nnx" and cls_name == "OptimizedLSTMCell":
      return {"W": _get(p, "dense_i", "kernel"), "U": _get(p, "dense_h", "kernel"),
              "b": _get(p, "dense_h", "bias")}
    name = _nnx_lstm_name if kind == "nnx" else (lambda n: n)
    return {
        "W": jnp.concatenate([_get(p, name("i" + g), "kernel") for g in _LSTM_GATES], axis=1),
        "U": jnp.concatenate([_get(p, name("h" + g), "kernel") for g in _LSTM_GATES], axis=1),
        "b": jnp.concatenate([_get(p, name("h" + g), "bias") for g in _LSTM_GATES]),
    }
  if family == "gru":
    if kind == "nnx":
      W = _get(p, "dense_i", "kernel")
      return {"W": W, "U": _get(p, "dense_h", "kernel"), "b": _get(p, "dense_i", "bias"),
              "b_hn": jnp.zeros((H,), W.dtype)}
    return {
        "W": jnp.concatenate([_get(p, "i" + g, "kernel") for g in _GRU_GATES], axis=1),
        "U": jnp.concatenate([_get(p, "h" + g, "kernel") for g in _GRU_GATES], axis=1),
        "b": jnp.concatenate([_get(p, "i" + g, "bias") for g in _GRU_GATES]),
        "b_hn": _get(p, "hn", "bias"),
    }
  i, h = ("dense_i", "dense_h") if kind == "nnx" else ("i", "h")
  return {"W": _get(p, i, "kernel"), "U": _get(p, h, "kernel"), "b": _get(p, i, "bias")}


def _check_shapes(params, H, family, where):
  G = {"lstm": 4, "gru": 3, "rnn": 1}[family]
  W, U = params["W"], params["U"]
  if W.ndim != 2 or W.shape[1] != G * H or U.shape != (H, G * H) or params["b"].shape != (G * H,):
    raise ValueError(
        f"{where}: expected W [D, {G * H}], U [{H}, {G * H}], b [{G * H}] for a {family} "
        f"with H = {H}, got W {tuple(W.shape)}, U {tuple(U.shape)}, b {tuple(params['b'].shape)}")


def from_flax_weights(module, params=None) -> tuple[Cell, Any]:
  """The built-in bptt_jax cell equal to a Flax cell, and its weights converted.

  ==========================  ================================================
  Flax cell (linen or NNX)    bptt_jax cell and params
  ==========================  ================================================
  ``LSTMCell``,               ``lstm(H)``: ``W`` = the input kernels ``ii, if,
  ``OptimizedLSTMCell``       ig, io`` side by side, ``U`` = ``hi, hf, hg, ho``,
                              ``b`` = the ``h*`` biases (NNX's optimized cell:
                              ``dense_i``/``dense_h`` as they are)
  linen ``GRUCell``           ``gru(H)``: ``W`` = ``ir, iz, in``, ``U`` = ``hr,
                              hz, hn``, ``b`` = the ``i*`` biases, ``b_hn`` =
                              ``hn``'s bias
  NNX ``GRUCell``             ``gru(H)``: ``W``, ``b`` from ``dense_i``, ``U``
                              from ``dense_h``, ``b_hn = 0`` (NNX has none)
  ``SimpleCell``              ``rnn(H, "tanh" | "relu")``: ``W``, ``b`` from the
                              input layer, ``U`` from the recurrent one
  ==========================  ================================================

  The conversion is made of ``jnp`` operations, so it can sit inside
  ``jax.grad`` (gradients then come back in Flax's layout). Flax's compute
  ``dtype`` attribute is not part of the weights: pass ``dtype=`` to
  :func:`bptt_jax.unroll` for the same.

  Args:
    module: a Flax linen or NNX ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``
      or ``SimpleCell``.
    params: the Flax params: for linen ``variables["params"]`` of the cell
      (``variables`` itself is accepted too); for NNX an ``nnx.State`` (or its
      pure dict), by default ``nnx.state(module, nnx.Param)``.

  Returns:
    ``(cell, params)``: a :class:`bptt_jax.Cell` and its params dict.

  Raises:
    TypeError: ``module`` is not a Flax recurrent cell.
    ValueError: a cell whose equations differ from every built-in cell (another
      ``gate_fn``/``activation_fn``, ``SimpleCell(residual=True)``, ``MGUCell``,
      ``ConvLSTMCell``, a user's cell), a linen cell without params, or params
      of another layout or size.
  """
  family, kind, act, H = _cell_spec(module)
  p = _pure(params, module, kind)
  out = _from_flax_params(family, kind, type(module).__name__, p, H)
  _check_shapes(out, H, family, f"{kind} {type(module).__name__}")
  dtype = out["W"].dtype
  cell = {"lstm": lambda: lstm(H, dtype=dtype), "gru": lambda: gru(H, dtype=dtype),
          "rnn": lambda: rnn(H, act, dtype=dtype)}[family]()
  return cell, out


def _bptt_family(cell: Cell):
  """``(family, activation)`` of a built-in bptt_jax cell; ``ValueError`` for others."""
  families = {"lstm": ("lstm", None), "gru": ("gru", None), "rnn_tanh": ("rnn", "tanh"),
              "rnn_relu": ("rnn", "relu"), "irnn": ("rnn", "relu")}
  if cell.name == "gru_reset_before":
    raise ValueError(
        "bptt_jax gru(reset_after=False) has no Flax equivalent: Flax's GRUCell (linen and "
        "NNX) applies the reset gate after the recurrent matmul, tanh(x W_n + b_n + r * (h U_n "
        "+ b_hn)), this cell before it, tanh(x W_n + b_n + (r * h) U_n). Wrap it with "
        "LinenRNN or NNXRNN instead")
  if cell.name not in families:
    raise ValueError(
        f"bptt_jax cell {cell.name!r} has no Flax equivalent: weights convert for the "
        "built-in rnn, irnn, lstm and gru without layer norm (wrap any cell with LinenRNN "
        "or NNXRNN instead)")
  return families[cell.name]


def to_flax_weights(cell: Cell, params, module):
  """bptt_jax params as the weights of the equal Flax cell (the inverse of
  :func:`from_flax_weights`).

  Args:
    cell: a built-in ``rnn``/``irnn``/``lstm``/``gru`` (no layer norm).
    params: its params dict.
    module: the Flax cell to fill, linen or NNX, of the same kind and ``H``
      (``SimpleCell`` with the same activation for an ``rnn``).

  Returns:
    For linen, the cell's ``params`` (``module.apply({"params": p}, ...)``, or
    under ``"cell"`` in ``nn.RNN``'s). For NNX, an ``nnx.State`` of the
    module's params: ``nnx.update(module, state)`` loads it.

  Raises:
    ValueError: cells or sizes that do not match, a layer-norm or user cell, a
      ``gru(reset_after=False)`` (Flax's GRU applies the reset gate after the
      recurrent matmul), a GRU with a non-zero ``b_hn`` for NNX's ``GRUCell``
      (which has no such bias: the equations differ).
    TypeError: that ``b_hn`` check needs concrete values (not under ``jit``).
  """
  cell = as_cell(cell)
  family, act = _bptt_family(cell)
  m_family, kind, m_act, H = _cell_spec(module)
  name = f"{kind} {type(module).__name__}"
  if (family, act) != (m_family, m_act):
    raise ValueError(
        f"bptt_jax {cell.name!r} does not match {name}"
        + (f" with activation {m_act!r}" if m_act else ""))
  keys = {"W", "U", "b"} | ({"b_hn"} if family == "gru" else set())
  if not hasattr(params, "keys") or set(params.keys()) != keys:
    got = sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
    raise ValueError(f"{cell.name} params must have the keys {sorted(keys)}, got {got}")
  params = {k: jnp.asarray(v) for k, v in params.items()}
  _check_shapes(params, H, family, f"{cell.name} params for {name}")
  if kind == "nnx" and params["W"].shape[0] != module.in_features:
    raise ValueError(
        f"{name} was built for in_features = {module.in_features}, the params have "
        f"D = {params['W'].shape[0]}")
  W, U, b = params["W"], params["U"], params["b"]
  if family == "lstm":
    Ws, Us, bs = (jnp.split(a, 4, axis=-1) for a in (W, U, b))
    if kind == "nnx" and type(module) is nnx.OptimizedLSTMCell:
      pure = {"dense_i": {"kernel": W}, "dense_h": {"kernel": U, "bias": b}}
    else:
      name_of = _nnx_lstm_name if kind == "nnx" else (lambda n: n)
      pure = {}
      for g, w_g, u_g, b_g in zip(_LSTM_GATES, Ws, Us, bs):
        pure[name_of("i" + g)] = {"kernel": w_g}
        pure[name_of("h" + g)] = {"kernel": u_g, "bias": b_g}
  elif family == "gru":
    b_hn = params["b_hn"]
    if kind == "nnx":
      if not is_concrete(b_hn):
        raise TypeError(
            "converting a GRU to NNX's GRUCell checks that b_hn is zero: call "
            "to_flax_weights outside jit")
      worst = float(jnp.max(jnp.abs(b_hn))) if b_hn.size else 0.0
      if worst != 0.0:
        raise ValueError(
            "NNX's GRUCell has no b_hn (its n gate is tanh(x W_n + b_n + r * (h U_n))), "
            f"but these params have b_hn != 0 (max |b_hn| = {worst:.3g}): the equations "
            "differ. Use flax.linen.GRUCell, which has it, or keep the bptt_jax cell")
      pure = {"dense_i": {"kernel": W, "bias": b}, "dense_h": {"kernel": U}}
    else:
      Ws, Us, bs = (jnp.split(a, 3, axis=-1) for a in (W, U, b))
      pure = {}
      for g, w_g, u_g, b_g in zip(_GRU_GATES, Ws, Us, bs):
        pure["i" + g] = {"kernel": w_g, "bias": b_g}
        pure["h" + g] = {"kernel": u_g}
      pure["hn"]["bias"] = b_hn
  else:
    i, h = ("dense_i", "dense_h") if kind == "nnx" else ("i", "h")
    pure = {i: {"kernel": W, "bias": b}, h: {"kernel": U}}
  if kind == "linen":
    return pure
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  return state


# ----------------------------------------------------------------------------
# bptt_jax cells inside Flax models.


class LinenRNN(linen.Module):
  """Any bptt_jax cell as a Flax linen layer: ``(carry, hs) = LinenRNN(cell)(xs)``.

  The layer owns the cell's params (one linen param, ``"cell"``, holding the
  cell's params tree, drawn by ``cell.init`` from the ``"params"`` RNG) and runs
  :func:`bptt_jax.unroll` on them, so a built-in cell keeps its hand-written
  backward pass inside ``jax.grad`` of the whole Flax model.

  Example::

    class Classifier(nn.Module):
      @nn.compact
      def __call__(self, xs, lengths):                   # xs [B, T, D]
        _, hs = bj.LinenRNN(bj.lstm(64))(xs, lengths=lengths)
        return nn.Dense(3)(bj.last_step(hs, lengths))

  Attributes:
    cell: a :class:`bptt_jax.Cell` (a :func:`bptt_jax.stack` too).
    reverse, time_major, hoist, unroll, remat, fused, dtype: passed to
      :func:`bptt_jax.unroll`.
  """

  cell: Cell
  reverse: bool = False
  time_major: bool = False
  hoist: bool | None = None
  unroll: int = 1
  remat: Any = None
  fused: bool | None = None
  dtype: Any = None

  @linen.compact
  def __call__(self, xs, *, lengths=None, mask=None, carry=None):
    """Runs the cell over ``xs``.

    Args:
      xs: ``[B, T, D]`` (``[T, B, D]`` if ``time_major``).
      lengths: optional ``[B]`` integers; or ``mask`` ``[B, T]`` booleans.
      carry: optional initial carry (zeros by default).

    Returns:
      ``(final_carry, hs)`` as :func:`bptt_jax.unroll`: ``hs`` ``[B, T, H]``,
      zero at padded steps, and each sequence's own final carry.
    """
    cell = as_cell(self.cell)
    if cell.init is None:
      raise ValueError(f"{cell.name} has no init: LinenRNN needs a cell that draws its params")
    if not hasattr(xs, "shape") or len(xs.shape) != 3:
      raise ValueError(
          f"LinenRNN: xs must have rank 3 ([B, T, D]), got {getattr(xs, 'shape', type(xs))}")
    params = self.param("cell", lambda key: cell.init(key, xs.shape[-1]))
    return unroll(cell, params, xs, lengths=lengths, mask=mask, carry=carry,
                  time_major=self.time_major, reverse=self.reverse, hoist=self.hoist,
                  unroll=self.unroll, remat=self.remat, fused=self.fused, dtype=self.dtype)


def _is_variable(x):
  return isinstance(x, nnx.Variable)


class NNXRNN(nnx.Module):
  """Any bptt_jax cell as a Flax NNX layer.

  ``NNXRNN(cell, in_features, rngs=nnx.Rngs(0))`` draws the cell's params
  (``cell.init`` with a key from ``rngs.params()``) and holds each array as an
  ``nnx.Param`` (at ``.params``, the cell's params tree), so ``nnx.Optimizer``,
  ``nnx.grad`` and ``nnx.jit`` see them; calling it runs
  :func:`bptt_jax.unroll` (a built-in cell keeps its hand-written backward
  pass).

  Example::

    class Classifier(nnx.Module):
      def __init__(self, rngs):
        self.rnn = bj.NNXRNN(bj.lstm(64), 16, rngs=rngs)
        self.head = nnx.Linear(64, 3, rngs=rngs)

      def __call__(self, xs, lengths):                   # xs [B, T, 16]
        _, hs = self.rnn(xs, lengths=lengths)
        return self.head(bj.last_step(hs, lengths))

  Args:
    cell: a :class:`bptt_jax.Cell` (a :func:`bptt_jax.stack` too).
    in_features: ``D``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    **unroll_kwargs: ``reverse``, ``time_major``, ``hoist``, ``unroll``,
      ``remat``, ``fused``, ``dtype``: passed to :func:`bptt_jax.unroll`.

  Raises:
    ValueError: a cell without ``init``, a non-positive ``in_features``, or an
      unroll setting that belongs to the call (``lengths``, ``mask``, ``carry``).
  """

  _UNROLL = ("reverse", "time_major", "hoist", "unroll", "remat", "fused", "dtype")

  def __init__(self, cell: Cell, in_features: int, *, rngs: nnx.Rngs, **unroll_kwargs):
    cell = as_cell(cell)
    if cell.init is None:
      raise ValueError(f"{cell.name} has no init: NNXRNN needs a cell that draws its params")
    check_positive_int("in_features", in_features)
    unknown = sorted(set(unroll_kwargs) - set(self._UNROLL))
    if unknown:
      raise ValueError(
          f"NNXRNN takes the unroll settings {list(self._UNROLL)}, got {unknown} (lengths, "
          "mask and carry are given to the call)")
    self.cell = cell
    self.in_features = in_features
    self.unroll_kwargs = dict(unroll_kwargs)
    self.params = nnx.data(jax.tree.map(nnx.Param, cell.init(rngs.params(), in_features)))

  def __call__(self, xs, *, lengths=None, mask=None, carry=None):
    """``(final_carry, hs)`` over ``xs`` ``[B, T, D]``, as :func:`bptt_jax.unroll`."""
    params = jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)
    return unroll(self.cell, params, xs, lengths=lengths, mask=mask, carry=carry,
                  **self.unroll_kwargs)
