"""Keras 3 weights in: ``SimpleRNN``, ``LSTM`` and ``GRU`` layers as bptt_jax cells and params.

Keras stores ``kernel`` ``[D, G*H]`` and ``recurrent_kernel`` ``[H, G*H]``, the
layout bptt_jax uses. Its LSTM gates are ``(i, f, c, o)``, bptt_jax's order;
its GRU gates are ``(z, r, h)``, reordered here to ``(r, z, n)``; ``GRU(reset_after=False)``
becomes ``gru(H, reset_after=False)``. keras is not imported here: the layer brings it.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp

from bptt_jax._cells import gru, lstm, rnn

_LAYERS = {"SimpleRNN": "rnn", "SimpleRNNCell": "rnn", "LSTM": "lstm", "LSTMCell": "lstm",
           "GRU": "gru", "GRUCell": "gru"}


def _fn_name(fn) -> str:
  return getattr(fn, "__name__", repr(fn))


def _check_activation(layer, attr, allowed):
  name = _fn_name(getattr(layer, attr))
  if name not in allowed:
    raise ValueError(
        f"{type(layer).__name__}({attr}={name!r}) has no bptt_jax equivalent: the built-in "
        f"cells use {' or '.join(repr(a) for a in allowed)}")
  return name


def from_keras(layer, weights=None):
  """A Keras 3 ``SimpleRNN``, ``LSTM`` or ``GRU`` as a bptt_jax cell and params.

  ==========================  ==================================================
  Keras layer                 bptt_jax cell and params
  ==========================  ==================================================
  ``SimpleRNN``               ``rnn(H, "tanh" | "relu")``: ``W = kernel``, ``U =
                              recurrent_kernel``, ``b = bias``
  ``LSTM``                    ``lstm(H)``: the same (gates ``(i, f, c, o)`` are
                              bptt_jax's ``(i, f, g, o)``)
  ``GRU(reset_after=True)``   ``gru(H)``: Keras' ``(z, r, h)`` blocks reordered to
                              ``(r, z, n)``; ``bias`` is ``[2, 3H]`` (input,
                              recurrent): ``b = (b_ir + b_rr, b_iz + b_rz, b_ih)``,
                              ``b_hn`` = the recurrent ``h`` bias
  ``GRU(reset_after=False)``  ``gru(H, reset_after=False)``: the same reordering;
                              ``bias`` is one ``[3H]`` vector, ``b = (b_r, b_z,
                              b_h)``; no ``b_hn``: the reset gate multiplies ``h``
                              before the matmul, ``tanh(x W_n + b_n + (r h) U_n)``
  ==========================  ==================================================

  Keras' update ``h = z h_{t-1} + (1 - z) hh`` is bptt_jax's. ``gru(H)`` gets
  the hand-written backward pass; ``gru(H, reset_after=False)`` runs with
  autodiff through ``lax.scan``. Without a bias (``use_bias=False``) the biases
  are zeros. The cells ``SimpleRNNCell``, ``LSTMCell`` and ``GRUCell`` convert
  the same way.

  Args:
    layer: a built Keras layer (called once, or ``layer.build(shape)``).
    weights: optional list of arrays in ``layer.get_weights()`` order
      (``kernel``, ``recurrent_kernel``, ``bias``) to convert instead of the
      layer's own, e.g. from a saved file, or ``jnp`` arrays inside
      ``jax.grad`` (gradients then come back in Keras' layout).

  Returns:
    ``(cell, params)``.

  Raises:
    TypeError: not one of these layers.
    ValueError: another activation (``recurrent_activation`` other than
      ``sigmoid``, ``activation`` other than ``tanh``, or ``relu`` for
      ``SimpleRNN``), ``go_backwards=True``, an unbuilt layer, or weights of
      other shapes.

  Warns:
    UserWarning: ``dropout`` or ``recurrent_dropout`` > 0: training-time
      behaviour that the converted cell does not have.
  """
  cls = type(layer).__name__
  if cls not in _LAYERS or not hasattr(layer, "get_weights"):
    raise TypeError(
        "expected a Keras SimpleRNN, LSTM or GRU layer (or its cell), got "
        f"{cls}")
  family = _LAYERS[cls]
  cell = getattr(layer, "cell", layer)
  if getattr(layer, "go_backwards", False):
    raise ValueError(
        f"{cls}(go_backwards=True): convert the layer with go_backwards=False and run it "
        "with bptt_jax.unroll(..., reverse=True)")
  act = _check_activation(cell, "activation", ("tanh", "relu") if family == "rnn" else ("tanh",))
  if family != "rnn":
    _check_activation(cell, "recurrent_activation", ("sigmoid",))
  if getattr(cell, "dropout", 0) or getattr(cell, "recurrent_dropout", 0):
    warnings.warn(
        f"{cls}(dropout={cell.dropout}, recurrent_dropout={cell.recurrent_dropout}) drops "
        "units in training; the converted cell has no dropout", UserWarning, stacklevel=2)
  if weights is None:
    if not cell.built:
      raise ValueError(f"{cls} is not built: call it on an input or layer.build(shape) first")
    weights = cell.get_weights()
  use_bias = cell.use_bias
  expected = 3 if use_bias else 2
  if len(weights) != expected:
    raise ValueError(
        f"{cls}: expected {expected} weights (kernel, recurrent_kernel"
        f"{', bias' if use_bias else ''}), got {len(weights)}")
  kernel, recurrent = jnp.asarray(weights[0]), jnp.asarray(weights[1])
  H = cell.units
  reset_after = family != "gru" or bool(cell.reset_after)
  G = {"rnn": 1, "lstm": 4, "gru": 3}[family]
  bias_shape = {"rnn": (H,), "lstm": (4 * H,),
                "gru": (2, 3 * H) if reset_after else (3 * H,)}[family]
  bias = jnp.asarray(weights[2]) if use_bias else jnp.zeros(bias_shape, kernel.dtype)
  if (kernel.ndim != 2 or kernel.shape[1] != G * H or recurrent.shape != (H, G * H)
      or bias.shape != bias_shape):
    raise ValueError(
        f"{cls}(units={H}): expected kernel [D, {G * H}], recurrent_kernel [{H}, {G * H}], "
        f"bias {list(bias_shape)}, got {tuple(kernel.shape)}, {tuple(recurrent.shape)}, "
        f"{tuple(bias.shape)}")
  dtype = kernel.dtype
  if family == "rnn":
    return rnn(H, act, dtype=dtype), {"W": kernel, "U": recurrent, "b": bias}
  if family == "lstm":
    return lstm(H, dtype=dtype), {"W": kernel, "U": recurrent, "b": bias}

  def rzn(a):  # Keras (z, r, h) blocks -> (r, z, n)
    z, r, h = jnp.split(a, 3, axis=-1)
    return jnp.concatenate([r, z, h], axis=-1)

  if not reset_after:  # one bias, on the input term
    return gru(H, reset_after=False, dtype=dtype), {"W": rzn(kernel), "U": rzn(recurrent),
                                                    "b": rzn(bias)}
  b_in, b_rec = rzn(bias[0]), rzn(bias[1])
  b = jnp.concatenate([b_in[:2 * H] + b_rec[:2 * H], b_in[2 * H:]])
  return gru(H, dtype=dtype), {"W": rzn(kernel), "U": rzn(recurrent), "b": b,
                               "b_hn": b_rec[2 * H:]}
