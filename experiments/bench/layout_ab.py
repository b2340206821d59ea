"""The benchmark's step with the CPU kernel reading batch-major sequences in place, against
the same kernel given time-major ones with XLA's transposes around it, in one process.

  cd experiments && python -m bench.layout_ab --cell lstm --config medium --mode forward

Builds the bptt_jax step of the benchmark (:func:`bench.cases.bptt_jax_case`: the cell,
the readout and, for training, the mean squared error, clipping and Adam) twice under
``bptt_jax.use_kernels("fused")``: as it is (``unroll`` hands the kernel ``[B, T, D]``
and gets ``[B, T, H]`` back) and with ``unroll`` traced as ``swapaxes``, ``unroll(...,
time_major=True)``, ``swapaxes`` (the kernel on ``[T, B, .]``; the layout before the
kernels took batch-major sequences). The two steps run in turn, one call each per
round, for ``--reps`` rounds; their medians and the median of the per-round ratios are
printed, so that a machine whose speed drifts still gives a fair comparison.
"""

import argparse

from .cases import (
  CONFIGS,
  MODES,
  QUICK_CONFIGS,
  bptt_jax_case,
  jax_stepper,
  print_in_turn,
  time_in_turn,
)


def compiled_step(cell: str, config: str, mode: str, time_major: bool):
  """``step()`` of the benchmark's bptt_jax case; with ``time_major``, ``unroll`` is traced
  on time-major sequences with transposes around it."""
  import jax.numpy as jnp

  import bptt_jax as bj

  unroll = bj.unroll

  def transposed(cell, params, xs, **kwargs):
    carry, hs = unroll(cell, params, jnp.swapaxes(xs, 0, 1), time_major=True, **kwargs)
    return carry, jnp.swapaxes(hs, 0, 1)

  case = bptt_jax_case(cell, {**CONFIGS, **QUICK_CONFIGS}[config], mode, {})
  try:
    if time_major:
      bj.unroll = transposed
    with bj.use_kernels("fused"):  # traced now, with the swap in place
      fn = case.fn.lower(case.state, case.batch).compile()
  finally:
    bj.unroll = unroll
  return jax_stepper(case, fn)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cell", choices=["rnn", "lstm", "gru"], default="lstm")
  parser.add_argument("--config", choices=sorted({**CONFIGS, **QUICK_CONFIGS}), default="medium")
  parser.add_argument("--mode", choices=MODES, default="forward")
  parser.add_argument("--reps", type=int, default=20, help="rounds (one call of each a round)")
  args = parser.parse_args()

  import bptt_jax

  if bptt_jax.kernels().library is None:
    raise SystemExit(f"the kernels are not available: {bptt_jax.kernels().reason}")
  steps = {"batch-major, in place": compiled_step(args.cell, args.config, args.mode, False),
           "time-major, transposes": compiled_step(args.cell, args.config, args.mode, True)}
  times = time_in_turn(steps, args.reps)
  dims = tuple({**CONFIGS, **QUICK_CONFIGS}[args.config])
  print(f"{args.cell}/{args.config}/{args.mode}, (B, T, D, H) = {dims}, {args.reps} rounds")
  print_in_turn(times, 24)


if __name__ == "__main__":
  main()
