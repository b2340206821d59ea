"""The CPU sequence kernels' two calls alone, through JAX: time and page faults.

  cd experiments && python -m bench.kernel_calls --cell lstm --config long --reps 5

Jits the kernel's forward call (training: it writes the workspace) and, apart,
its forward and backward calls as ``jax.vjp`` runs them, on random float32
inputs of the benchmark's shapes, with no readout, loss or optimizer around
them. Each round runs the forward function once and the forward-and-backward
one once; the best and median times over ``--reps`` rounds are printed with
the minor page faults per round (first touches of fresh memory: XLA hands the
calls fresh output buffers on every call). Run it with and without the tuned
allocator's environment (``bench.cases.TUNED_MALLOC``) to see what the
allocator costs the calls.
"""

import argparse
import resource
import time

import numpy as np

from .cases import CONFIGS, GATES, QUICK_CONFIGS

CELLS = {"rnn": "rnn_tanh", "lstm": "lstm", "gru": "gru"}  # the kernels' names


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cell", choices=sorted(CELLS), default="lstm")
  parser.add_argument("--config", choices=sorted({**CONFIGS, **QUICK_CONFIGS}), default="long")
  parser.add_argument("--family", choices=["fused", "rnn"], default="fused")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  import bptt_jax
  from bptt_jax import _kernel

  bptt_jax.use_kernels(args.family)
  if _kernel._library()[0] is None:
    raise SystemExit(f"the kernels are not available: {bptt_jax.kernels().reason}")
  B, T, D, H = {**CONFIGS, **QUICK_CONFIGS}[args.config]
  kind, G = _kernel._KINDS[CELLS[args.cell]], GATES[args.cell]
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.1)

  bias_rows = 4 if args.cell == "gru" else G  # the GRU's fourth row: b_hn
  inputs = (normal(D, G * H), normal(H, G * H), normal(bias_rows * H), normal(T, B, D),
            normal(B, H), normal(B, H) if args.cell == "lstm" else jnp.zeros((0,), jnp.float32),
            jnp.zeros((0,), jnp.int32))  # no lengths: every sequence runs all T steps
  dhs = normal(T, B, H)
  config = (f"bptt_{args.family}", kind, False)  # time-major

  @jax.jit
  def forward(*inputs):
    return _kernel._forward(config, True, *inputs)

  @jax.jit
  def forward_backward(dhs, *inputs):
    out, vjp = jax.vjp(lambda *a: _kernel._rnn(config, *a), *inputs)
    return vjp((dhs, jnp.zeros_like(out[1]), jnp.zeros_like(out[2])))

  jax.block_until_ready(forward(*inputs))
  jax.block_until_ready(forward_backward(dhs, *inputs))
  fwd, both = [], []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(args.reps):
    t0 = time.perf_counter()
    jax.block_until_ready(forward(*inputs))
    t1 = time.perf_counter()
    jax.block_until_ready(forward_backward(dhs, *inputs))
    t2 = time.perf_counter()
    fwd.append((t1 - t0) * 1e3)
    both.append((t2 - t1) * 1e3)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.reps
  print(f"{args.cell}/{args.config} ({args.family}), (B, T, D, H) = {(B, T, D, H)}, "
        f"{args.reps} rounds: forward best {min(fwd):.3g} ms, median {np.median(fwd):.3g}; "
        f"forward + backward best {min(both):.3g} ms, median {np.median(both):.3g}; "
        f"{faults:,.0f} minor page faults per round")


if __name__ == "__main__":
  main()
