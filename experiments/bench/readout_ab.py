"""``bj.readout``'s backward pass alone: the extension's call against XLA's products, paired
in one process, for a range of row counts.

  cd experiments && python -m bench.readout_ab --hidden 128 --outputs 32 --rows 256 1024 4096

For each row count N, ``jax.grad`` of ``sum(sin(readout(params, hs)))`` with respect to the
readout's parameters and ``hs`` ``[N, H]`` is compiled twice under
``bptt_jax.use_kernels("fused")``: with the call (``_kernel.dense``, whatever the size) and
with XLA's products (``bptt_jax._kernel.dense_usable`` answering no). The two run in turn,
one call each per round, for ``--reps`` rounds; their medians and the median and quartiles
of the per-round ratios to the call's time are printed. ``_kernel.DENSE_MIN_MACS``, the
size from which the readout takes the call, comes from these ratios.
"""

import argparse

from .cases import print_in_turn, time_in_turn


def compiled_grad(rows: int, hidden: int, outputs: int, call: bool):
  """``step()`` of the readout's gradient at ``[rows, hidden] x [hidden, outputs]``, with the
  extension's call or with XLA's products."""
  import jax
  import jax.numpy as jnp

  import bptt_jax as bj
  from bptt_jax import _kernel

  params = bj.init_readout(jax.random.key(0), hidden, outputs)
  hs = jax.random.normal(jax.random.key(1), (rows, hidden))
  loss = lambda params, hs: jnp.sum(jnp.sin(bj.readout(params, hs)))  # noqa: E731
  dense_usable, least = _kernel.dense_usable, _kernel.DENSE_MIN_MACS
  try:
    _kernel.DENSE_MIN_MACS = 0
    if not call:
      _kernel.dense_usable = lambda x, W: False
    with bj.use_kernels("fused"):  # traced now, with the switches in place
      fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, hs).compile()
  finally:
    _kernel.dense_usable, _kernel.DENSE_MIN_MACS = dense_usable, least
  if ("bptt_dense_backward" in fn.as_text()) != call:
    raise SystemExit(f"rows {rows}: the gradient {'lacks' if call else 'has'} the call")
  return lambda: jax.block_until_ready(fn(params, hs))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=512, help="H: the readout's inputs")
  parser.add_argument("--outputs", type=int, default=128, help="O: the readout's outputs")
  parser.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384],
                      help="N: positions (batch x time), one comparison each")
  parser.add_argument("--reps", type=int, default=100, help="rounds (one call of each a round)")
  args = parser.parse_args()
  for name, values in (("rows", args.rows), ("hidden", [args.hidden]),
                       ("outputs", [args.outputs]), ("reps", [args.reps])):
    if min(values) < 1:
      parser.error(f"--{name} must be positive, got {min(values)}")

  import bptt_jax

  if bptt_jax.kernels().library is None:
    raise SystemExit(f"the kernels are not available: {bptt_jax.kernels().reason}")
  for rows in args.rows:
    steps = {"readout's call": compiled_grad(rows, args.hidden, args.outputs, True),
             "XLA's products": compiled_grad(rows, args.hidden, args.outputs, False)}
    times = time_in_turn(steps, args.reps)
    print(f"[{rows}, {args.hidden}] x [{args.hidden}, {args.outputs}]: "
          f"{rows * args.hidden * args.outputs:,} multiply-adds, {args.reps} rounds")
    print_in_turn(times, 16)


if __name__ == "__main__":
  main()
