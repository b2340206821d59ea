"""The benchmark's bptt_jax step on the CPU kernel against another way of running it, paired
in one process.

  cd experiments && python -m bench.kernel_ab --compare layout --cell lstm --config medium

Builds the bptt_jax step of the benchmark (:func:`bench.cases.bptt_jax_case`: the cell,
the readout and, for training, the mean squared error, clipping and Adam) twice, traced
under ``bptt_jax.use_kernels``:

- ``--compare layout``: the written-out kernel as ``unroll`` calls it (it reads
  ``[B, T, D]`` and writes ``[B, T, H]`` in place), against the same kernel with
  ``unroll`` traced as ``swapaxes``, ``unroll(..., time_major=True)``, ``swapaxes``
  (the layout before the kernels took batch-major sequences);
- ``--compare padded``: a batch padded past random lengths (seeded; from 1 to T),
  ``unroll(..., lengths=...)`` on the written-out kernel against the pure-JAX path
  (``use_kernels(False)``);
- ``--compare readout`` (training): the readout's backward pass as one call of the
  extension (oneDNN's sgemm, what ``use_kernels("fused")`` gives ``bj.readout``; here
  whatever the product's size) against XLA's products, the rest of the step on the
  kernels in both.

The two steps run in turn, one call each per round, for ``--reps`` rounds; their medians
and the median and quartiles of the per-round ratios to the first are printed, so that a
machine whose speed drifts still gives a fair comparison.
"""

import argparse

import numpy as np

from .cases import (
  CONFIGS,
  MODES,
  QUICK_CONFIGS,
  bptt_jax_case,
  jax_stepper,
  print_in_turn,
  time_in_turn,
)


def compiled_step(cell: str, config: str, mode: str, *, kernels=True, time_major=False,
                  lengths=None, readout_call=True):
  """``step()`` of the benchmark's bptt_jax case, traced under ``use_kernels(kernels)``;
  with ``time_major``, ``unroll`` is traced on time-major sequences with transposes around
  it; with ``lengths``, ``unroll`` gets them; the kernel runs whatever the batch size, and
  the readout's backward pass is the extension's call whatever its size, or without
  ``readout_call`` XLA's products."""
  import jax.numpy as jnp

  import bptt_jax as bj
  from bptt_jax import _kernel

  unroll, dense_usable, least = bj.unroll, _kernel.dense_usable, _kernel.DENSE_MIN_MACS
  min_batch = _kernel.MIN_BATCH

  def transposed(cell, params, xs, **kwargs):
    carry, hs = unroll(cell, params, jnp.swapaxes(xs, 0, 1), time_major=True, **kwargs)
    return carry, jnp.swapaxes(hs, 0, 1)

  kwargs = {} if lengths is None else {"lengths": jnp.asarray(lengths)}
  case = bptt_jax_case(cell, {**CONFIGS, **QUICK_CONFIGS}[config], mode, kwargs)
  try:
    if time_major:
      bj.unroll = transposed
    _kernel.DENSE_MIN_MACS = 0
    _kernel.MIN_BATCH = dict.fromkeys(min_batch, 1)
    if not readout_call:
      _kernel.dense_usable = lambda x, W: False
    with bj.use_kernels(kernels):  # traced now, with the swaps in place
      fn = case.fn.lower(case.state, case.batch).compile()
  finally:
    bj.unroll, _kernel.dense_usable, _kernel.DENSE_MIN_MACS = unroll, dense_usable, least
    _kernel.MIN_BATCH = min_batch
  text = fn.as_text()
  if ("bptt_fused_forward" in text) != bool(kernels):
    raise SystemExit(f"{cell}/{config}: the step {'lacks' if kernels else 'has'} the kernel")
  if mode == "train" and kernels and ("bptt_dense_backward" in text) != readout_call:
    raise SystemExit(f"{cell}/{config}: the step {'lacks' if readout_call else 'has'} the "
                     "readout's call")
  return jax_stepper(case, fn)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compare", choices=["layout", "padded", "readout"], default="layout")
  parser.add_argument("--cell", choices=["rnn", "lstm", "gru"], default="lstm")
  parser.add_argument("--config", choices=sorted({**CONFIGS, **QUICK_CONFIGS}), default="medium")
  parser.add_argument("--mode", choices=MODES, default="forward")
  parser.add_argument("--reps", type=int, default=20, help="rounds (one call of each a round)")
  args = parser.parse_args()

  import bptt_jax

  if bptt_jax.kernels().library is None:
    raise SystemExit(f"the kernels are not available: {bptt_jax.kernels().reason}")
  step = lambda **kw: compiled_step(args.cell, args.config, args.mode, **kw)  # noqa: E731
  dims = {**CONFIGS, **QUICK_CONFIGS}[args.config]
  if args.compare == "readout" and args.mode != "train":
    parser.error("--compare readout times a training step (--mode train)")
  if args.compare == "layout":
    steps = {"batch-major, in place": step(kernels="fused"),
             "time-major, transposes": step(kernels="fused", time_major=True)}
  elif args.compare == "readout":
    steps = {"readout's call": step(kernels="fused"),
             "XLA's products": step(kernels="fused", readout_call=False)}
  else:
    lengths = np.random.default_rng(0).integers(1, dims.T + 1, dims.B).astype(np.int32)
    steps = {"kernel, lengths": step(kernels="fused", lengths=lengths),
             "JAX path, lengths": step(kernels=False, lengths=lengths)}
  times = time_in_turn(steps, args.reps)
  print(f"{args.cell}/{args.config}/{args.mode}, (B, T, D, H) = {tuple(dims)}, "
        f"{args.reps} rounds")
  print_in_turn(times, 24)


if __name__ == "__main__":
  main()
