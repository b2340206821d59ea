"""PyTorch weights in: ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` as bptt_jax cells and params.

PyTorch stores ``weight_ih_l{k}`` ``[G*H, D]`` and ``weight_hh_l{k}``
``[G*H, H]`` with gates in the order bptt_jax uses (LSTM ``(i, f, g, o)``, GRU
``(r, z, n)``), so ``W = weight_ih.T`` and ``U = weight_hh.T``; the two biases
add up, except the GRU's ``b_hn``, which the reset gate multiplies. torch is
imported only when a module is given.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from bptt_jax._cells import gru, lstm, rnn, stack

_KEY = re.compile(r"(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?")
_MODES = {"RNN_TANH": ("rnn", "tanh"), "RNN_RELU": ("rnn", "relu"), "LSTM": ("lstm", None),
          "GRU": ("gru", None)}
_GATES = {1: "rnn", 4: "lstm", 3: "gru"}


def _array(t):
  """A torch tensor (or any array) as a JAX array, keeping its dtype where JAX can."""
  if hasattr(t, "detach"):
    t = t.detach().cpu().numpy()
  if isinstance(t, np.ndarray) and t.dtype == np.float64:
    return jnp.asarray(t, dtype=jnp.result_type(float))  # float64 only under jax_enable_x64
  return jnp.asarray(t)


def _layer_params(family, w_ih, w_hh, b_ih, b_hh):
  W, U = w_ih.T, w_hh.T
  H = w_hh.shape[1]
  if b_ih is None:
    b_ih = b_hh = jnp.zeros((W.shape[1],), W.dtype)
  if family != "gru":
    return {"W": W, "U": U, "b": b_ih + b_hh}
  b = jnp.concatenate([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]])
  return {"W": W, "U": U, "b": b, "b_hn": b_hh[2 * H:]}


def _cell(family, H, activation, dtype):
  if family == "rnn":
    return rnn(H, activation, dtype=dtype)
  return (lstm if family == "lstm" else gru)(H, dtype=dtype)


def from_torch(module_or_state_dict, *, nonlinearity: str | None = None, prefix: str = ""):
  """A PyTorch ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` as bptt_jax cells and params.

  Every layer and direction is converted: ``W = weight_ih_l{k}.T``, ``U =
  weight_hh_l{k}.T``; RNN and LSTM ``b = bias_ih + bias_hh``; GRU ``b = (b_ir +
  b_hr, b_iz + b_hz, b_in)`` and ``b_hn = b_hn`` (zeros with ``bias=False``).
  ``batch_first`` only changes how PyTorch takes its inputs: bptt_jax takes
  ``[B, T, D]`` (or ``time_major=True``) either way.

  Args:
    module_or_state_dict: the module, or its ``state_dict()`` (torch tensors or
      any arrays; ``jnp`` arrays make the conversion differentiable, so
      ``jax.grad`` returns gradients in PyTorch's layout).
    nonlinearity: for a state dict of an ``nn.RNN``: ``"tanh"`` (PyTorch's
      default) or ``"relu"``, which the weights cannot tell. A module says it
      itself.
    prefix: for a state dict of a larger model, the prefix of the RNN's keys
      (e.g. ``"encoder.rnn."``); other keys are left alone.

  Returns:
    ``(cell, params)``: one layer, one direction: a cell and its params dict;
    ``num_layers > 1``: a :func:`bptt_jax.stack` and a tuple of params;
    ``bidirectional=True``: a tuple of ``(forward_cell, backward_cell)`` per
    layer and a matching tuple of params pairs, for
    :func:`bptt_jax.bidirectional_stack` (or, with one layer,
    ``bidirectional(*cells[0], params[0], xs)``).

  Raises:
    TypeError: neither an ``nn.RNN``/``nn.LSTM``/``nn.GRU`` nor a mapping.
    ValueError: ``proj_size > 0`` (an LSTM with projections: no bptt_jax
      equivalent), an unknown nonlinearity, keys that are not an RNN's, missing
      layers or directions, or weights of inconsistent shapes.

  Warns:
    UserWarning: a module with ``dropout > 0`` between layers: bptt_jax's stack
      has no dropout, so that training-time behaviour is not carried over.
  """
  family = act = None
  if isinstance(module_or_state_dict, Mapping):
    state = module_or_state_dict
    if nonlinearity is not None and nonlinearity not in ("tanh", "relu"):
      raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
  else:
    import torch

    module = module_or_state_dict
    if not isinstance(module, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)):
      raise TypeError(
          "expected a torch.nn.RNN, nn.LSTM or nn.GRU (or its state_dict()), got "
          f"{type(module).__name__}")
    if nonlinearity is not None:
      raise ValueError("nonlinearity= is for state dicts; a module gives its own")
    if getattr(module, "proj_size", 0):
      raise ValueError(
          f"nn.LSTM with proj_size={module.proj_size} has no bptt_jax equivalent "
          "(bptt_jax's LSTM has no projection of h)")
    family, act = _MODES[module.mode]
    if module.dropout and module.num_layers > 1:
      warnings.warn(
          f"{type(module).__name__}(dropout={module.dropout}) applies dropout between layers "
          "in training; bptt_jax's stack has none, so it is not carried over",
          UserWarning, stacklevel=2)
    state = module.state_dict()

  entries = {}
  for key, value in state.items():
    if not key.startswith(prefix):
      continue
    m = _KEY.fullmatch(key[len(prefix):])
    if m is None:
      raise ValueError(
          f"{key!r} is not a key of an nn.RNN/LSTM/GRU state dict (expected "
          "weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, ..._reverse); "
          "give prefix= to pick the RNN's keys out of a larger model")
    kind, which, layer, reverse = m.groups()
    if which == "hr":
      raise ValueError(
          f"{key!r}: an nn.LSTM with proj_size > 0 has no bptt_jax equivalent "
          "(bptt_jax's LSTM has no projection of h)")
    entries[(int(layer), bool(reverse), f"{kind}_{which}")] = _array(value)
  if not entries:
    raise ValueError(f"no nn.RNN/LSTM/GRU weights found (prefix={prefix!r})")

  num_layers = 1 + max(layer for layer, _, _ in entries)
  directions = 2 if any(rev for _, rev, _ in entries) else 1
  has_bias = (0, False, "bias_ih") in entries
  H = entries.get((0, False, "weight_hh"), jnp.zeros((0, 0))).shape[-1]
  layers = []
  for layer in range(num_layers):
    pairs = []
    for rev in ([False, True] if directions == 2 else [False]):
      names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_bias else [])
      missing = [f"{n}_l{layer}{'_reverse' if rev else ''}" for n in names
                 if (layer, rev, n) not in entries]
      if missing:
        raise ValueError(f"state dict is missing {missing} (prefix={prefix!r})")
      w_ih, w_hh = entries[(layer, rev, "weight_ih")], entries[(layer, rev, "weight_hh")]
      b_ih, b_hh = (entries[(layer, rev, "bias_ih")], entries[(layer, rev, "bias_hh")]) \
          if has_bias else (None, None)
      gates = w_hh.shape[0] // H if H else 0
      d_in = w_ih.shape[1] if w_ih.ndim == 2 else None
      d_expected = None if layer == 0 else H * directions
      shapes_ok = (
          gates in _GATES and w_hh.shape == (gates * H, H) and w_ih.ndim == 2
          and w_ih.shape[0] == gates * H and (d_expected is None or d_in == d_expected)
          and (b_ih is None or (b_ih.shape == b_hh.shape == (gates * H,))))
      if not shapes_ok:
        raise ValueError(
            f"layer {layer}{' reverse' if rev else ''}: weight_ih {tuple(w_ih.shape)}, "
            f"weight_hh {tuple(w_hh.shape)} do not make an RNN (G*H, D), (G*H, H) with "
            f"G in 1, 3, 4 and H = {H}"
            + ("" if d_expected is None else f", D = {d_expected}"))
      fam = _GATES[gates]
      if family is not None and fam != family:
        raise ValueError(f"the weights are a {fam}'s but the module is a {family}")
      cell = _cell(fam, H, act or nonlinearity or "tanh", w_ih.dtype)
      pairs.append((cell, _layer_params(fam, w_ih, w_hh, b_ih, b_hh)))
    layers.append(pairs)

  if directions == 2:
    return (tuple((f[0], b[0]) for f, b in layers),
            tuple((f[1], b[1]) for f, b in layers))
  if num_layers == 1:
    return layers[0][0]
  return stack(*(p[0][0] for p in layers)), tuple(p[0][1] for p in layers)
