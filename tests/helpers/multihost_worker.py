"""One process of a small ``jax.distributed`` job, for the process-group tests.

  python -m tests.helpers.multihost_worker PORT NUM_PROCESSES PROCESS_ID SCENARIO OUT_JSON

Joins the job, runs a few collectives of :class:`asymml_jax.distributed.ProcessGroup`
and writes what it saw to ``OUT_JSON``.  Scenarios:

* ``ok``: all-reduce (mean and sum), all-gather, broadcast, then a normal exit.
* ``fail``: process 1 raises inside ``guard()`` at step 3; the others must
  stop with ``PeerFailed`` (exit status 75, the failed one 1).
* ``stuck``: as ``fail``, but process 0 is busy (sleeping) in Python when the
  failure comes and never reaches a collective: its watcher must end it.
* ``out_of_step``: process 1 labels its second collective differently.

Everything here is test scaffolding.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
  port, n, pid, scenario, out = argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5]
  from asymml_jax import distributed as dist
  group = dist.initialize(dist.MultihostConfig(
      coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
      abort_timeout_s=4.0, heartbeat_timeout_s=10))
  seen: dict = {"process_id": pid}

  def dump():
    with open(out, "w") as f:
      json.dump(seen, f)

  try:
    with group.guard():
      mean, total = group.all_reduce(
          {"g": np.full((3,), float(pid + 1), np.float32)},
          {"count": np.float32(10 * (pid + 1))}, label="step 0")
      seen["mean"] = np.asarray(mean["g"]).tolist()
      seen["total"] = float(total["count"])
      seen["gather"] = group.all_gather(np.int32(100 + pid), label="gather").tolist()
      b = group.broadcast({"w": np.full((2,), float(pid), np.float32)}, label="bcast")
      seen["bcast"] = np.asarray(b["w"]).tolist()
      if scenario == "out_of_step":
        group.all_reduce({"x": np.float32(1)}, label="eval" if pid == 1 else "step 1")
      for step in range(1, 40):
        if scenario in ("fail", "stuck") and pid == 1 and step == 3:
          seen["failed_at"] = time.time()
          dump()
          raise RuntimeError("enclave of process 1 died (simulated)")
        if scenario == "stuck" and pid == 0 and step == 3:
          dump()
          time.sleep(120)  # never reaches the next collective
        group.all_reduce({"x": np.float32(step)}, label=f"step {step}")
        time.sleep(0.05)
        if scenario == "ok" and step == 3:
          break
  except dist.DistributedError as e:
    seen["error"] = f"{type(e).__name__}: {e}"
    seen["stopped_at"] = time.time()
    dump()
    print(f"error: {e}", file=sys.stderr, flush=True)
    return dist.exit_code(e)
  except RuntimeError as e:
    seen["error"] = str(e)
    dump()
    return dist.EXIT_FAILED
  finally:
    group.close()
  dump()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
