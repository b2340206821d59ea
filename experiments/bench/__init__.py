"""The parts of ``experiments/benchmark.py``, each readable on its own.

  cases    what is measured: the shapes, the implementations, and each one's step
  worker   the worker process: one measurement each, started and read by ``spawn``
  profile  where the time of a JAX step goes: per-kernel times and page faults
  report   pooled medians and ratios, markdown tables, plots
"""
