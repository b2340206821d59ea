import sys, time, numpy as np, jax, jax.numpy as jnp
import bptt_jax as bj
from bench.cases import CONFIGS, bptt_jax_case, jax_stepper
from bptt_jax import _linear_rnn as L

def pair_where(k):
  e = jnp.exp(-jnp.abs(k)); r = 1 / (1 + e); pos = k >= 0
  return jnp.where(pos, e * r, r), jnp.where(pos, r, e * r)

def make_pair(prim):
  f = jax.custom_jvp(prim)
  @f.defjvp
  def _(p, t):
    a, z = f(p[0]); d = a * z * t[0]
    return (a, z), (-d, d)
  return f

VARIANTS = {
  "orig": lambda k, h: (jax.nn.sigmoid(-k), jax.nn.sigmoid(k) * h),
  "one_minus": lambda k, h: (lambda a: (a, (1 - a) * h))(jax.nn.sigmoid(-k)),
  "jvp_where": lambda k, h: (lambda az: (az[0], az[1] * h))(make_pair(pair_where)(k)),
  "jvp_logistic": lambda k, h: (lambda az: (az[0], az[1] * h))(make_pair(lambda k: (jax.nn.sigmoid(-k), jax.nn.sigmoid(k)))(k)),
}

def factory(fn):
  def min_gru(H):
    cell = L.min_gru(H)
    def coefficients(params, xs):
      k, h = L._affine_blocks(params, xs, 2)
      return fn(k, h)
    return cell._replace(linear=cell.linear._replace(coefficients=coefficients))
  return min_gru

steps = {}
saved = bj.min_gru
for name in sys.argv[1:]:
  bj.min_gru = factory(VARIANTS[name])
  case = bptt_jax_case("min_gru", CONFIGS["long"], "train", {"method": "sequential"})
  steps[name] = jax_stepper(case, case.fn.lower(case.state, case.batch).compile())
  steps[name]()
bj.min_gru = saved
res = {e: [] for e in steps}
for r in range(11):
  for e, s in steps.items():
    t = time.perf_counter(); s(); res[e].append(time.perf_counter() - t)
base = np.array(res[sys.argv[1]])
for e in res: print(e, "%.1f ms" % (1e3 * np.median(res[e])), "ratio %.3f" % np.median(np.array(res[e]) / base))
