"""What every experiment script shares: output folder, JSON figures, plots, timing."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing


def results_dir(name: str, out: str | None = None) -> str:
  """``results/<name>/`` (or ``out``), created."""
  path = out or os.path.join(ROOT, "results", name)
  os.makedirs(path, exist_ok=True)
  return path


def machine() -> dict:
  return {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "cpus": os.cpu_count(),
      "processor": platform.machine(),
  }


def write_json(path: str, figures: dict, args=None) -> None:
  """Writes the measured figures, the settings and the machine to ``path``."""
  record = {"figures": figures, "machine": machine(),
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}
  if args is not None:
    record["settings"] = vars(args)
  with open(path, "w") as f:
    json.dump(record, f, indent=2, default=float)
  print(f"wrote {os.path.relpath(path, ROOT)}")


def save_plot(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {os.path.relpath(path, ROOT)}")


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, in MB (Linux ``ru_maxrss``)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
  """``with Timer() as t: ...; t.seconds``, after blocking on JAX work."""

  def __enter__(self):
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start


def compiled_memory_mb(fn, *args) -> float:
  """Peak temporary memory XLA plans for ``jax.jit(fn)(*args)``, in MB.

  From the compiled executable's memory analysis: the buffers live during the
  call beyond its arguments and outputs (activations kept for the backward
  pass, gradients, workspace).
  """
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return stats.temp_size_in_bytes / 2**20


class KeepBest:
  """An ``eval_fn`` for :func:`bptt_jax.fit` that keeps the params of the best score.

  Each call scores ``params`` with ``score_fn(params) -> float``, appends the
  score to ``scores`` and, if it is the best so far (highest for ``mode="max"``,
  lowest for ``"min"``), keeps ``params`` and its position ``index``. Early
  stopping without a second pass: train for a fixed number of epochs, then use
  ``keep.params``.
  """

  def __init__(self, score_fn, name: str, *, mode: str = "max"):
    if mode not in ("max", "min"):
      raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    self.score_fn, self.name, self.sign = score_fn, name, 1 if mode == "max" else -1
    self.scores, self.params, self.index = [], None, None

  def __call__(self, params) -> dict:
    score = float(self.score_fn(params))
    if self.index is None or self.sign * score > self.sign * self.scores[self.index]:
      # A copy: the train step donates the state's buffers to the next state.
      self.params, self.index = jax.tree_util.tree_map(jnp.copy, params), len(self.scores)
    self.scores.append(score)
    return {self.name: score}

  @property
  def best(self) -> float:
    return self.scores[self.index]
