"""The benchmark's minGRU/minLSTM train step, this checkout against a git ref, in one process.

  cd experiments && python -m bench.linear_ab --ref main --cell min_gru --method sequential

Builds the step of ``--parallel-vs-T`` (:func:`bench.cases.bptt_jax_case`: the
cell, the readout, the mean squared error, clipping and Adam) four times: with
this checkout's ``bptt_jax/_linear_rnn.py`` and with the one at ``--ref``
(``git show``, loaded in its place), each also with the linear scan replaced
by a stand-in that returns ``b`` (same shapes, no loop): the time of
everything but the loop (where the C++ kernel runs the loop instead, it is not
stubbed). ``--no-kernels-too`` adds both versions traced under
``bptt_jax.use_kernels(False)``; ``--gru`` adds the fused GRU's step. The steps run in
turn, one call each per round, for ``--reps`` rounds; each one's median and its
median ratio to the first (ratios of calls in the same round) are printed, so
that a machine whose speed drifts still gives a fair comparison.
"""

import argparse
import importlib.util
import os
import subprocess
import tempfile

from .cases import CONFIGS, bptt_jax_case, jax_stepper, print_in_turn, time_in_turn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_ref_module(ref: str):
  """``bptt_jax/_linear_rnn.py`` as it is at git ``ref``, as a module of its own."""
  source = subprocess.run(["git", "show", f"{ref}:bptt_jax/_linear_rnn.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location(f"linear_rnn_at_{ref}", f.name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  os.unlink(f.name)
  return module


def compiled_step(cell, method, module=None, stub=False, kernels=True):
  """``step()`` of the benchmark's train case, traced with ``module``'s linear recurrence
  (this checkout's when ``None``), its scan replaced by ``b`` if ``stub``, and under
  ``bptt_jax.use_kernels(kernels)``."""
  import jax.numpy as jnp  # noqa: F401  (jax loads before the module is swapped)

  import bptt_jax as bj
  from bptt_jax import _linear_rnn

  module = module or _linear_rnn
  # The scan that run() calls: _scan here, linear_scan in versions before it.
  scan_name = "_scan" if hasattr(module, "_scan") else "linear_scan"
  saved = (_linear_rnn.run, bj.min_gru, bj.min_lstm, getattr(module, scan_name))
  try:
    _linear_rnn.run, bj.min_gru, bj.min_lstm = module.run, module.min_gru, module.min_lstm
    if stub:
      setattr(module, scan_name, lambda config, a, b, s0: b)
    unroll = {} if cell == "gru" else {"method": method}
    case = bptt_jax_case(cell, CONFIGS["long"], "train", unroll)
    with bj.use_kernels(kernels):  # traced now, with the swap in place
      fn = case.fn.lower(case.state, case.batch).compile()
  finally:
    _linear_rnn.run, bj.min_gru, bj.min_lstm = saved[:3]
    setattr(module, scan_name, saved[3])
  return jax_stepper(case, fn)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ref", default="main", help="git ref to compare with")
  parser.add_argument("--cell", default="min_gru", choices=["min_gru", "min_lstm"])
  parser.add_argument("--method", default="sequential", choices=["sequential", "parallel"])
  parser.add_argument("--reps", type=int, default=9, help="rounds (one call of each a round)")
  parser.add_argument("--gru", action="store_true", help="also time the fused GRU's step")
  parser.add_argument("--no-kernels-too", dest="no_kernels", action="store_true",
                      help="also time both versions under bptt_jax.use_kernels(False)")
  args = parser.parse_args()

  ref = load_ref_module(args.ref)
  steps = {
      f"{args.ref}": compiled_step(args.cell, args.method, ref),
      f"{args.ref}, loop stubbed": compiled_step(args.cell, args.method, ref, stub=True),
      "this checkout": compiled_step(args.cell, args.method),
      "this checkout, loop stubbed": compiled_step(args.cell, args.method, stub=True),
  }
  if args.no_kernels:
    steps[f"{args.ref}, no kernels"] = compiled_step(args.cell, args.method, ref, kernels=False)
    steps["this checkout, no kernels"] = compiled_step(args.cell, args.method, kernels=False)
  if args.gru:
    steps["fused GRU"] = compiled_step("gru", args.method)
  times = time_in_turn(steps, args.reps)
  print(f"{args.cell}, {args.method}, (B, T, D, H) = {tuple(CONFIGS['long'])}, {args.reps} rounds")
  print_in_turn(times, 30)


if __name__ == "__main__":
  main()
