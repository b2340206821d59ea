"""The written-out CPU kernels against the pure-JAX path at small batches, paired in one
process, over a grid of cells, batch sizes and hidden sizes.

  cd experiments && python -m bench.small_batches --length 100 --batches 1 4 8 16

For each cell, B and H, ``jax.value_and_grad`` of ``mean(unroll(cell, params, xs)[1] ** 2)``
(``xs`` ``[B, T, D]``; ``--mode forward``: the loss alone) is compiled twice: with the
written-out kernel at whatever batch size (``bptt_jax._kernel.MIN_BATCH`` lowered to 1) and
on the pure-JAX path (``use_kernels(False)``). The two run in turn, one call each per round,
for ``--reps`` rounds; the medians and the median of the per-round ratios (kernel ÷ JAX) are
printed, a line per case. ``_kernel.MIN_BATCH``, the batch from which a cell takes the
kernel, comes from these ratios.
"""

import argparse
import itertools

import numpy as np

from .cases import time_in_turn

CELLS = {"rnn": "rnn_tanh", "gru": "gru", "lstm": "lstm"}  # name: the kernel's


def compiled_step(cell_name: str, B: int, T: int, D: int, H: int, kernel: bool, train: bool):
  """``step()`` of the cell's loss (and gradient, with ``train``) on the kernel or not."""
  import jax
  import jax.numpy as jnp

  import bptt_jax as bj
  from bptt_jax import _kernel

  cell = {"rnn": bj.rnn, "gru": bj.gru, "lstm": bj.lstm}[cell_name](H)
  params = cell.init(jax.random.key(0), D)
  xs = jax.random.normal(jax.random.key(1), (B, T, D))
  loss = lambda params: jnp.mean(bj.unroll(cell, params, xs)[1] ** 2)  # noqa: E731
  least = _kernel.MIN_BATCH
  try:
    _kernel.MIN_BATCH = dict.fromkeys(least, 1)
    with bj.use_kernels("fused" if kernel else False):  # traced now, with the switch in place
      fn = jax.jit(jax.value_and_grad(loss) if train else loss).lower(params).compile()
  finally:
    _kernel.MIN_BATCH = least
  if ("bptt_fused_forward" in fn.as_text()) != kernel:
    raise SystemExit(f"{cell_name} B={B} H={H}: the step {'lacks' if kernel else 'has'} the "
                     "kernel (is the extension built? bptt_jax.kernels())")
  return lambda: jax.block_until_ready(fn(params))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16], help="B")
  parser.add_argument("--hidden", type=int, nargs="+", default=[16, 64, 128], help="H")
  parser.add_argument("--inputs", type=int, default=16, help="D")
  parser.add_argument("--length", type=int, default=100, help="T")
  parser.add_argument("--mode", choices=["train", "forward"], default="train")
  parser.add_argument("--reps", type=int, default=60, help="rounds (one call of each a round)")
  args = parser.parse_args()
  for name, values in (("batches", args.batches), ("hidden", args.hidden),
                       ("inputs", [args.inputs]), ("length", [args.length]),
                       ("reps", [args.reps])):
    if min(values) < 1:
      parser.error(f"--{name} must be positive, got {min(values)}")

  import bptt_jax
  from bptt_jax import _kernel

  status = bptt_jax.kernels()
  if status.library is None:
    raise SystemExit(f"the CPU kernels are not available: {status.reason}")
  T, D = args.length, args.inputs
  print(f"{args.mode}, T = {T}, D = {D}, {args.reps} rounds; ratio: kernel ÷ JAX "
        "(median of the per-round ratios)")
  for cell_name, B, H in itertools.product(args.cells, args.batches, args.hidden):
    train = args.mode == "train"
    times = time_in_turn({"jax": compiled_step(cell_name, B, T, D, H, False, train),
                          "kernel": compiled_step(cell_name, B, T, D, H, True, train)},
                         args.reps)
    step_flops = _kernel.step_flops(_kernel._KINDS[CELLS[cell_name]], B, D, H)
    ratio = np.median(np.array(times["kernel"]) / np.array(times["jax"]))
    print(f"  {cell_name:5s} B={B:<3d} H={H:<4d} forward step {step_flops / 1e6:6.3f} MFLOP   "
          f"jax {np.median(times['jax']):8.3f} ms   kernel {np.median(times['kernel']):8.3f} ms"
          f"   ratio {ratio:.2f}", flush=True)


if __name__ == "__main__":
  main()
