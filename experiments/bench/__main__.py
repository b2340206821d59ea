"""A worker process: ``python -m bench '<task JSON>'`` runs one task and prints its result.

Started by :func:`bench.worker.spawn`, one process per measurement, with only
the framework it measures imported.
"""

import json
import sys

from . import profile, worker

TASKS = {"time": worker.worker_time, "memory": worker.worker_memory,
         "peak": worker.worker_peak,
         "deer_iters": worker.worker_deer_iters, "profile": profile.worker_profile}

worker.run_worker(json.loads(sys.argv[1]), TASKS)
