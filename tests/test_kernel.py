"""Tests for bptt_jax/_kernel.py: oneDNN's sequence kernels and the written-out LSTM kernel.

References: the pure-JAX fused path (hand-written backward), autodiff through
``lax.scan`` (``fused=False``), and PyTorch's own nn.RNN/LSTM/GRU with the
same weights. Everything in float32, the dtype the kernels run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj
from bptt_jax import _kernel

LIBRARY, WHY = _kernel._library()
# the defaults, before the fixture below lowers them
DEFAULT_MIN_BATCH = dict(_kernel.MIN_BATCH)
DEFAULT_PARALLEL = (_kernel.PARALLEL_MIN_STEP_FLOPS, _kernel.PARALLEL_MIN_CALL_FLOPS)
needs_kernels = pytest.mark.skipif(
    LIBRARY is None, reason=f"the CPU kernels are not available here: {WHY}")


@pytest.fixture(autouse=True)
def all_kernels(monkeypatch):
  """Every kernel family on (the default leaves "rnn" off) at every batch size (the
  default sends small batches to the JAX path); tests turn them off where they say."""
  monkeypatch.setattr(_kernel, "MIN_BATCH", dict.fromkeys(_kernel.MIN_BATCH, 1))
  # and split over the threads however small (the default runs small calls on one)
  monkeypatch.setattr(_kernel, "PARALLEL_MIN_STEP_FLOPS", 0)
  monkeypatch.setattr(_kernel, "PARALLEL_MIN_CALL_FLOPS", 0)
  with bj.use_kernels(True):
    yield

CELLS = {"rnn_tanh": lambda H: bj.rnn(H, "tanh"), "rnn_relu": lambda H: bj.rnn(H, "relu"),
         "lstm": bj.lstm, "gru": bj.gru}
# (cell, kernel family): every kernel that runs a cell, each on its own.
KERNELS = [(name, family) for name in CELLS for family in ("fused", "rnn")]
TARGETS = {"rnn": "bptt_rnn_forward", "fused": "bptt_fused_forward"}
SHAPES = [(1, 1, 2, 3), (3, 6, 4, 17), (1, 9, 1, 13), (2, 5, 16, 32)]  # B, T, D, H
# Shapes for the written-out kernel's blocks: one block (H < 16), two even and uneven;
# for its backward pass's chunks of steps (256 // B steps each): B = 40 makes chunks
# of 6 steps, T = 13 three of them, the last a single step; and for the forward step's
# product over K = D + H in passes of 256 rows: H = 264 makes two, and two for the
# GRU's recurrent side alone (rows D to D + H).
FUSED_SHAPES = [(5, 7, 3, 16), (2, 4, 6, 41), (17, 3, 2, 64), (40, 13, 3, 24), (3, 3, 8, 264)]
TOL = dict(rtol=2e-5, atol=2e-6)


def _setup(name, B, T, D, H, seed=0):
  cell = CELLS[name](H)
  keys = jax.random.split(jax.random.key(seed), 6)
  params = cell.init(keys[0], D)
  # Biases (and b_hn) away from zero, so every term of the gradient is exercised.
  params = {k: v + 0.2 * jax.random.normal(keys[1], v.shape) if k.startswith("b") else v
            for k, v in params.items()}
  xs = jax.random.normal(keys[2], (B, T, D))
  leaves, tree = jax.tree_util.tree_flatten(cell.initial_carry(B))
  carry = jax.tree_util.tree_unflatten(tree, [
      0.5 * jax.random.normal(k, leaf.shape)
      for k, leaf in zip(jax.random.split(keys[3], len(leaves)), leaves)])
  cot = jax.random.normal(keys[4], (B, T, H))
  return cell, params, xs, carry, cot


def _loss(cell, **kwargs):
  def loss(params, xs, carry, cot):
    final, hs = bj.unroll(cell, params, xs, carry=carry, **kwargs)
    tail = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(final))
    return jnp.sum(hs * cot) + tail, (final, hs)
  return loss


def _run(loss, *args):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)


def _close(actual, expected):
  flat_a, tree_a = jax.tree_util.tree_flatten(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten(expected)
  assert tree_a == tree_e
  for a, e in zip(flat_a, flat_e):
    # A gradient summed over steps and rows is only as exact as its largest entry.
    scale = max(1.0, float(np.abs(np.asarray(e)).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=TOL["rtol"],
                               atol=TOL["atol"] * scale)


def _uses_kernel(fn, *args, family=None) -> bool:
  text = str(jax.make_jaxpr(fn)(*args))
  targets = [TARGETS[family]] if family else list(TARGETS.values())
  return any(t in text for t in targets)


def _case(name, family, shape, time_major=False):
  return pytest.param(name, family, shape, time_major,
                      id="{}-{}-B{}T{}D{}H{}".format(name, family, *shape)
                      + ("-time_major" if time_major else ""))


def _cases(shapes):
  # The written-out kernels read batch-major sequences in place and time-major ones
  # (time_major=True) as they come: both layouts.
  return ([_case(name, family, shape) for name, family in KERNELS for shape in shapes]
          + [_case(name, "fused", shape, True) for name in CELLS for shape in shapes[1:3]]
          + [_case(name, "fused", shape) for name in CELLS for shape in FUSED_SHAPES]
          + [_case(name, "fused", shape, True) for name in CELLS
             for shape in (FUSED_SHAPES[1], FUSED_SHAPES[3])])


@needs_kernels
@pytest.mark.parametrize("name,family,shape,time_major", _cases(SHAPES))
def test_values_and_gradients_equal_the_jax_paths(name, family, shape, time_major):
  cell, params, xs, carry, cot = _setup(name, *shape)
  if time_major:
    xs, cot = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(cot, 0, 1)
  loss = _loss(cell, time_major=time_major)
  with bj.use_kernels(family):
    assert _uses_kernel(jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2)), params, xs, carry,
                        cot, family=family)
    if family == "fused" and not time_major:  # [B, T, .] in and out, where they lie
      assert "transpose" not in str(jax.make_jaxpr(lambda *a: loss(*a)[0])(params, xs, carry,
                                                                         cot))
    kernel = _run(loss, params, xs, carry, cot)
  with bj.use_kernels(False):
    assert not _uses_kernel(lambda *a: loss(*a)[0], params, xs, carry, cot)
    fused = _run(loss, params, xs, carry, cot)
  autodiff = _run(_loss(cell, fused=False, time_major=time_major), params, xs, carry, cot)
  _close(kernel, fused)
  _close(kernel, autodiff)


@needs_kernels
@pytest.mark.parametrize("name,family", KERNELS)
@pytest.mark.parametrize("uses", ["hs", "final"])
def test_gradients_of_the_weights_alone_equal_autodiff(name, family, uses):
  # xs is data (not differentiated), and the loss reads hs only or the final state only:
  # the written-out kernels then skip dxs's GEMM and take the unused cotangent as zero.
  cell, params, xs, carry, cot = _setup(name, 3, 6, 5, 41, seed=2)

  def loss(params, carry, **kwargs):
    final, hs = bj.unroll(cell, params, xs, carry=carry, **kwargs)
    if uses == "hs":
      return jnp.sum(hs * cot)
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(final))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  with bj.use_kernels(family):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, carry).as_text()
    assert TARGETS[family].replace("forward", "backward") in hlo
    kernel = grad(params, carry)
  expected = jax.jit(jax.grad(lambda p, c: loss(p, c, fused=False), argnums=(0, 1)))(
      params, carry)
  _close(kernel, expected)
  if family == "fused":  # the call's first result, dxs, is empty: it computes none
    results = hlo.split("bptt_fused_backward")[1].split("\n")[0].split("-> (")[1]
    assert results.startswith("tensor<0xf32>, tensor<3x41xf32>"), results


@needs_kernels
@pytest.mark.parametrize("name,family", KERNELS)
@pytest.mark.parametrize("shape", [(3, 11, 4, 9), (2, 7, 5, 41), (1, 1, 3, 17)])
def test_forward_only_equals_autodiff_path(name, family, shape):
  # Inference saves nothing for a backward pass (the LSTM's cell states in two slots):
  # one block of units, uneven blocks, and a single step.
  cell, params, xs, carry, _ = _setup(name, *shape, seed=1)
  run = lambda p, x, c, **kw: bj.unroll(cell, p, x, carry=c, **kw)  # noqa: E731
  with bj.use_kernels(family):
    assert _uses_kernel(run, params, xs, carry, family=family)
    _close(jax.jit(run)(params, xs, carry),
           jax.jit(lambda p, x, c: run(p, x, c, fused=False))(params, xs, carry))
    _close(run(params, xs, carry), jax.jit(run)(params, xs, carry))  # eager too


def _torch():
  return pytest.importorskip(
      "torch", reason="PyTorch is not installed (pip install -e '.[dev]' brings torch==2.13.0)")


@needs_kernels
@pytest.mark.parametrize("name,family", KERNELS)
def test_equals_pytorch(name, family):
  torch = _torch()
  B, T, D, H = 3, 8, 5, 19
  torch.manual_seed(0)
  module = {"rnn_tanh": lambda: torch.nn.RNN(D, H, nonlinearity="tanh", batch_first=True),
            "rnn_relu": lambda: torch.nn.RNN(D, H, nonlinearity="relu", batch_first=True),
            "lstm": lambda: torch.nn.LSTM(D, H, batch_first=True),
            "gru": lambda: torch.nn.GRU(D, H, batch_first=True)}[name]()
  with torch.no_grad():
    for p in module.parameters():
      p.uniform_(-0.5, 0.5)
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((B, T, D)).astype(np.float32)
  cot = rng.standard_normal((B, T, H)).astype(np.float32)
  x = torch.tensor(xs, requires_grad=True)
  out, _ = module(x)
  (out * torch.tensor(cot)).sum().backward()
  state = {k: jnp.asarray(v.detach().numpy()) for k, v in module.state_dict().items()}
  nonlinearity = name[4:] if name.startswith("rnn") else None

  def loss(state, xs):
    cell, params = bj.from_torch(state, nonlinearity=nonlinearity)
    _, hs = bj.unroll(cell, params, xs)
    return jnp.sum(hs * cot), hs

  with bj.use_kernels(family):
    assert _uses_kernel(lambda s, x: loss(s, x)[0], state, xs, family=family)
    (_, hs), (d_state, d_xs) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        state, jnp.asarray(xs))
  np.testing.assert_allclose(hs, out.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_xs, x.grad.numpy(), rtol=1e-5, atol=1e-5)
  for k, p in module.named_parameters():
    np.testing.assert_allclose(d_state[k], p.grad.numpy(), rtol=1e-5, atol=1e-5, err_msg=k)


@needs_kernels
def test_fused_lstm_saturates_and_carries_nan_like_the_jax_path():
  """Pre-activations of +-100 (the kernel's own exp, sigmoid and tanh saturate without
  overflow) and a NaN input (it reaches the same outputs and gradients as on the JAX
  path, so NaN-safe training steps see it)."""
  cell, params, xs, carry, cot = _setup("lstm", 3, 6, 4, 24)
  loss = _loss(cell)
  big = 40.0 * xs
  with bj.use_kernels("fused"):
    kernel = _run(loss, params, big, carry, cot)
  with bj.use_kernels(False):
    reference = _run(loss, params, big, carry, cot)
  for got, want in zip(jax.tree_util.tree_leaves(kernel), jax.tree_util.tree_leaves(reference)):
    # Saturated gates make 1 - sigmoid a difference of nearly equal numbers: compare each
    # array at the scale of its largest entry.
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  nan_xs = xs.at[1, 2, 0].set(jnp.nan)
  with bj.use_kernels("fused"):
    (_, (_, hs)), grads = _run(loss, params, nan_xs, carry, cot)
  with bj.use_kernels(False):
    (_, (_, ref_hs)), ref_grads = _run(loss, params, nan_xs, carry, cot)
  np.testing.assert_array_equal(np.isnan(hs), np.isnan(ref_hs))
  assert np.isnan(np.asarray(hs)[1, 2:]).all() and not np.isnan(np.asarray(hs)[0]).any()
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@needs_kernels
@pytest.mark.float64
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_fused_cells_keep_float32_precision_near_zero(name):
  """Pre-activations near zero (about 1e-3, from zero states), where tanh(a) is about a:
  the kernel's hs is the float64 JAX path's to a relative 1e-5. A tanh by 1 - 2 / (e^2a + 1)
  alone would be off by about 1e-7 absolute there, a hundred times that. B = 17: a full
  16-float vector of the batch and a masked one."""
  cell, params, xs, carry, _ = _setup(name, 17, 6, 3, 24)
  to = lambda dtype: lambda a: jnp.asarray(a, dtype)  # noqa: E731
  params32 = jax.tree_util.tree_map(lambda a: 1e-3 * to(jnp.float32)(a), params)
  xs32 = to(jnp.float32)(xs)
  carry32 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), carry)

  def hs_of(p, x, c):
    return bj.unroll(cell, p, x, carry=c)[1]

  with bj.use_kernels("fused"):
    assert _uses_kernel(hs_of, params32, xs32, carry32, family="fused")
    got = np.asarray(jax.jit(hs_of)(params32, xs32, carry32))
  f64 = jax.tree_util.tree_map(to(jnp.float64), (params32, xs32, carry32))
  want = np.asarray(jax.jit(hs_of)(*f64))
  assert want.dtype == np.float64 and 1e-5 < np.median(np.abs(want)) < 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


@needs_kernels
def test_vmap_runs_each_sequence():
  cell, params, _, _, _ = _setup("lstm", 2, 5, 3, 6)
  xs = jax.random.normal(jax.random.key(7), (3, 2, 5, 3))  # 3 batches of [B, T, D]

  def f(p, x):
    return jnp.sum(bj.unroll(cell, p, x)[1] ** 2)

  batched = jax.jit(jax.vmap(jax.value_and_grad(f), in_axes=(None, 0)))(params, xs)
  with bj.use_kernels(False):
    one_by_one = [jax.value_and_grad(f)(params, x) for x in xs]
  _close(batched, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *one_by_one))


@needs_kernels
@pytest.mark.parametrize("name,family", KERNELS)
def test_second_derivatives_equal_autodiff(name, family):
  # Reverse over reverse (a Hessian-vector product in the weights, the inputs and the
  # starting carry): the kernels give the first derivatives, and the JAX computation
  # they stand for the second.
  cell, params, xs, carry, cot = _setup(name, 2, 5, 3, 17, seed=3)
  loss = lambda *a, **kw: _loss(cell, **kw)(*a)[0]  # noqa: E731
  args = (params, xs, carry)
  leaves, tree = jax.tree_util.tree_flatten(args)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  v = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, a.shape)
                                          for k, a in zip(keys, leaves)])

  def hvp(**kw):
    def directional(params, xs, carry):
      g = jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry, cot, **kw)
      return sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g),
                                               jax.tree_util.tree_leaves(v)))
    return jax.jit(jax.grad(directional, argnums=(0, 1, 2)))

  with bj.use_kernels(family):
    assert _uses_kernel(hvp(), *args, family=family)
    kernel = hvp()(*args)
  _close(kernel, hvp(fused=False)(*args))


def _padded(name, B, T, D, H, time_major, seed=5):
  """A batch padded past random lengths (0 and T among them) with NaN, its lengths, and
  the same batch padded with zeros."""
  cell, params, xs, carry, cot = _setup(name, B, T, D, H, seed=seed)
  rng = np.random.default_rng(seed)
  lengths = np.r_[0, T, rng.integers(1, T, B - 2)].astype(np.int32)
  pad = np.arange(T)[None, :, None] >= lengths[:, None, None]  # [B, T, 1]
  nan_padded = jnp.where(pad, jnp.nan, xs)
  zero_padded = jnp.where(pad, 0.0, xs)
  if time_major:
    nan_padded, zero_padded, cot = (jnp.swapaxes(a, 0, 1) for a in (nan_padded, zero_padded, cot))
  return cell, params, nan_padded, zero_padded, jnp.asarray(lengths), carry, cot


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("time_major,reverse,shape", [
    (False, False, (4, 9, 3, 17)), (False, False, (6, 5, 2, 41)), (True, False, (4, 9, 3, 17)),
    (False, True, (4, 9, 3, 17)), (True, True, (6, 5, 2, 41)), (False, False, (40, 13, 3, 24))])
def test_lengths_equal_the_jax_paths(name, time_major, reverse, shape):
  # Padded batches: past each sequence's end the states stay, the outputs are zero and
  # the padding (NaN here) reaches nothing; the written-out kernels take the lengths.
  cell, params, xs, zero_padded, lengths, carry, cot = _padded(name, *shape, time_major)
  loss = _loss(cell, lengths=lengths, time_major=time_major, reverse=reverse)
  with bj.use_kernels("fused"):
    assert _uses_kernel(jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2)), params, xs, carry,
                        cot, family="fused")
    kernel = _run(loss, params, xs, carry, cot)
    zeros = _run(loss, params, zero_padded, carry, cot)
  with bj.use_kernels(False):
    fused = _run(loss, params, xs, carry, cot)
  _close(kernel, fused)
  if not (time_major or reverse):  # autodiff too, once per cell and shape
    _close(kernel, _run(_loss(cell, lengths=lengths, fused=False), params, xs, carry, cot))
  for a, b in zip(jax.tree_util.tree_leaves(kernel), jax.tree_util.tree_leaves(zeros)):
    np.testing.assert_array_equal(a, b)  # NaN padding: bit for bit zero padding's
  d_xs = np.asarray(kernel[1][1])
  pad = np.arange(shape[1])[None, :] >= np.asarray(lengths)[:, None]  # [B, T]
  np.testing.assert_array_equal(d_xs[pad.T if time_major else pad], 0.0)
  hs = np.asarray(kernel[0][1][1])
  np.testing.assert_array_equal(hs[pad.T if time_major else pad], 0.0)


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_lengths_in_inference_and_final_carry_only(name):
  # Inference (nothing saved; the LSTM's cell states in two slots) with ended sequences,
  # and the gradient of the final carry alone (no dhs read, no dxs computed).
  cell, params, xs, _, lengths, carry, _ = _padded(name, 5, 8, 3, 41, False, seed=7)
  run = lambda p, c, **kw: bj.unroll(cell, p, xs, carry=c, lengths=lengths, **kw)  # noqa: E731

  def final(p, c, **kw):
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(run(p, c, **kw)[0]))

  with bj.use_kernels("fused"):
    assert _uses_kernel(run, params, carry, family="fused")
    kernel = jax.jit(run)(params, carry), jax.jit(jax.grad(final, argnums=(0, 1)))(params, carry)
  with bj.use_kernels(False):
    jax_path = jax.jit(run)(params, carry), jax.jit(jax.grad(final, argnums=(0, 1)))(params, carry)
  _close(kernel, jax_path)


@needs_kernels
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_relu"])
def test_kernel_gives_no_input_gradient_past_the_lengths(name):
  # The kernel's own dxs (unroll's selection around it would zero any value there).
  cell, params, _, xs, lengths, carry, cot = _padded(name, 4, 6, 3, 17, False, seed=8)
  with bj.use_kernels("fused"):
    hs, vjp = jax.vjp(lambda x: _kernel.sequence(name, params, x, carry, batch_major=True,
                                                 lengths=lengths)[1], xs)
    (d_xs,) = vjp(cot)
  pad = np.arange(6)[None, :] >= np.asarray(lengths)[:, None]
  np.testing.assert_array_equal(np.asarray(d_xs)[pad], 0.0)
  np.testing.assert_array_equal(np.asarray(hs)[pad], 0.0)
  assert np.all(np.any(np.asarray(d_xs)[~pad] != 0.0, axis=-1))  # live steps do get one


@needs_kernels
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_second_derivatives_with_lengths_equal_autodiff(name):
  cell, params, xs, _, lengths, carry, cot = _padded(name, 4, 6, 3, 9, False, seed=6)
  loss = lambda *a, **kw: _loss(cell, lengths=lengths, **kw)(*a)[0]  # noqa: E731

  def hvp(**kw):
    def directional(params, carry):
      g = jax.grad(loss, argnums=(0, 2))(params, xs, carry, cot, **kw)
      return sum(jnp.sum(jnp.sin(a)) for a in jax.tree_util.tree_leaves(g))
    return jax.jit(jax.grad(directional, argnums=(0, 1)))

  with bj.use_kernels("fused"):
    assert _uses_kernel(hvp(), params, carry, family="fused")
    kernel = hvp()(params, carry)
  _close(kernel, hvp(fused=False)(params, carry))


@needs_kernels
def test_onednn_calls_refuse_batch_major_sequences():
  # unroll gives the oneDNN family time-major sequences only; a call that says otherwise
  # is refused by the handler rather than read in the wrong layout.
  W, U, b = jnp.ones((3, 8)), jnp.ones((8, 8)), jnp.ones((8,))
  xs, h0, c0 = jnp.ones((2, 5, 3)), jnp.ones((2, 8)), jnp.zeros((0,))
  with pytest.raises(Exception, match="time-major"):
    jax.block_until_ready(_kernel._forward(("bptt_rnn", 0, True), False, W, U, b, xs, h0, c0,
                                           jnp.zeros((0,), jnp.int32)))


@needs_kernels
def test_forward_mode_is_refused_as_for_any_custom_vjp():
  cell, params, xs, _, _ = _setup("lstm", 2, 4, 3, 5)
  f = lambda p: jnp.sum(bj.unroll(cell, p, xs)[1] ** 2)  # noqa: E731
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(f, (params,), (params,))


@needs_kernels
@pytest.mark.parametrize("case", ["mask", "layer_norm", "bfloat16", "fused_false", "hoist",
                                  "remat", "onednn_lengths"])
def test_kernel_applies_only_where_it_can(case):
  B, T, D, H = 3, 6, 4, 8
  cell = bj.lstm(H, layer_norm=case == "layer_norm")
  params = cell.init(jax.random.key(0), D)
  xs = jax.random.normal(jax.random.key(1), (B, T, D))
  kwargs = {"mask": dict(mask=jnp.broadcast_to(jnp.arange(T) % 2 == 0, (B, T))),
            "layer_norm": {}, "bfloat16": dict(dtype=jnp.bfloat16),
            "fused_false": dict(fused=False), "hoist": dict(fused=False, hoist=True),
            "remat": dict(remat=2), "onednn_lengths": dict(lengths=jnp.array([6, 2, 4]))}[case]
  if case == "onednn_lengths":  # oneDNN's kernels take no lengths: the JAX path runs
    with bj.use_kernels("rnn"):
      assert not _uses_kernel(lambda p, x: bj.unroll(cell, p, x, **kwargs)[1], params, xs)
    return
  assert not _uses_kernel(lambda p, x: bj.unroll(cell, p, x, **kwargs)[1], params, xs)


def test_switches_and_status(monkeypatch):
  for bad in ("no", ["rnn", "lstm"], [], 3, "linear_scan"):
    with pytest.raises(TypeError, match="True, False or kernel names"):
      bj.use_kernels(bad)
  with bj.use_kernels(False):
    off = bj.kernels()
    assert (off.active, off.enabled) == (False, ())
    assert off.reason.startswith("off:") and "use_kernels(True)" in off.reason
    with bj.use_kernels("rnn"):
      assert _kernel._enabled() == ("rnn",)
    assert _kernel._enabled() == ()
  assert _kernel._enabled() == ("fused", "rnn")  # the fixture's setting, restored
  with bj.use_kernels(["rnn"]):
    assert _kernel._enabled() == ("rnn",)
  # Without a call, the environment decides, else the default.
  monkeypatch.setattr(_kernel, "_setting", [None])
  monkeypatch.delenv("BPTT_JAX_KERNELS", raising=False)
  assert _kernel._enabled() == _kernel.DEFAULT
  assert _kernel.DEFAULT == ("fused",)  # the written-out kernels, unless turned off
  for env, expected in (("0", ()), ("all", ("fused", "rnn")), ("rnn", ("rnn",)),
                        ("rnn,fused", ("fused", "rnn")), (" rnn ,", None)):
    if expected is None:  # an empty name in the list
      monkeypatch.setenv("BPTT_JAX_KERNELS", env)
      with pytest.raises(TypeError, match="BPTT_JAX_KERNELS"):
        _kernel._enabled()
      continue
    monkeypatch.setenv("BPTT_JAX_KERNELS", env)
    assert _kernel._enabled() == expected, env
  monkeypatch.setenv("BPTT_JAX_KERNELS", "fast")
  with pytest.raises(TypeError, match="BPTT_JAX_KERNELS"):
    _kernel._enabled()
  monkeypatch.setenv("BPTT_JAX_KERNELS", "0")
  assert not _kernel.usable("lstm", {"W": 0, "U": 0, "b": 0}, jnp.zeros((1, 1, 1)), None, None)


@needs_kernels
def test_status_describes_the_library():
  status = bj.kernels()
  assert status.active and status.enabled == ("fused", "rnn")
  assert status.onednn_version.count(".") == 2
  assert status.threads >= 1
  assert status.library.endswith(".so")


def test_missing_extension_falls_back_to_jax(monkeypatch):
  """Simulates an extension that could not be built: same results on the JAX path."""
  cell, params, xs, carry, cot = _setup("gru", 3, 5, 4, 7)
  loss = _loss(cell)
  expected = _run(_loss(cell, fused=False), params, xs, carry, cot)
  monkeypatch.setattr(_kernel, "_loaded", [(None, "simulated: the extension is absent")])
  status = bj.kernels()
  assert (status.active, status.enabled, status.reason) == (
      False, (), "simulated: the extension is absent")
  assert not _uses_kernel(lambda *a: loss(*a)[0], params, xs, carry, cot)
  _close(_run(loss, params, xs, carry, cot), expected)


def test_build_without_onednn_says_so(monkeypatch, tmp_path):
  monkeypatch.setenv("BPTT_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(_kernel, "_find_onednn", lambda: None)
  path, reason = _kernel._build()
  assert path is None and "oneDNN was not found" in reason


@pytest.mark.skipif(_kernel._find_onednn() is None, reason="oneDNN is not installed")
def test_failed_build_says_so_and_leaves_nothing(monkeypatch, tmp_path):
  monkeypatch.setenv("BPTT_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  path, reason = _kernel._build()
  assert path is None and "building the oneDNN kernels failed" in reason
  assert list(tmp_path.glob("*.so")) == []  # nothing half-written is left to load


KEPT_SETS_SCRIPT = """
import threading
import jax, jax.numpy as jnp
import bptt_jax as bj
from bptt_jax import _kernel

bj.use_kernels("fused")
cell = bj.lstm(24)
params = cell.init(jax.random.key(0), 5)
xs = jax.random.normal(jax.random.key(1), (8, 7, 5))  # B = 8: the LSTM's least batch
loss = jax.jit(jax.grad(lambda p: jnp.sum(bj.unroll(cell, p, xs)[1] ** 2)))
for _ in range(6):  # one Python thread after another, each calling forward and backward
  thread = threading.Thread(target=lambda: jax.block_until_ready(loss(params)))
  thread.start()
  thread.join()
print(_kernel._library()[0].bptt_fused_kept_sets())
"""


@needs_kernels
def test_calls_one_after_another_share_one_set_of_kept_buffers():
  # Calls take their scratch buffers from a pool: calls that never overlap reuse one
  # set, however many threads (Python's, XLA's) ran them. In a fresh process, so that
  # no other test's calls count.
  import subprocess
  import sys

  proc = subprocess.run([sys.executable, "-c", KEPT_SETS_SCRIPT], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "1"


# bj.readout's backward pass with the written-out kernels on: one call, dx = g W^T and
# dW = x^T g by oneDNN's sgemm. Shapes as (leading axes of hs, H, O): one row; a
# [B, T, H] sequence; a long contraction (600 rows into 17 x 3); H and O above 32.
READOUT_SHAPES = [((1,), 1, 1), ((3, 7), 13, 5), ((2, 300), 17, 3), ((64,), 40, 33)]


@pytest.fixture
def any_size_readout(monkeypatch):
  """The readout's call for products of any size (by default, large ones only)."""
  monkeypatch.setattr(_kernel, "DENSE_MIN_MACS", 0)


def _readout_case(lead, H, O, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {"W_hy": jax.random.normal(keys[0], (H, O)) / np.sqrt(H),
            "b_y": 0.3 * jax.random.normal(keys[1], (O,))}
  return params, jax.random.normal(keys[2], (*lead, H)), jax.random.normal(keys[3], (*lead, O))


def _readout_loss(params, hs, cot):
  return jnp.sum(jnp.sin(bj.readout(params, hs)) * cot)


def _dense_call_results(fn, *args) -> list:
  """The result types of each bptt_dense_backward call in ``fn``'s lowered text."""
  import re

  text = jax.jit(fn).lower(*args).as_text()
  return re.findall(r"custom_call @bptt_dense_backward\(.*\) .*-> \((.*)\)", text)


@needs_kernels
@pytest.mark.parametrize("lead,H,O", READOUT_SHAPES)
def test_readout_backward_call_equals_the_float64_products(lead, H, O, any_size_readout):
  params, hs, cot = _readout_case(lead, H, O)
  grad = jax.value_and_grad(_readout_loss, argnums=(0, 1))
  assert len(_dense_call_results(grad, params, hs, cot)) == 1
  loss, (d_params, d_hs) = jax.jit(grad)(params, hs, cot)
  W, b, h, c = (np.asarray(a, np.float64) for a in (params["W_hy"], params["b_y"], hs, cot))
  y = h @ W + b
  g = (c * np.cos(y)).reshape(-1, O)  # d loss / d y, a row per position
  _close(loss, np.sum(np.sin(y) * c))
  _close(d_params, {"W_hy": h.reshape(-1, H).T @ g, "b_y": g.sum(0)})
  _close(d_hs, (g @ W.T).reshape(h.shape))


@needs_kernels
def test_readout_backward_call_computes_only_the_gradients_asked_for(any_size_readout):
  params, hs, cot = _readout_case((3, 7), 13, 5)
  f32 = "tensor<{}xf32>"
  weights_only = jax.grad(_readout_loss)  # hs is data: no dx
  assert _dense_call_results(weights_only, params, hs, cot) == [
      f"{f32.format(0)}, {f32.format('13x5')}"]
  frozen = jax.grad(lambda hs, p, c: _readout_loss(jax.lax.stop_gradient(p), hs, c))
  assert _dense_call_results(frozen, hs, params, cot) == [
      f"{f32.format('3x7x13')}, {f32.format(0)}"]
  with bj.use_kernels(False):
    expected = jax.grad(_readout_loss, argnums=(0, 1))(params, hs, cot)
  _close(weights_only(params, hs, cot), expected[0])
  _close(frozen(hs, params, cot), expected[1])


@needs_kernels
def test_readout_second_derivatives_and_vmap_equal_autodiff(any_size_readout):
  params, hs, cot = _readout_case((4, 6), 9, 7, seed=1)
  direction = _readout_case((4, 6), 9, 7, seed=2)[:2]

  def hvp(params, hs):  # forward over reverse: d/de grad(params + e v, hs + e u)
    grad = jax.grad(_readout_loss, argnums=(0, 1))
    return jax.jvp(lambda p, h: grad(p, h, cot), (params, hs), direction)[1]

  def hvp_by_vjp(params, hs):  # reverse over reverse, through the call: grad <grad, (v, u)>
    inner = lambda p, h: jax.tree_util.tree_reduce(  # noqa: E731
        jnp.add, jax.tree.map(jnp.vdot, jax.grad(_readout_loss, argnums=(0, 1))(p, h, cot),
                              direction))
    return jax.grad(inner, argnums=(0, 1))(params, hs)

  batched = jax.vmap(jax.grad(_readout_loss, argnums=(0, 1)), in_axes=(None, 0, 0))
  stacked = (jnp.stack([hs, -2.0 * hs]), jnp.stack([cot, cot[::-1]]))
  got = (jax.jit(hvp_by_vjp)(params, hs), jax.jit(batched)(params, *stacked))
  assert "bptt_dense_backward" in str(jax.make_jaxpr(hvp_by_vjp)(params, hs))
  with bj.use_kernels(False):
    expected = (hvp(params, hs), batched(params, *stacked))
  _close(got, expected)


@needs_kernels
@pytest.mark.parametrize("case", ["off", "onednn_only", "bfloat16", "absent", "small"])
def test_readout_call_applies_only_where_it_can(case, monkeypatch, any_size_readout):
  params, hs, cot = _readout_case((3, 7), 13, 5)
  grad = jax.grad(_readout_loss, argnums=(0, 1))
  with bj.use_kernels(False):
    expected = grad(params, hs, cot)
  families = {"off": False, "onednn_only": "rnn"}.get(case, True)
  if case == "bfloat16":
    hs = hs.astype(jnp.bfloat16)
  if case == "absent":
    monkeypatch.setattr(_kernel, "_loaded", [(None, "simulated: the extension is absent")])
  if case == "small":  # 3 * 7 rows * 13 * 5 multiply-adds, one short of the call's least
    monkeypatch.setattr(_kernel, "DENSE_MIN_MACS", 3 * 7 * 13 * 5 + 1)
  with bj.use_kernels(families):
    assert "bptt_dense_backward" not in str(jax.make_jaxpr(grad)(params, hs, cot))
    if case != "bfloat16":
      _close(jax.jit(grad)(params, hs, cot), expected)


@needs_kernels
def test_readout_forward_mode_is_refused_with_the_kernels_on(any_size_readout):
  params, hs, _ = _readout_case((3, 7), 13, 5)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda h: bj.readout(params, h), (hs,), (hs,))
  with bj.use_kernels(False):  # the plain product takes forward mode
    _, tangent = jax.jvp(lambda h: bj.readout(params, h), (hs,), (hs,))
  np.testing.assert_allclose(tangent, np.asarray(hs) @ np.asarray(params["W_hy"]), rtol=1e-5,
                             atol=1e-5)


@needs_kernels
def test_readout_call_runs_from_its_least_size_on():
  # 2 ** 21 multiply-adds: [64, 256] x [256, 128] has them all, one row fewer does not.
  W = jnp.zeros((256, 128))
  uses = lambda rows: "bptt_dense_backward" in str(  # noqa: E731
      jax.make_jaxpr(jax.grad(lambda W, x: jnp.sum(bj.readout({"W_hy": W, "b_y": jnp.zeros(
          128)}, x))))(W, jnp.zeros((rows, 256))))
  assert _kernel.DENSE_MIN_MACS == 64 * 256 * 128
  assert uses(64) and not uses(63)


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_small_batches_take_the_jax_path_by_default(name, monkeypatch):
  # The defaults throughout: the least batch, and a call this small on one thread (two
  # blocks of 8 units otherwise), whose values and gradients equal the JAX path's.
  monkeypatch.setattr(_kernel, "MIN_BATCH", DEFAULT_MIN_BATCH)
  monkeypatch.setattr(_kernel, "PARALLEL_MIN_STEP_FLOPS", DEFAULT_PARALLEL[0])
  monkeypatch.setattr(_kernel, "PARALLEL_MIN_CALL_FLOPS", DEFAULT_PARALLEL[1])
  least = DEFAULT_MIN_BATCH[name]
  for B, expected in ((least - 1, False), (least, True)):
    cell, params, xs, carry, cot = _setup(name, B, 5, 3, 16)
    with bj.use_kernels("fused"):
      jaxpr = str(jax.make_jaxpr(jax.grad(_loss(cell), has_aux=True))(params, xs, carry, cot))
      got = _run(_loss(cell), params, xs, carry, cot)
    assert ("bptt_fused_forward" in jaxpr) == expected, (name, B)
    with bj.use_kernels(False):
      _close(got, _run(_loss(cell), params, xs, carry, cot))


def test_small_calls_run_on_one_thread(monkeypatch):
  # (T, B, D, H) -> the forward step's FLOPs 2 B G H (D + H), worked out by hand
  assert DEFAULT_PARALLEL == (131072, 8388608)
  monkeypatch.setattr(_kernel, "PARALLEL_MIN_STEP_FLOPS", DEFAULT_PARALLEL[0])
  monkeypatch.setattr(_kernel, "PARALLEL_MIN_CALL_FLOPS", DEFAULT_PARALLEL[1])
  lstm, gru, rnn = ("bptt_fused", 2, True), ("bptt_fused", 3, True), ("bptt_fused", 0, True)
  assert _kernel._threads(lstm, 20, 8, 8, 32) == 1      # 81,920 a step: below the step's least
  assert _kernel._threads(lstm, 200, 64, 128, 512) == 0  # 167.8 M a step, 33.6 G a call
  assert _kernel._threads(gru, 10, 16, 16, 64) == 1     # 491,520 a step, 4.9 M a call
  assert _kernel._threads(gru, 18, 16, 16, 64) == 0     # 8.85 M a call
  assert _kernel._threads(rnn, 1000, 16, 16, 64) == 0   # 163,840 a step
  assert _kernel._threads(("bptt_rnn", 2, False), 1, 1, 1, 8) == 0  # oneDNN splits its own
