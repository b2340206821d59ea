"""Data-parallel training speed against devices and processes, on this machine.

One LSTM training step (full BPTT, readout, MSE, clip + Adam) on a global batch
of B sequences, timed in three layouts, each in processes of its own:

  1 process, 1 device        the reference
  1 process, 2 devices       JAX_NUM_CPU_DEVICES=2, the batch split along B
  2 processes, 1 device each jax.distributed on 127.0.0.1 (gloo all-reduce)

Each run compiles, warms up, then times ``--steps`` steps (blocking on the
result of each); the driver reports steps per second, examples per second and
each layout's speed as a ratio against the reference measured in the same run.
It also reports the bytes a data-parallel step must all-reduce: the gradient,
``4 * params`` bytes in float32, of which a ring all-reduce over ``n``
devices sends ``2 (n - 1) / n`` times per device.

On a CPU the "devices" are slices of the same cores, so more of them cannot
speed anything up: the figures measure the cost of splitting the batch and of
the all-reduce, not a speed-up.

  python experiments/scale_out.py                # B=64, T=50, H=128, 30 steps
  python experiments/scale_out.py --quick        # a smoke run
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
  """One process of one layout: prints a JSON line with the timed steps."""
  sys.path.insert(0, ROOT)
  import bptt_jax as bj
  from bptt_jax import sharding
  if args.num_processes > 1:
    sharding.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                        timeout=120)
  import jax
  import numpy as np

  mesh = sharding.data_mesh()
  cell = bj.lstm(args.hidden)
  k_cell, k_head = jax.random.split(jax.random.key(0))
  params = {"cell": cell.init(k_cell, args.features),
            "head": bj.init_readout(k_head, args.hidden, args.features)}
  n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
  tx = bj.optimizer(1e-3, max_norm=1.0)

  def step_loss(p, hs, ys):
    return bj.mse(bj.readout(p["head"], hs), ys)

  step = bj.train_step(bj.model_loss(cell, step_loss), tx)
  rng = np.random.default_rng(1)
  shape = (args.batch, args.steps_t, args.features)
  batch = {"xs": rng.normal(size=shape).astype(np.float32),
           "ys": rng.normal(size=shape).astype(np.float32)}
  rows = sharding.process_rows(args.batch)
  batch = sharding.global_batch({k: v[rows] for k, v in batch.items()}, mesh)
  state = sharding.shard_state(bj.TrainState.create(params, tx), mesh)
  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  if jax.process_index() == 0:
    print(json.dumps({"times": times, "params": n_params, "devices": jax.device_count(),
                      "processes": jax.process_count(), "loss": float(metrics["loss"])}))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(args, devices, processes):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  port = free_port()
  common = [sys.executable, os.path.abspath(__file__), "--worker", "--port", str(port),
            "--num-processes", str(processes), "--batch", str(args.batch), "--steps-t",
            str(args.steps_t), "--hidden", str(args.hidden), "--features", str(args.features),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
  procs = [subprocess.Popen(common + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outs = [p.communicate(timeout=1800) for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"worker failed:\n{err[-3000:]}")
  line = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1]
  return json.loads(line)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64, help="global batch B")
  parser.add_argument("--steps-t", type=int, default=50, help="sequence length T")
  parser.add_argument("--hidden", type=int, default=128, help="LSTM hidden units H")
  parser.add_argument("--features", type=int, default=32, help="input features D")
  parser.add_argument("--steps", type=int, default=30, help="timed steps per layout")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
  parser.add_argument("--out", default=None, help="output folder (results/scale_out)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  if args.quick:
    args.batch, args.steps_t, args.hidden, args.features, args.steps = 8, 10, 16, 4, 5

  import numpy as np
  layouts = [("1 process, 1 device", 1, 1), ("1 process, 2 devices", 2, 1),
             ("2 processes, 1 device each", 1, 2)]
  rows = {}
  for name, devices, processes in layouts:
    r = run(args, devices, processes)
    median = float(np.median(r["times"]))
    rows[name] = {"devices": r["devices"], "processes": r["processes"],
                  "median_step_s": median, "steps_per_s": 1 / median,
                  "examples_per_s": args.batch / median, "final_loss": r["loss"],
                  "params": r["params"]}
    print(f"{name:28s} {1 / median:8.2f} steps/s  {args.batch / median:9.1f} examples/s",
          flush=True)
  ref = rows[layouts[0][0]]["steps_per_s"]
  n_params = rows[layouts[0][0]]["params"]
  grad_bytes = 4 * n_params
  for row in rows.values():
    n = row["devices"]
    row["speed_vs_1_device"] = row["steps_per_s"] / ref
    row["allreduce_bytes_per_device"] = 2 * (n - 1) / n * grad_bytes
    print(f"  {row['devices']} device(s) in {row['processes']} process(es): "
          f"{row['speed_vs_1_device']:.2f}x the 1-device speed, all-reduce sends "
          f"{row['allreduce_bytes_per_device'] / 1e3:.1f} kB per device per step")
  out = args.out or os.path.join(ROOT, "results", "scale_out")
  os.makedirs(out, exist_ok=True)
  settings = {k: getattr(args, k) for k in ("batch", "steps_t", "hidden", "features", "steps",
                                             "warmup", "quick")}
  with open(os.path.join(out, "figures.json"), "w") as f:
    json.dump({"settings": settings, "gradient_bytes": grad_bytes, "layouts": rows,
               "cpus": os.cpu_count()}, f, indent=1)
  print(f"gradient: {n_params} params = {grad_bytes / 1e3:.1f} kB float32; wrote "
        f"{os.path.join(out, 'figures.json')}")


if __name__ == "__main__":
  main()
