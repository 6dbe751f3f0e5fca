"""One process of tests/test_multiprocess.py's barrier test (run as a script).

Both processes start a 2-process run the way the examples do, inside
``parallel.exit_if_a_process_is_lost``. The victim then dies (``os._exit(9)``,
as a kill would), while the survivor is where Orbax leaves a process while it
writes a checkpoint: the main thread waiting for a background thread that
waits in a coordination-service barrier, no collective running.

    python tests/barrier_worker.py PROCESS_ID VICTIM COORDINATOR_ADDRESS
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from orbax.checkpoint import multihost  # noqa: E402

from examples import parallel  # noqa: E402


def main():
  me, victim, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=2,
                             process_id=me, heartbeat_timeout_seconds=5)
  with parallel.exit_if_a_process_is_lost(address):
    multihost_utils.process_allgather(np.ones(2))  # both are up
    print(f"process {me} ready", flush=True)
    if me == victim:
      time.sleep(1.0)
      os._exit(9)  # pylint: disable=protected-access
    waiter = threading.Thread(
        target=multihost.sync_global_processes, args=("checkpoint",),
        daemon=True)
    waiter.start()
    waiter.join(timeout=60)
    print(f"process {me}: the barrier ended without an exit", flush=True)


if __name__ == "__main__":
  main()
