"""Tests for bptt_jax/_torch.py: PyTorch's own outputs and gradients, same weights and inputs.

Variable lengths go through PyTorch as packed sequences; gradients come from
``loss.backward()`` on PyTorch's side and from ``jax.grad`` through
``from_torch`` of the state dict (so both are in PyTorch's layout) on ours.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed (pip install -e '.[dev]' brings torch==2.13.0)")

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, D, H = 4, 7, 3, 5
LENGTHS = np.array([7, 4, 1, 6])
MODULES = {
    "rnn_tanh": lambda **kw: torch.nn.RNN(D, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: torch.nn.RNN(D, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: torch.nn.LSTM(D, H, **kw),
    "gru": lambda **kw: torch.nn.GRU(D, H, **kw),
}
CASES = [  # (module, num_layers, bidirectional, batch_first, bias): each option both ways
    ("rnn_relu", 2, True, True, False),
    ("lstm", 2, False, False, True),
    ("gru", 1, True, False, True),
]  # nn.RNN's tanh: the same code with the other activation (the next test checks the cells)


def _module(name, num_layers, bidirectional, batch_first, bias, seed=0):
  torch.manual_seed(seed)
  module = MODULES[name](num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, bias=bias)
  with torch.no_grad():  # biases away from PyTorch's small uniform init
    for p in module.parameters():
      p.uniform_(-0.6, 0.6)
  return module


def _torch_run(module, xs, cot, lengths):
  """PyTorch over packed sequences: outputs [B, T, dirs*H], final states, grads."""
  x = torch.tensor(xs, requires_grad=True)
  inp = x if module.batch_first else x.transpose(0, 1)
  packed = torch.nn.utils.rnn.pack_padded_sequence(
      inp, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False)
  out, state = module(packed)
  out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
  loss = (out * torch.tensor(cot)).sum()
  module.zero_grad()
  loss.backward()
  grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
  h_n = state[0] if isinstance(state, tuple) else state
  c_n = state[1] if isinstance(state, tuple) else None
  return (out.detach().numpy(), h_n.detach().numpy(),
          None if c_n is None else c_n.detach().numpy(), grads, x.grad.numpy())


def _finals(carries, bidirectional, num_layers):
  """Our final carries as PyTorch's h_n (and c_n): [layers * dirs, B, H]."""
  if bidirectional:
    flat = [c for pair in carries for c in pair]
  else:
    flat = list(carries) if num_layers > 1 else [carries]
  h = np.stack([c.h if isinstance(c, bj.LSTMState) else c for c in flat])
  c = np.stack([c.c for c in flat]) if isinstance(flat[0], bj.LSTMState) else None
  return h, c


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}_L{}_bi{}_bf{}_bias{}".format(*c))
def test_matches_pytorch_outputs_and_gradients(case):
  name, num_layers, bidirectional, batch_first, bias = case
  module = _module(*case)
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  cot = rng.normal(size=(B, T, H * (2 if bidirectional else 1))).astype(np.float32)
  valid = np.arange(T)[None, :] < LENGTHS[:, None]
  cot = np.where(valid[..., None], cot, 0.0).astype(np.float32)
  out, h_n, c_n, torch_grads, torch_dx = _torch_run(module, xs, cot, LENGTHS)

  state = {k: jnp.asarray(v.detach().numpy()) for k, v in module.state_dict().items()}
  nonlinearity = "relu" if name == "rnn_relu" else None

  def run(state, xs):
    cells, params = bj.from_torch(state, nonlinearity=nonlinearity)
    if bidirectional:
      return bj.bidirectional_stack(cells, params, xs, lengths=LENGTHS)
    return bj.unroll(cells, params, xs, lengths=LENGTHS)

  @jax.jit
  def loss(state, xs):
    carries, hs = run(state, xs)
    return jnp.sum(hs * cot), (carries, hs)

  (_, (carries, hs)), (grads, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      state, xs)
  np.testing.assert_allclose(hs, out, **TOL)  # padded steps: zeros on both sides
  ours_h, ours_c = _finals(carries, bidirectional, num_layers)
  np.testing.assert_allclose(ours_h, h_n, **TOL)
  if c_n is not None:
    np.testing.assert_allclose(ours_c, c_n, **TOL)

  assert set(grads) == set(torch_grads)
  for k in torch_grads:
    np.testing.assert_allclose(grads[k], torch_grads[k], err_msg=k, **TOL)
  np.testing.assert_allclose(dx, torch_dx, **TOL)


def test_module_and_state_dict_give_the_same_cells():
  assert [c.name for c in bj.from_torch(torch.nn.RNN(D, H, num_layers=2))[0].layers] == [
      "rnn_tanh"] * 2
  module = _module("rnn_relu", 2, False, False, True)
  cell, params = bj.from_torch(module)
  assert isinstance(cell, bj.Cell) and [c.name for c in cell.layers] == ["rnn_relu"] * 2
  prefixed = {"encoder.rnn." + k: v for k, v in module.state_dict().items()}
  prefixed["head.weight"] = torch.zeros(2, 2)
  cell2, params2 = bj.from_torch(prefixed, prefix="encoder.rnn.", nonlinearity="relu")
  assert [c.name for c in cell2.layers] == ["rnn_relu"] * 2
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  # One layer, one direction: a plain cell and dict, W = weight_ih_l0.T.
  lstm = _module("lstm", 1, False, True, True)
  cell, params = bj.from_torch(lstm)
  assert cell.name == "lstm" and cell.layers is None
  np.testing.assert_array_equal(params["W"], lstm.weight_ih_l0.detach().numpy().T)
  np.testing.assert_allclose(
      params["b"], (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy(), rtol=1e-7)


def test_errors():
  with pytest.raises(ValueError, match="proj_size=2 has no bptt_jax equivalent"):
    bj.from_torch(torch.nn.LSTM(D, H, proj_size=2))
  with pytest.raises(ValueError, match="weight_hr_l0.*proj_size > 0"):
    bj.from_torch(torch.nn.LSTM(D, H, proj_size=2).state_dict())
  with pytest.raises(TypeError, match="expected a torch.nn.RNN, nn.LSTM or nn.GRU.*got Linear"):
    bj.from_torch(torch.nn.Linear(2, 2))
  with pytest.raises(ValueError, match="'head.weight' is not a key.*prefix="):
    bj.from_torch({**torch.nn.GRU(D, H).state_dict(), "head.weight": torch.zeros(1)})
  with pytest.raises(ValueError, match="nonlinearity= is for state dicts"):
    bj.from_torch(torch.nn.RNN(D, H), nonlinearity="relu")
  with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
    bj.from_torch(torch.nn.RNN(D, H).state_dict(), nonlinearity="gelu")
  sd = torch.nn.GRU(D, H, num_layers=2).state_dict()
  del sd["weight_hh_l1"]
  with pytest.raises(ValueError, match=r"missing \['weight_hh_l1'\]"):
    bj.from_torch(sd)
  with pytest.raises(ValueError, match="no nn.RNN/LSTM/GRU weights found"):
    bj.from_torch({"rnn.weight_ih_l0": torch.zeros(3, 3)}, prefix="enc.")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bj.from_torch(torch.nn.LSTM(D, H, num_layers=2, dropout=0.3))
  assert any("dropout=0.3" in str(w.message) for w in caught)
