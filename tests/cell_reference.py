"""Reference cell equations and Python loops over time, written from the docstrings.

Nothing here calls bptt_jax's cell, unroll or loss code: the equations are typed
again from the factory docstrings, with ``xp`` either ``numpy`` (plain reference
values) or ``jax.numpy`` (to differentiate a reference with ``jax.grad``). Biases
are broadcast explicitly (``b[None]``) because the tests run with
``jax_numpy_rank_promotion="raise"``.

The references always compute in float64 numpy (``loop_unroll`` casts what it is
given), so a float32 run of the library is compared with the exact result of
its own float32 params and inputs.

Shapes: ``B`` batch, ``T`` time, ``D`` inputs, ``H`` hidden units.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import bptt_jax as bj

F32, F64 = np.float32, np.float64
LN_EPS = 1e-5

# The dtypes a numerical test runs in: float32, what users run, and float64
# (with jax_enable_x64 on), where the library agrees with the references to
# rounding. Use as ``@pytest.mark.parametrize("dtype", DTYPES)``.
DTYPES = [pytest.param(F32, id="float32"),
          pytest.param(F64, id="float64", marks=pytest.mark.float64)]

# Tolerances per dtype. Values (``VALUE_TOL``, element-wise): after a few
# steps float32 (eps 6e-8) is within about 5e-7 of the float64 result on the same
# rounded params and inputs, float64 within 1e-14. Gradients (``GRAD_TOL``, for
# ``assert_grads_close``): ``atol`` is relative to the largest entry of each
# leaf, since an entry that is a small sum of large terms (a weight gradient
# summed over steps and the batch) is only as exact as the largest entry; float32
# gradients measured within 3e-7 of that scale.
VALUE_TOL = {F32: dict(rtol=1e-5, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-12)}
GRAD_TOL = {F32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-10, atol=1e-12)}


def sigmoid(xp, a):
  return 1.0 / (1.0 + xp.exp(-a))


def layer_norm(xp, a, gain, bias):
  """LN over the last axis of ``a`` ``[B, N]`` (Ba et al. 2016), eps 1e-5."""
  mean = a.mean(axis=-1, keepdims=True)
  var = ((a - mean) ** 2).mean(axis=-1, keepdims=True)
  return (a - mean) / xp.sqrt(var + LN_EPS) * gain[None] + bias[None]


def _terms(xp, p, h, x, ln):
  """``x W`` and ``h U``, each layer-normalized when ``ln``."""
  xw, hu = x @ p["W"], h @ p["U"]
  if ln:
    xw = layer_norm(xp, xw, p["g_x"], p["beta_x"])
    hu = layer_norm(xp, hu, p["g_h"], p["beta_h"])
  return xw, hu


def rnn_step(xp, p, h, x, *, activation="tanh", ln=False):
  """``h_t = f(x_t W + h_{t-1} U + b)``; returns ``(carry, h_t)``."""
  xw, hu = _terms(xp, p, h, x, ln)
  a = xw + hu + p["b"][None]
  h = xp.tanh(a) if activation == "tanh" else xp.maximum(a, 0.0)
  return h, h


def lstm_step(xp, p, carry, x, *, ln=False):
  """Gates ``i, f, g, o``; ``c = σ(f) c + σ(i) tanh(g)``, ``h = σ(o) tanh(c)``."""
  h, c = carry
  H = h.shape[-1]
  xw, hu = _terms(xp, p, h, x, ln)
  z = xw + hu + p["b"][None]
  i, f, g, o = (z[:, k * H:(k + 1) * H] for k in range(4))
  c = sigmoid(xp, f) * c + sigmoid(xp, i) * xp.tanh(g)
  c_out = layer_norm(xp, c, p["g_c"], p["beta_c"]) if ln else c
  h = sigmoid(xp, o) * xp.tanh(c_out)
  return type(carry)(h, c), h  # keeps the container: a tuple or bj.LSTMState


def gru_step(xp, p, h, x, *, ln=False):
  """PyTorch GRU: ``n = tanh(a_n + r (h U_n + b_hn))``, ``h = (1 - z) n + z h``."""
  H = h.shape[-1]
  xw, hu = _terms(xp, p, h, x, ln)
  a = xw + p["b"][None]
  a_r, a_z, a_n = (a[:, k * H:(k + 1) * H] for k in range(3))
  u_r, u_z, u_n = (hu[:, k * H:(k + 1) * H] for k in range(3))
  r = sigmoid(xp, a_r + u_r)
  z = sigmoid(xp, a_z + u_z)
  n = xp.tanh(a_n + r * (u_n + p["b_hn"][None]))
  h = (1.0 - z) * n + z * h
  return h, h


def gru_reset_before_step(xp, p, h, x):
  """Cho et al. / Keras ``reset_after=False``: ``n = tanh(a_n + (r h) U_n)``, no ``b_hn``."""
  H = h.shape[-1]
  a = x @ p["W"] + p["b"][None]
  U_r, U_z, U_n = (p["U"][:, k * H:(k + 1) * H] for k in range(3))
  r = sigmoid(xp, a[:, :H] + h @ U_r)
  z = sigmoid(xp, a[:, H:2 * H] + h @ U_z)
  n = xp.tanh(a[:, 2 * H:] + (r * h) @ U_n)
  h = (1.0 - z) * n + z * h
  return h, h


def zeros_h(B, H):
  return np.zeros((B, H))


def zeros_hc(B, H):
  return bj.LSTMState(np.zeros((B, H)), np.zeros((B, H)))


class Spec:
  """A cell under test: its factory, reference step and reference zero carry."""

  def __init__(self, make, step, zeros):
    self.make, self.step, self.zeros = make, step, zeros


CELLS = {  # make(H, dtype) builds the cell with params in ``dtype``
    "rnn_tanh": Spec(lambda H, dtype=F64: bj.rnn(H, "tanh", dtype=dtype),
                     functools.partial(rnn_step, activation="tanh"), zeros_h),
    "rnn_relu": Spec(lambda H, dtype=F64: bj.rnn(H, "relu", dtype=dtype),
                     functools.partial(rnn_step, activation="relu"), zeros_h),
    "irnn": Spec(lambda H, dtype=F64: bj.irnn(H, input_std=0.5, dtype=dtype),
                 functools.partial(rnn_step, activation="relu"), zeros_h),
    "lstm": Spec(lambda H, dtype=F64: bj.lstm(H, dtype=dtype), lstm_step, zeros_hc),
    "gru": Spec(lambda H, dtype=F64: bj.gru(H, dtype=dtype), gru_step, zeros_h),
    "gru_reset_before": Spec(lambda H, dtype=F64: bj.gru(H, reset_after=False, dtype=dtype),
                             gru_reset_before_step, zeros_h),
    "rnn_tanh_ln": Spec(lambda H, dtype=F64: bj.rnn(H, "tanh", layer_norm=True, dtype=dtype),
                        functools.partial(rnn_step, activation="tanh", ln=True), zeros_h),
    "rnn_relu_ln": Spec(lambda H, dtype=F64: bj.rnn(H, "relu", layer_norm=True, dtype=dtype),
                        functools.partial(rnn_step, activation="relu", ln=True), zeros_h),
    "lstm_ln": Spec(lambda H, dtype=F64: bj.lstm(H, layer_norm=True, dtype=dtype),
                    functools.partial(lstm_step, ln=True), zeros_hc),
    "gru_ln": Spec(lambda H, dtype=F64: bj.gru(H, layer_norm=True, dtype=dtype),
                   functools.partial(gru_step, ln=True), zeros_h),
}
CELL_NAMES = list(CELLS)


def random_params(params, seed, scale=0.5):
  """Same structure as ``params``, every leaf redrawn (gains near 1), as numpy.

  Each leaf keeps its dtype: values are drawn in float64, then rounded.

  Redrawing every leaf (biases, gains, ``b_hn``) makes sure each one enters the
  equations where the docstring says. ``params`` may be ``jax.ShapeDtypeStruct``
  leaves (from ``jax.eval_shape(cell.init, ...)``): tests that redraw the params
  need not compile the initializers (the orthogonal one costs a QR compile).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    key = str(getattr(path[-1], "key", ""))
    noise = rng.normal(size=leaf.shape)
    value = 1.0 + 0.3 * noise if key.startswith("g_") else scale * noise
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, params)


def to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def cast(tree, dtype):
  """Every leaf of ``tree`` as a numpy array of ``dtype``."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), tree)


def to_f64(tree):
  """Every leaf as float64 numpy: what the references compute in."""
  return cast(tree, F64)


def assert_dtype(tree, dtype):
  """Every floating leaf of ``tree`` has ``dtype`` (counts and flags are left alone)."""
  dtypes = [np.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)]
  floats = [d for d in dtypes if np.issubdtype(d, np.floating)]
  assert floats and all(d == np.dtype(dtype) for d in floats), (np.dtype(dtype), dtypes)


def stack_step(*steps):
  """Reference for ``bj.stack``: layer ``l``'s output is layer ``l + 1``'s input."""

  def step(xp, params, carry, x):
    new = []
    for s, p, c in zip(steps, params, carry, strict=True):
      c, x = s(xp, p, c, x)
      new.append(c)
    return tuple(new), x

  return step


def take_rows(tree, b):
  """Row ``b`` of every leaf, keeping the batch axis: ``[B, ...] -> [1, ...]``."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[b:b + 1], tree)


def loop_unroll(step, params, xs, carry, H, *, lengths=None, reverse=False):
  """Python loop over sequences and time steps, in numpy.

  Sequence ``b`` is cut to its own length ``lengths[b]`` (reversed with numpy
  when ``reverse``) and stepped alone; its outputs are written back in the
  original order and left zero past its length.

  Everything is cast to float64 first.

  Args:
    step: ``step(xp, params, carry, x_t) -> (carry, h_t)``.
    params: numpy params.
    xs: ``[B, T, D]``.
    carry: initial carry, a pytree of ``[B, ...]`` arrays.
    H: output size.
    lengths: optional ``[B]``.
    reverse: read each sequence from its last valid step to step 0.

  Returns:
    ``(final_carry, hs [B, T, H])``, numpy.
  """
  xs, params, carry = to_f64((xs, params, carry))
  B, T = xs.shape[:2]
  lengths = [T] * B if lengths is None else [int(n) for n in lengths]
  hs = np.zeros((B, T, H))
  finals = []
  for b in range(B):
    c = take_rows(carry, b)
    order = range(lengths[b])
    if reverse:
      order = reversed(order)
    for t in order:
      c, h = step(np, params, c, xs[b:b + 1, t])
      hs[b, t] = h[0]
    finals.append(c)
  final = jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *finals)
  return final, hs


def assert_tree_allclose(actual, expected, **kwargs):
  """``np.testing.assert_allclose`` leaf by leaf (structures must match in length)."""
  a_leaves = jax.tree_util.tree_leaves(actual)
  e_leaves = jax.tree_util.tree_leaves(expected)
  assert len(a_leaves) == len(e_leaves), (len(a_leaves), len(e_leaves))
  for a, e in zip(a_leaves, e_leaves, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), **kwargs)


def assert_grads_close(actual, expected, *, rtol, atol):
  """Leaf by leaf, ``|a - e| <= rtol |e| + atol max|e|`` (the leaf's largest entry)."""
  a_leaves = jax.tree_util.tree_leaves(actual)
  e_leaves = jax.tree_util.tree_leaves(expected)
  assert len(a_leaves) == len(e_leaves), (len(a_leaves), len(e_leaves))
  for a, e in zip(a_leaves, e_leaves, strict=True):
    a, e = np.asarray(a, F64), np.asarray(e, F64)
    scale = float(np.abs(e).max()) if e.size else 0.0
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)


def run_sequence(xp, step, params, xs, carry):
  """Python loop over the time axis of ``xs`` ``[B, L, D]`` (no padding, no jit).

  With ``xp=jax.numpy`` it can be differentiated with ``jax.grad`` eagerly.

  Returns:
    ``(final_carry, [h_0, ..., h_{L-1}])`` with each ``h_t`` ``[B, H]``.
  """
  hs = []
  for t in range(xs.shape[1]):
    carry, h = step(xp, params, carry, xs[:, t])
    hs.append(h)
  return carry, hs


def numerical_grad(f, tree, eps=1e-6):
  """Central differences, in numpy float64, of a scalar ``f(tree)`` w.r.t. every entry.

  Each entry ``x`` of each leaf is moved to ``x +- eps`` in turn; the result has
  the structure of ``tree``. Truncation error O(eps^2), rounding O(1e-16 / eps):
  compare with tolerances around 1e-7.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  leaves = [np.array(leaf, dtype=np.float64) for leaf in leaves]
  grads = []
  for leaf in leaves:
    g = np.zeros_like(leaf)
    for idx in np.ndindex(leaf.shape):
      x = leaf[idx]
      leaf[idx] = x + eps
      up = f(jax.tree_util.tree_unflatten(treedef, leaves))
      leaf[idx] = x - eps
      down = f(jax.tree_util.tree_unflatten(treedef, leaves))
      leaf[idx] = x
      g[idx] = (up - down) / (2 * eps)
    grads.append(g)
  return jax.tree_util.tree_unflatten(treedef, grads)
