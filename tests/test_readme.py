"""The README's Python examples run as written, in order, in one namespace."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_examples_run():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert len(blocks) >= 3
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["metrics"]["loss"].shape == (4,)  # tbptt: ceil(100 / 25) chunks
  assert namespace["norms"].shape == (32, 100)
  assert namespace["lm_metrics"]["loss"].shape == (3,)  # ceil(59 / 20) chunks
  assert bool(namespace["lm_metrics"]["finite"].all())
