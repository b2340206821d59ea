"""Tests for bptt_jax/_losses.py against numpy formulas."""

import jax
import numpy as np
import pytest
from cell_reference import DTYPES, F32, F64, assert_dtype, to_f64

import bptt_jax as bj

# float32: a loss sums a few terms of float32 rounding (eps 6e-8) each.
TOLS = {F32: dict(rtol=2e-6, atol=1e-6), F64: dict(rtol=1e-13, atol=1e-13)}
B, T, O = 3, 5, 4


def _rng(seed=0):
  return np.random.default_rng(seed)


def _normal(seed, size, dtype, scale=1.0):
  return (scale * _rng(seed).normal(size=size)).astype(dtype)


def _mask(lengths, num_steps):
  return np.arange(num_steps)[None, :] < np.asarray(lengths)[:, None]


@pytest.mark.parametrize("dtype", DTYPES)
def test_readout_and_init_readout(dtype):
  H = 3
  params = jax.jit(bj.init_readout, static_argnums=(1, 2, 3))(jax.random.key(0), H, O, dtype)
  assert params["W_hy"].shape == (H, O)
  assert_dtype(params, dtype)
  np.testing.assert_array_equal(params["b_y"], np.zeros(O))
  assert np.abs(params["W_hy"]).max() <= np.sqrt(6 / (H + O))  # Glorot uniform
  params = {"W_hy": _normal(1, (H, O), dtype), "b_y": _normal(2, O, dtype)}
  hs = _normal(3, (B, T, H), dtype)
  got = jax.jit(lambda p, hs: (bj.readout(p, hs), bj.readout(p, hs[:, -1])))(params, hs)
  assert_dtype(got, dtype)
  params, hs = to_f64((params, hs))
  want = np.einsum("bth,ho->bto", hs, params["W_hy"]) + params["b_y"]
  np.testing.assert_allclose(got[0], want, **TOLS[dtype])
  np.testing.assert_allclose(got[1], want[:, -1], **TOLS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_is_squared_error_summed_over_features(dtype):
  preds, targets = _normal(1, (B, T, O), dtype), _normal(2, (B, T, O), dtype)
  got = jax.jit(bj.mse)(preds, targets)
  assert got.dtype == dtype
  preds, targets = to_f64((preds, targets))
  want = np.array([[sum((preds[b, t, k] - targets[b, t, k]) ** 2 for k in range(O))
                    for t in range(T)] for b in range(B)])
  np.testing.assert_allclose(got, want, **TOLS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy(dtype):
  logits = _normal(1, (B, T, O), dtype, scale=10.0)
  labels = _rng(2).integers(0, O, size=(B, T))
  got = jax.jit(bj.softmax_cross_entropy)(logits, labels)
  assert got.dtype == dtype
  logits = to_f64(logits)
  want = np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      z = logits[b, t]
      want[b, t] = -(z[labels[b, t]] - z.max() - np.log(np.sum(np.exp(z - z.max()))))
  # float32: the logits reach 30; log-sum-exp is exact to eps times that.
  tol = {F32: dict(rtol=2e-6, atol=1e-5), F64: dict(rtol=1e-12, atol=1e-12)}[dtype]
  np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_binary_cross_entropy(dtype):
  logits = _normal(1, (B, T, O), dtype, scale=3.0)
  for labels in (_rng(2).integers(0, 2, size=(B, T, O)), _rng(3).uniform(size=(B, T, O))):
    labels = labels.astype(dtype)
    got = jax.jit(bj.sigmoid_binary_cross_entropy)(logits, labels)
    assert got.dtype == dtype
    x, y = to_f64((logits, labels))
    p = 1.0 / (1.0 + np.exp(-x))
    want = -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p), axis=-1)
    np.testing.assert_allclose(got, want, **{F32: TOLS[F32], F64: dict(rtol=1e-12)}[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_loss_sum_and_mean(dtype):
  losses = _rng(1).uniform(size=(B, T)).astype(dtype)
  lengths = np.array([5, 2, 0])
  mask = _rng(2).uniform(size=(B, T)) < 0.5

  @jax.jit
  def run(losses, lengths, mask):
    out = {}
    for reduction in ("sum", "mean"):
      out[reduction, "none"] = bj.sequence_loss(losses, reduction=reduction)
      out[reduction, "lengths"] = bj.sequence_loss(losses, lengths=lengths, reduction=reduction)
      out[reduction, "mask"] = bj.sequence_loss(losses, mask=mask, reduction=reduction)
    return out

  got = run(losses, lengths, mask)
  assert_dtype(got, dtype)
  losses = to_f64(losses)
  for name, m in (("none", np.ones((B, T), bool)), ("lengths", _mask(lengths, T)),
                  ("mask", mask)):
    total = sum(losses[b, t] for b in range(B) for t in range(T) if m[b, t])
    np.testing.assert_allclose(got["sum", name], total / B, **TOLS[dtype])
    np.testing.assert_allclose(got["mean", name], total / m.sum(), **TOLS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_loss_ignores_masked_nan_and_has_masked_gradient(dtype):
  lengths = np.array([5, 2, 0])
  m = _mask(lengths, T)
  losses = _rng(1).uniform(size=(B, T)).astype(dtype)
  losses[~m] = np.nan

  @jax.jit
  def run(losses):
    return {r: jax.value_and_grad(lambda l, r=r: bj.sequence_loss(l, lengths=lengths,
                                                                   reduction=r))(losses)
            for r in ("sum", "mean")}

  got = run(losses)
  assert_dtype(got, dtype)
  (s, ds), (mn, dmn) = got["sum"], got["mean"]
  losses = to_f64(losses)
  np.testing.assert_allclose(s, losses[m].sum() / B, **TOLS[dtype])
  np.testing.assert_allclose(mn, losses[m].mean(), **TOLS[dtype])
  np.testing.assert_allclose(ds, m / B, **TOLS[dtype])
  np.testing.assert_allclose(dmn, m / m.sum(), **TOLS[dtype])


def test_sequence_loss_all_masked_is_zero():
  losses = _rng(1).uniform(size=(B, T)).astype(F32)
  zero = np.zeros(B, int)
  got = jax.jit(lambda l: [jax.value_and_grad(
      lambda l, r=r: bj.sequence_loss(l, lengths=zero, reduction=r))(l)
                           for r in ("sum", "mean")])(losses)
  for value, grad in got:
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_last_step_indexes_each_sequence_end():
  hs = _normal(1, (B, T, 2, 3), F32)  # extra trailing axes
  lengths = np.array([5, 2, 0])
  got, got_full = jax.jit(lambda hs, n: (bj.last_step(hs, n), bj.last_step(hs)))(hs, lengths)
  want = np.stack([hs[0, 4], hs[1, 1], np.zeros((2, 3))])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_full, hs[:, T - 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_final_loss_averages_non_empty_sequences(dtype):
  losses = _rng(1).uniform(size=B).astype(dtype)
  got = jax.jit(lambda l, n: (bj.final_loss(l, n), bj.final_loss(l),
                              bj.final_loss(l, np.zeros(B, int))))(losses, np.array([4, 0, 1]))
  assert_dtype(got, dtype)
  losses = to_f64(losses)
  np.testing.assert_allclose(got[0], (losses[0] + losses[2]) / 2, **TOLS[dtype])
  np.testing.assert_allclose(got[1], losses.mean(), **TOLS[dtype])
  assert got[2] == 0.0


def _raises(exc, match, fn, *args):
  with pytest.raises(exc, match=match):
    jax.jit(fn)(*args)


def test_bad_inputs_raise():
  x = np.zeros((B, T, O), F32)
  _raises(ValueError, r"mse: preds and targets must have the same shape, got \(3, 5, 4\) and "
          r"\(3, 5, 3\)", bj.mse, x, x[..., :3])
  _raises(TypeError, "labels must be integer class ids, got dtype float32",
          bj.softmax_cross_entropy, x, np.zeros((B, T), F32))
  _raises(ValueError, r"logits \[..., C\] and labels \[...\] disagree: \(3, 5, 4\) vs \(3, 4\)",
          bj.softmax_cross_entropy, x, np.zeros((B, 4), int))
  _raises(ValueError, r"logits and labels must have the same shape, got \(3, 5, 4\) and "
          r"\(3, 5\)", bj.sigmoid_binary_cross_entropy, x, np.zeros((B, T)))
  params = {"W_hy": np.zeros((6, 2), F32), "b_y": np.zeros(2, F32)}
  _raises(ValueError, r"readout expects hidden states \[..., H\] with H = 6, got shape "
          r"\(3, 5, 4\)", bj.readout, params, x)
  losses = np.zeros((B, T), F32)
  _raises(ValueError, "reduction must be 'sum' or 'mean', got 'max'",
          lambda l: bj.sequence_loss(l, reduction="max"), losses)
  _raises(ValueError, "give lengths or mask, not both",
          lambda l: bj.sequence_loss(l, lengths=np.ones(B, int), mask=np.ones((B, T))), losses)
  _raises(ValueError, r"losses must be \[B, T\], got shape \(3, 5, 4\)", bj.sequence_loss, x)
  _raises(ValueError, r"mask must have shape \[B, T\] = \(3, 5\), got \(5, 3\)",
          lambda l: bj.sequence_loss(l, mask=np.ones((T, B))), losses)
  _raises(ValueError, r"lengths must lie in \[0, T\] = \[0, 5\], got values from 1 to 6",
          lambda l: bj.sequence_loss(l, lengths=np.array([1, 6, 2])), losses)
  _raises(TypeError, "lengths must be integers, got dtype float64",
          lambda h: bj.last_step(h, np.ones(B)), x)
  _raises(ValueError, r"hs must be \[B, T, ...\], got shape \(3,\)", bj.last_step, np.zeros(B))
  _raises(ValueError, r"losses must be \[B\], got shape \(3, 5\)", bj.final_loss, losses)
  with pytest.raises(ValueError, match="output_size must be a positive int, got 0"):
    jax.jit(lambda k: bj.init_readout(k, 4, 0))(jax.random.key(0))
