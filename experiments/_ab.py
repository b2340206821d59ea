import sys, time, numpy as np, jax
from bench.cases import CONFIGS, bptt_jax_case, jax_stepper
from bptt_jax import _linear_rnn
steps = {}
for spec in sys.argv[1:]:
  e, u = map(int, spec.split(","))
  _linear_rnn.CHUNK_BYTES = 1 << e
  case = bptt_jax_case("min_gru", CONFIGS["long"], "train", {"method": "sequential", "unroll": u})
  steps[spec] = jax_stepper(case, case.fn.lower(case.state, case.batch).compile())
  steps[spec]()
res = {e: [] for e in steps}
for r in range(9):
  for e, s in steps.items():
    t = time.perf_counter(); s(); res[e].append(time.perf_counter() - t)
for e in res: print(e, "%.1f ms" % (1e3 * np.median(res[e])))
