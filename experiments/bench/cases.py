"""What the benchmark measures: the shapes, the implementations, and each one's step.

A case is one (cell, dims, mode, implementation). Its step is a function
``step() -> loss`` (``None`` in forward mode) that runs once and waits for the
result. JAX, Flax and PyTorch are imported inside the builders, so that a
worker process loads only the framework it measures.
"""

import os
import time
from typing import Any, Callable, NamedTuple

import numpy as np


class Dims(NamedTuple):
  B: int  # batch
  T: int  # time steps
  D: int  # input features (and readout outputs)
  H: int  # hidden units


CELLS = ("rnn", "lstm", "gru", "min_gru", "min_lstm")
DEFAULT_CELLS = ("rnn", "lstm", "gru")  # the ones Flax and PyTorch have too
LINEAR_CELLS = ("min_gru", "min_lstm")  # no recurrent matmul: gates read the input only
GATES = {"rnn": 1, "lstm": 4, "gru": 3, "min_gru": 2, "min_lstm": 3}
CONFIGS = {
    "small": Dims(32, 100, 32, 128),
    "medium": Dims(64, 200, 128, 512),
    "long": Dims(16, 2000, 32, 256),
}
QUICK_CONFIGS = {"tiny": Dims(4, 10, 4, 8)}
MODES = ("train", "forward")


class Impl(NamedTuple):
  kind: str  # "bptt_jax", "flax" or "torch": which builder makes the step
  unroll: dict = {}  # keyword arguments of bptt_jax.unroll (a dtype by its name)
  env: dict = {}  # extra environment of the worker process


TUNED_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": "100000000000"}
IMPLS = {
    "bptt_jax": Impl("bptt_jax"),
    "bptt_jax_bf16": Impl("bptt_jax", {"dtype": "bfloat16"}),
    "bptt_jax_fused": Impl("bptt_jax", env={"BPTT_JAX_KERNELS": "0"}),  # pure JAX, no C++ kernel
    "bptt_jax_onednn": Impl("bptt_jax", env={"BPTT_JAX_KERNELS": "all"}),  # oneDNN's RNN kernels
    "bptt_jax_onednn_malloc": Impl("bptt_jax", env={"BPTT_JAX_KERNELS": "all", **TUNED_MALLOC}),
    "bptt_jax_onednn_omp1": Impl("bptt_jax", env={"BPTT_JAX_KERNELS": "all",
                                                  "OMP_NUM_THREADS": "1"}),
    "bptt_jax_malloc": Impl("bptt_jax", env=TUNED_MALLOC),
    # the written-out C++ sequence kernels (BPTT_JAX_KERNELS=fused)
    "bptt_jax_kernel": Impl("bptt_jax", env={"BPTT_JAX_KERNELS": "fused"}),
    "bptt_jax_kernel_malloc": Impl("bptt_jax", env={"BPTT_JAX_KERNELS": "fused", **TUNED_MALLOC}),
    "bptt_jax_autodiff": Impl("bptt_jax", {"fused": False}),
    "bptt_jax_hoisted": Impl("bptt_jax", {"fused": False, "hoist": True}),
    "flax": Impl("flax"),
    "flax_malloc": Impl("flax", env=TUNED_MALLOC),
    "torch": Impl("torch"),
    "torch_malloc": Impl("torch", env=TUNED_MALLOC),
    "bptt_jax_remat": Impl("bptt_jax", {"remat": "sqrt"}),
    "bptt_jax_segmented": Impl("bptt_jax", {"segmented": True}),
    "bptt_jax_parallel": Impl("bptt_jax", {"method": "parallel"}),
    "bptt_jax_sequential": Impl("bptt_jax", {"method": "sequential"}),
    "bptt_jax_deer": Impl("bptt_jax", {"method": "deer"}),
    "bptt_jax_quasi_deer": Impl("bptt_jax", {"method": "quasi_deer"}),
}
DEFAULT_IMPLS = ["bptt_jax", "bptt_jax_bf16", "bptt_jax_malloc", "bptt_jax_autodiff", "flax",
                 "flax_malloc", "torch", "torch_malloc"]
QUICK_IMPLS = ["bptt_jax", "bptt_jax_bf16", "flax", "torch"]  # every builder, and a dtype= run
MEMORY_VS_T_IMPLS = ["bptt_jax", "bptt_jax_remat", "bptt_jax_segmented", "flax", "torch"]
# Parallel in time against T: (cell, impl) pairs, each a process per T.
PARALLEL_VS_T_CASES = [
    ("gru", "bptt_jax"), ("lstm", "bptt_jax"),
    ("min_gru", "bptt_jax_parallel"), ("min_gru", "bptt_jax_sequential"),
    ("min_lstm", "bptt_jax_parallel"), ("min_lstm", "bptt_jax_sequential"),
    ("gru", "bptt_jax_deer"), ("gru", "bptt_jax_quasi_deer"),
    # the same without the C++ kernels (pure JAX), and with oneDNN's GRU/LSTM
    ("min_gru", "bptt_jax_fused"), ("min_lstm", "bptt_jax_fused"),
    ("gru", "bptt_jax_onednn"), ("lstm", "bptt_jax_onednn"),
]
TORCH_IMPLS = {name for name, impl in IMPLS.items() if impl.kind == "torch"}


def forward_flops(cell: str, dims: Dims) -> float:
  """Matmul FLOPs of the forward pass: RNN ``2B(D+H)GH`` (minGRU/minLSTM ``2BDGH``: no
  recurrent matmul) and readout ``2BHD`` per step."""
  B, T, D, H = dims
  recurrent = 0 if cell in LINEAR_CELLS else H
  return T * (2 * B * (D + recurrent) * GATES[cell] * H + 2 * B * H * D)


def flops(cell: str, dims: Dims, mode: str) -> float:
  """Forward FLOPs; a training step is about three forward passes (forward + two in BPTT)."""
  return forward_flops(cell, dims) * (3 if mode == "train" else 1)


def make_data(dims: Dims):
  """Fixed random inputs and targets ``[B, T, D]`` (float32 numpy), the same for every impl."""
  rng = np.random.default_rng(0)
  shape = (dims.B, dims.T, dims.D)
  return (rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))


class JaxCase(NamedTuple):
  """A jitted JAX function and what it runs on.

  ``train``: ``fn(state, batch) -> (state, metrics)`` with ``metrics["loss"]``;
  otherwise ``fn(state, batch) -> ys`` with ``state`` the params and ``batch``
  the inputs.
  """

  fn: Callable
  state: Any
  batch: Any
  train: bool


def mse(preds, targets):
  import jax.numpy as jnp

  return jnp.mean(jnp.square(preds - targets))


def bptt_jax_case(cell_name: str, dims: Dims, mode: str, unroll_kwargs: dict) -> JaxCase:
  """bptt_jax cell, readout and, for training, ``bj.optimizer`` with ``bj.train_step``.

  With a ``dtype`` (``"bfloat16"``) the params stay float32 and ``unroll`` computes in that
  dtype; the readout and the loss are float32, on the hidden states cast up.
  """
  import jax
  import jax.numpy as jnp

  import bptt_jax as bj

  unroll_kwargs = dict(unroll_kwargs)
  segmented = unroll_kwargs.pop("segmented", False)
  if "dtype" in unroll_kwargs:
    unroll_kwargs["dtype"] = jnp.dtype(unroll_kwargs["dtype"])
  make_cell = {"rnn": lambda H: bj.rnn(H, "tanh"), "lstm": bj.lstm, "gru": bj.gru,
               "min_gru": bj.min_gru, "min_lstm": bj.min_lstm}[cell_name]
  cell = make_cell(dims.H)

  @jax.jit  # one compile rather than one per eager op
  def init(key):
    k_cell, k_head = jax.random.split(key)
    return {"cell": cell.init(k_cell, dims.D), "head": bj.init_readout(k_head, dims.H, dims.D)}

  params = init(jax.random.key(0))

  def predict(params, xs):
    _, hs = bj.unroll(cell, params["cell"], xs, **unroll_kwargs)
    return bj.readout(params["head"], hs.astype(jnp.float32))

  xs, ys = map(jax.device_put, make_data(dims))
  if mode == "forward":
    return JaxCase(jax.jit(predict), params, xs, train=False)

  def loss_fn(params, batch):
    xs, ys = batch
    return mse(predict(params, xs), ys)

  if segmented:
    # The same mean squared error, computed segment by segment (O(sqrt T) memory).
    def step_loss(params, hs, ys):
      return jnp.mean(jnp.square(bj.readout(params["head"], hs) - ys), axis=-1)

    def loss_fn(params, batch):  # noqa: F811
      xs, ys = batch
      return bj.segmented_loss(cell, params, xs, ys, step_loss, reduction="mean")[0]

  tx = bj.optimizer(1e-3, max_norm=1.0)
  state = jax.jit(lambda p: bj.TrainState.create(p, tx))(params)
  return JaxCase(bj.train_step(loss_fn, tx), state, (xs, ys), train=True)


def flax_case(cell_name: str, dims: Dims, mode: str) -> JaxCase:
  """``nn.RNN`` over Flax's own cell, ``nn.Dense`` readout, optax clip + Adam under jax.jit."""
  import flax.linen as nn
  import jax
  import optax

  flax_cell = {"rnn": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[cell_name]

  class Model(nn.Module):
    @nn.compact
    def __call__(self, xs):  # [B, T, D] -> [B, T, D]
      return nn.Dense(dims.D)(nn.RNN(flax_cell(features=dims.H))(xs))

  model = Model()
  xs, ys = map(jax.device_put, make_data(dims))
  params = jax.jit(model.init)(jax.random.key(0), xs)
  if mode == "forward":
    return JaxCase(jax.jit(model.apply), params, xs, train=False)

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))

  @jax.jit
  def step(state, batch):
    params, opt_state = state
    xs, ys = batch
    loss, grads = jax.value_and_grad(lambda p: mse(model.apply(p, xs), ys))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  return JaxCase(step, (params, jax.jit(tx.init)(params)), (xs, ys), train=True)


def jax_case(impl: Impl, cell_name: str, dims: Dims, mode: str) -> JaxCase:
  if impl.kind == "flax":
    return flax_case(cell_name, dims, mode)
  return bptt_jax_case(cell_name, dims, mode, impl.unroll)


def jax_stepper(case: JaxCase, fn: Callable | None = None) -> Callable[[], float | None]:
  """``step()`` runs ``fn`` (default ``case.fn``) once, waits for it, returns the loss.

  Training threads the new state into the next call.
  """
  import jax

  fn = fn or case.fn
  state = case.state

  def step():
    nonlocal state
    if not case.train:
      jax.block_until_ready(fn(state, case.batch))
      return None
    state, metrics = jax.block_until_ready(fn(state, case.batch))
    return float(metrics["loss"])

  return step


def time_in_turn(steps: dict, reps: int) -> dict:
  """``{name: [ms, ...]}``: each ``step()`` warmed up once, then called in turn, one call
  each per round, for ``reps`` rounds (so a drift in the machine's speed hits all alike),
  in the reverse order every other round (so what one call leaves the next does too)."""
  if reps < 1:
    raise ValueError(f"reps must be at least 1, got {reps}")
  for step in steps.values():
    step()
  times = {name: [] for name in steps}
  for r in range(reps):
    for name, step in (list(steps.items())[::-1] if r % 2 else steps.items()):
      start = time.perf_counter()
      step()
      times[name].append((time.perf_counter() - start) * 1e3)
  return times


def print_in_turn(times: dict, width: int = 30) -> None:
  """For :func:`time_in_turn`'s result: each step's median time, and the median and
  quartiles of its per-round ratios to the first step's time."""
  first = np.array(next(iter(times.values())))
  for name, ms in times.items():
    ratios = np.array(ms) / first
    print(f"  {name:{width}s} median {np.median(ms):8.2f} ms   ratio {np.median(ratios):.3f} "
          f"[{np.quantile(ratios, 0.25):.3f}, {np.quantile(ratios, 0.75):.3f}]")


def torch_stepper(cell_name: str, dims: Dims, mode: str) -> Callable[[], float | None]:
  """``step()`` for ``torch.nn.LSTM``/``GRU``/``RNN`` (batch-first) with a linear readout."""
  import torch

  torch.manual_seed(0)
  B, T, D, H = dims
  rnn = {
      "rnn": lambda: torch.nn.RNN(D, H, nonlinearity="tanh", batch_first=True),
      "lstm": lambda: torch.nn.LSTM(D, H, batch_first=True),
      "gru": lambda: torch.nn.GRU(D, H, batch_first=True),
  }[cell_name]()
  head = torch.nn.Linear(H, D)
  xs, ys = (torch.from_numpy(a) for a in make_data(dims))

  if mode == "forward":
    def forward():
      with torch.inference_mode():
        head(rnn(xs)[0])

    return forward

  params = list(rnn.parameters()) + list(head.parameters())
  opt = torch.optim.Adam(params, lr=1e-3)

  def train():
    loss = torch.nn.functional.mse_loss(head(rnn(xs)[0]), ys)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return train


def stepper(impl_name: str, cell_name: str, dims: Dims, mode: str) -> Callable[[], float | None]:
  """``step()`` of any implementation, by its name in ``IMPLS``.

  An implementation's environment (``Impl.env``: the kernels' switch, the allocator's
  settings) is read when the process starts or when the step is traced, so it is not
  set here: this process must already run with it (the benchmark's workers do), or
  ``ValueError`` names what differs.
  """
  impl = IMPLS[impl_name]
  differ = {k: v for k, v in impl.env.items() if os.environ.get(k) != v}
  if differ:
    want = " ".join(f"{k}={v}" for k, v in differ.items())
    have = ", ".join(f"{k}={os.environ[k]!r}" if k in os.environ else f"{k} unset" for k in differ)
    raise ValueError(f"{impl_name!r} runs with {want} in its environment; this process has "
                     f"{have}: start it with that environment")
  if impl.kind == "torch":
    return torch_stepper(cell_name, dims, mode)
  return jax_stepper(jax_case(impl, cell_name, dims, mode))


def framework_info(impl: Impl) -> dict:
  if impl.kind == "torch":
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads()}
  import jax

  import bptt_jax

  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "cpu_kernels": ",".join(bptt_jax.kernels().enabled) or "off"}
