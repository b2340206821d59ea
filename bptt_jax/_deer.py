"""DEER and quasi-DEER: a nonlinear recurrence evaluated by Newton's method over the whole sequence.

The trajectory ``s_1 .. s_T`` of ``s_t = f(s_{t-1}, x_t)`` is the root of the
``T``-step system ``s_t - f(s_{t-1}, x_t) = 0``. Newton's method linearizes
``f`` around the current guess ``s^k`` and solves the resulting affine
recurrence exactly, for all steps at once:

    s^{k+1}_t = J_t s^{k+1}_{t-1} + (f(s^k_{t-1}, x_t) - J_t s^k_{t-1})
    J_t = df/ds (s^k_{t-1}, x_t)

The affine recurrence is evaluated by ``jax.lax.associative_scan`` (``O(log T)``
depth); ``f`` and its Jacobians are evaluated for all ``T * B`` rows in one
batched call, so the step's matmuls run over the whole sequence at once.

- DEER (Lim et al. 2024) uses the full ``[N, N]`` Jacobian per step:
  quadratic convergence, ``O(T B N^2)`` memory, and an ``O(N^3)`` matrix
  product at every node of the scan.
- quasi-DEER (Gonzalez et al. 2024) keeps only the diagonal of ``J_t``:
  ``O(T B N)`` memory and element-wise scans, at the cost of more iterations
  (linear rather than quadratic convergence). For the built-in RNN, GRU and
  LSTM (without layer norm) the diagonal is written out from the equations;
  other cells get it from per-step Jacobians computed in chunks.

Each iteration propagates the exact solution at least one more step, so both
reach the sequential trajectory in at most ``T`` iterations; in practice far
fewer for a contracting cell, and possibly none within the cap for a chaotic
one. The solve stops when the fixed-point residual ``max |s_t - f(s_{t-1}, x_t)|``
is at most ``tol`` or after ``max_iter`` iterations; if it did not converge
(or went non-finite), the sequential scan gives the trajectory instead
(``fallback="sequential"``, the default), or the last iterate is returned as it
is (``fallback="none"``, with ``DeerInfo.converged`` false).

Gradients are not taken through the iterations: at the converged trajectory
they are the BPTT adjoint,

    lambda_t = g_t + J_{t+1}^T lambda_{t+1}

(``g_t`` the loss's gradient with respect to ``s_t``), one more linear
recurrence, run backwards: DEER solves it in one reverse scan with the full
Jacobians; quasi-DEER solves it by the same diagonal quasi-Newton iteration
(each iteration one batched vector-Jacobian product over all rows and one
element-wise reverse scan), falling back to a sequential reverse scan if that
does not converge. The weight gradients are then one batched vector-Jacobian
product of ``f`` with ``lambda``.

References:
  Lim, Zhu, Selfridge and Kasim 2024, "Parallelizing non-linear sequential
  models over the sequence length" (DEER).
  Gonzalez, Warrington, Smith and Linderman 2024, "Towards Scalable and Stable
  Parallelization of Nonlinear RNNs" (quasi-DEER, ELK).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax._common import check_positive_int
from bptt_jax._linear_rnn import _solve

Array = jax.Array

FALLBACKS = ("sequential", "none")
_DIAGONAL_CHUNK = 256  # rows per batch when a diagonal comes from full Jacobians


class Deer(NamedTuple):
  """Settings of a DEER / quasi-DEER solve (``unroll(method=Deer(...))``).

  Attributes:
    quasi: keep only the Jacobians' diagonals (quasi-DEER).
    tol: stop when ``max |s_t - f(s_{t-1}, x_t)| <= tol``; ``None`` for
      ``100 * eps`` of the compute dtype (1.2e-5 in float32, 2.2e-14 in
      float64).
    max_iter: the cap on Newton iterations (and on the adjoint's quasi-Newton
      iterations).
    fallback: ``"sequential"``: when the solve does not converge, the
      sequential scan gives the trajectory (the gradient is then the adjoint at
      that exact trajectory); ``"none"``: return the last iterate as it is.
  """

  quasi: bool = False
  tol: float | None = None
  max_iter: int = 50
  fallback: str = "sequential"


class DeerInfo(NamedTuple):
  """What a DEER / quasi-DEER solve did (scalars; batched under ``vmap``).

  Attributes:
    iterations: Newton iterations taken (int32).
    residual: ``max |s_t - f(s_{t-1}, x_t)|`` of the iterate the solve ended on.
    converged: ``residual <= tol``.
    fell_back: the trajectory returned is the sequential scan's.
  """

  iterations: Array
  residual: Array
  converged: Array
  fell_back: Array


def as_deer(method) -> Deer:
  """``"deer"``, ``"quasi_deer"`` or a :class:`Deer`, checked."""
  if isinstance(method, Deer):
    deer = method
  elif method == "deer":
    deer = Deer()
  elif method == "quasi_deer":
    deer = Deer(quasi=True)
  else:
    raise ValueError(f"expected 'deer', 'quasi_deer' or a bptt_jax.Deer, got {method!r}")
  check_positive_int("max_iter", deer.max_iter)
  if deer.tol is not None and not (isinstance(deer.tol, (int, float)) and deer.tol > 0):
    raise ValueError(f"tol must be a positive number or None, got {deer.tol!r}")
  if deer.fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {FALLBACKS}, got {deer.fallback!r}")
  return deer


# ----------------------------------------------------------------------------
# The carry as one flat state per row.


class _Flat(NamedTuple):
  """How a carry (a PyTree of ``[B, ...]`` leaves) maps to rows ``[M, N]``."""

  treedef: object
  shapes: tuple  # each leaf's shape without its leading (row) axis

  def flatten(self, carry) -> Array:
    leaves = jax.tree_util.tree_leaves(carry)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=-1)

  def unflatten(self, s: Array):
    sizes = [int(np.prod(shape)) for shape in self.shapes]
    parts = jnp.split(s, np.cumsum(sizes)[:-1], axis=-1) if len(sizes) > 1 else [s]
    leaves = [p.reshape((s.shape[0],) + shape) for p, shape in zip(parts, self.shapes)]
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _flat_spec(carry) -> _Flat:
  leaves, treedef = jax.tree_util.tree_flatten(carry)
  return _Flat(treedef, tuple(tuple(leaf.shape[1:]) for leaf in leaves))


def _transition(cell, flat, params, s_prev, xs, mask):
  """``f`` on rows: ``s_prev`` ``[M, N]``, ``xs`` ``[M, D]``, ``mask`` ``[M]`` or ``None``."""
  new, _ = cell.step(params, flat.unflatten(s_prev), xs)
  s = flat.flatten(new)
  return s if mask is None else jnp.where(mask[:, None], s, s_prev)


# ----------------------------------------------------------------------------
# Jacobians.


def _sigmoid_prime(s):
  return s * (1.0 - s)


def _builtin_diagonal(cell, params, s_prev, xs):
  """``diag(df/ds)`` ``[M, N]`` of a built-in cell from its equations, or ``None``."""
  name = cell.name
  if (name not in ("rnn_tanh", "rnn_relu", "irnn", "gru", "gru_reset_before", "lstm")
      or "g_x" in params):
    return None
  W, U, b = params["W"], params["U"], params["b"]
  H = U.shape[0]
  U_diag = jnp.diagonal(U.reshape(H, -1, H), axis1=0, axis2=2)  # [G, H]: U_g[i, i]
  if name in ("rnn_tanh", "rnn_relu", "irnn"):
    z = xs @ W + b[None] + s_prev @ U
    fprime = 1.0 - jnp.tanh(z) ** 2 if name == "rnn_tanh" else (z > 0).astype(z.dtype)
    return fprime * U_diag[0][None]
  if name == "gru":
    a = xs @ W + b[None]
    u = s_prev @ U
    a_r, a_z, a_n = jnp.split(a, 3, axis=-1)
    u_r, u_z, u_n = jnp.split(u, 3, axis=-1)
    r = jax.nn.sigmoid(a_r + u_r)
    zg = jax.nn.sigmoid(a_z + u_z)
    un_b = u_n + params["b_hn"][None]
    n = jnp.tanh(a_n + r * un_b)
    dn = (1.0 - n ** 2) * (r * U_diag[2][None] + un_b * _sigmoid_prime(r) * U_diag[0][None])
    return zg + (s_prev - n) * _sigmoid_prime(zg) * U_diag[1][None] + (1.0 - zg) * dn
  if name == "gru_reset_before":
    # n_i = tanh(a_n_i + sum_k r_k h_k U_n[k, i]) and r_k depends on h_i through U_r[i, k],
    # so dn_i/dh_i = (1 - n_i^2) (r_i U_n[i, i] + sum_k U_r[i, k] U_n[k, i] h_k r_k').
    a = xs @ W + b[None]
    a_r, a_z, a_n = jnp.split(a, 3, axis=-1)
    U_r, U_z, U_n = jnp.split(U, 3, axis=-1)
    r = jax.nn.sigmoid(a_r + s_prev @ U_r)
    zg = jax.nn.sigmoid(a_z + s_prev @ U_z)
    n = jnp.tanh(a_n + (r * s_prev) @ U_n)
    through_r = (s_prev * _sigmoid_prime(r)) @ (U_n * U_r.T)  # [M, H]
    dn = (1.0 - n ** 2) * (r * U_diag[2][None] + through_r)
    return zg + (s_prev - n) * _sigmoid_prime(zg) * U_diag[1][None] + (1.0 - zg) * dn
  # LSTM, rows [h, c].
  h, c = s_prev[:, :H], s_prev[:, H:]
  zz = xs @ W + b[None] + h @ U
  i, f, g, o = jnp.split(zz, 4, axis=-1)
  si, sf, tg, so = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
  c_new = sf * c + si * tg
  tc = jnp.tanh(c_new)
  dc_dh = (c * _sigmoid_prime(sf) * U_diag[1][None] + tg * _sigmoid_prime(si) * U_diag[0][None]
           + si * (1.0 - tg ** 2) * U_diag[2][None])
  dh_dh = tc * _sigmoid_prime(so) * U_diag[3][None] + so * (1.0 - tc ** 2) * dc_dh
  return jnp.concatenate([dh_dh, sf], axis=-1)


def _row_jacobian(cell, flat, params):
  """``J(s [N], x [D]) -> [N, N]`` of one row (mask not applied)."""
  def row(s, x):
    return _transition(cell, flat, params, s[None], x[None], None)[0]
  return jax.jacfwd(row)


def _diagonal(cell, flat, params, s_prev, xs, mask):
  """``diag(df/ds)`` ``[M, N]``: 1 at masked rows."""
  d = _builtin_diagonal(cell, params, s_prev, xs)
  if d is None:
    jac = _row_jacobian(cell, flat, params)
    d = jax.lax.map(lambda sx: jnp.diagonal(jac(*sx)), (s_prev, xs),
                    batch_size=_DIAGONAL_CHUNK)
  return d if mask is None else jnp.where(mask[:, None], d, jnp.ones((), d.dtype))


def _jacobians(cell, flat, params, s_prev, xs, mask):
  """``df/ds`` ``[M, N, N]``: the identity at masked rows."""
  J = jax.vmap(_row_jacobian(cell, flat, params))(s_prev, xs)
  if mask is None:
    return J
  eye = jnp.eye(J.shape[-1], dtype=J.dtype)
  return jnp.where(mask[:, None, None], J, eye[None])


def _compose_matrices(first, second):
  A1, b1 = first
  A2, b2 = second
  return (jnp.einsum("...ij,...jk->...ik", A2, A1),
          jnp.einsum("...ij,...j->...i", A2, b1) + b2)


def _solve_matrices(A, b, *, reverse=False):
  """``s_t = A_t s_{t-1} + b_t`` from zero, ``A`` ``[T, B, N, N]``, by an associative scan."""
  return jax.lax.associative_scan(_compose_matrices, (A, b), reverse=reverse, axis=0)[1]


# ----------------------------------------------------------------------------
# The forward solve.


def _max_abs(a):
  """``max |a|``, ``inf`` if any entry is NaN (a max reduction may skip NaNs)."""
  d = jnp.abs(a)
  return jnp.max(jnp.where(jnp.isnan(d), jnp.inf, d))


def _shift(s0, states):
  """``[s0, s_1, ..., s_{T-1}]``: the state before each step."""
  return jnp.concatenate([s0[None], states[:-1]], axis=0)


def _rows(a):
  return a.reshape((-1,) + a.shape[2:])


def _sequential(cell, flat, params, xs, s0, mask):
  def body(s, inp):
    x_t, m_t = inp
    s = _transition(cell, flat, params, s, x_t, m_t)
    return s, s
  return jax.lax.scan(body, s0, (xs, mask))[1]


def _newton_solve(cell, flat, deer: Deer, tol, params, xs, s0, mask):
  """The trajectory ``[T, B, N]`` and a :class:`DeerInfo` (no gradients)."""
  T, B = xs.shape[:2]
  xs_r = _rows(xs)
  m_r = None if mask is None else mask.reshape(-1)

  def f_rows(s_prev):
    return _transition(cell, flat, params, _rows(s_prev), xs_r, m_r).reshape(s_prev.shape)

  def residual(states):
    return _max_abs(states - f_rows(_shift(s0, states)))

  def newton(states):
    s_prev = _shift(s0, states)
    fs = f_rows(s_prev)
    if deer.quasi:
      d = _diagonal(cell, flat, params, _rows(s_prev), xs_r, m_r).reshape(s_prev.shape)
      b = fs - d * s_prev
      b = jnp.concatenate([(b[0] + d[0] * s0)[None], b[1:]], axis=0)
      return _solve("parallel", d, b)
    J = _jacobians(cell, flat, params, _rows(s_prev), xs_r, m_r)
    J = J.reshape((T, B) + J.shape[1:])
    b = fs - jnp.einsum("tbij,tbj->tbi", J, s_prev)
    b = jnp.concatenate([(b[0] + jnp.einsum("bij,bj->bi", J[0], s0))[None], b[1:]], axis=0)
    return _solve_matrices(J, b)

  def cond(state):
    k, _, r = state
    return (k < deer.max_iter) & ~(r <= tol) & jnp.isfinite(r)

  def body(state):
    k, states, _ = state
    states = newton(states)
    return k + 1, states, residual(states)

  start = jnp.broadcast_to(s0[None], (T,) + s0.shape)
  k, states, r = jax.lax.while_loop(cond, body, (jnp.int32(0), start, residual(start)))
  converged = r <= tol
  fell_back = ~converged & (deer.fallback == "sequential")
  if deer.fallback == "sequential":
    states = jax.lax.cond(converged, lambda: states,
                          lambda: _sequential(cell, flat, params, xs, s0, mask))
  return states, DeerInfo(k, r, converged, fell_back)


# ----------------------------------------------------------------------------
# The gradient: the BPTT adjoint at the converged trajectory.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attach(cell, flat, deer, tol, params, xs, s0, mask, states):
  """``states`` (a solved trajectory), differentiable in ``params``, ``xs`` and ``s0``."""
  return states


def _attach_fwd(cell, flat, deer, tol, params, xs, s0, mask, states):
  return states, (params, xs, s0, mask, states)


def _attach_bwd(cell, flat, deer, tol, res, g):
  params, xs, s0, mask, states = res
  T, B = xs.shape[:2]
  s_prev = _shift(s0, states)
  m_r = None if mask is None else mask.reshape(-1)

  def f_all(p, sp, x):
    return _transition(cell, flat, p, _rows(sp), _rows(x), m_r).reshape(sp.shape)

  _, vjp = jax.vjp(f_all, params, s_prev, xs)

  def up(w):  # J_{t+1}^T lambda_{t+1} at t, from w_t = J_t^T lambda_t
    return jnp.concatenate([w[1:], jnp.zeros_like(w[:1])], axis=0)

  if deer.quasi:
    d = _diagonal(cell, flat, params, _rows(s_prev), _rows(xs), m_r).reshape(s_prev.shape)
    d_next = up(d)

    def adjoint_residual(lam):
      return _max_abs(lam - g - up(vjp(lam)[1]))

    scale = jnp.maximum(_max_abs(g), 1.0)

    def cond(state):
      k, _, r = state
      return (k < deer.max_iter) & ~(r <= tol * scale) & jnp.isfinite(r)

    def body(state):
      k, lam, _ = state
      w = up(vjp(lam)[1])
      lam = _solve("parallel", d_next, g + w - d_next * lam, reverse=True)
      return k + 1, lam, adjoint_residual(lam)

    start = _solve("parallel", d_next, g, reverse=True)
    _, lam, r = jax.lax.while_loop(cond, body, (jnp.int32(0), start, adjoint_residual(start)))

    def sequential_adjoint():
      def back(lam_next, inp):
        g_t, sp_next, x_next, m_next = inp
        _, step_vjp = jax.vjp(
            lambda s: _transition(cell, flat, params, s, x_next, m_next), sp_next)
        lam_t = g_t + step_vjp(lam_next)[0]
        return lam_t, lam_t

      # lambda_{T-1} = g_{T-1}; then back over t = T-2 .. 0 with step t+1's inputs.
      nxt = lambda a: None if a is None else a[1:]  # noqa: E731
      _, lams = jax.lax.scan(back, g[-1], (g[:-1], nxt(s_prev), nxt(xs), nxt(mask)),
                             reverse=True)
      return jnp.concatenate([lams, g[-1:]], axis=0)

    lam = jax.lax.cond(r <= tol * scale, lambda: lam, sequential_adjoint)
  else:
    J = _jacobians(cell, flat, params, _rows(s_prev), _rows(xs), m_r)
    J = J.reshape((T, B) + J.shape[1:])
    lam = _solve_matrices(up(jnp.swapaxes(J, -1, -2)), g, reverse=True)

  d_params, d_s_prev, d_xs = vjp(lam)
  return d_params, d_xs, d_s_prev[0], None, jnp.zeros_like(states)


_attach.defvjp(_attach_fwd, _attach_bwd)


def run(cell, deer: Deer, params, carry, inputs, mask):
  """``(carry, hs, info)`` of ``cell`` over time-major ``inputs`` ``[T, B, D]`` by (quasi-)DEER.

  ``mask`` is ``None`` or ``[T, B]`` booleans (masked inputs already zero);
  masked steps keep the carry and output zeros.
  """
  T, B = inputs.shape[:2]
  flat = _flat_spec(carry)
  s0 = flat.flatten(carry)
  tol = deer.tol if deer.tol is not None else 100 * float(jnp.finfo(s0.dtype).eps)
  if T == 0:
    info = DeerInfo(jnp.int32(0), jnp.zeros((), s0.dtype), jnp.bool_(True), jnp.bool_(False))
    x = jnp.zeros((B,) + inputs.shape[2:], inputs.dtype)
    h = jax.eval_shape(cell.step, params, carry, x)[1]
    return carry, jnp.zeros((0,) + h.shape, h.dtype), info
  sg = jax.lax.stop_gradient
  states, info = _newton_solve(cell, flat, deer, tol, sg(params), sg(inputs), sg(s0), mask)
  states = _attach(cell, flat, deer, tol, params, inputs, s0, mask, states)
  s_prev = _shift(s0, states)
  _, hs = cell.step(params, flat.unflatten(_rows(s_prev)), _rows(inputs))
  hs = hs.reshape((T, B) + hs.shape[1:])
  if mask is not None:
    hs = jnp.where(mask.reshape(mask.shape + (1,) * (hs.ndim - 2)), hs, jnp.zeros((), hs.dtype))
  return flat.unflatten(states[-1]), hs, info
