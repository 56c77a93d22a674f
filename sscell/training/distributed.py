"""Multi-host start-up: `jax.distributed.initialize` when the run spans processes, else nothing."""
from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the other processes of a multi-host run.

    Explicit arguments win (e.g. a local N-process run); otherwise JAX detects SLURM
    (`SLURM_NTASKS` > 1) and TPU pods itself. On one machine this does nothing.
    """
    if coordinator_address:
        # CPU-only runs (tests, a laptop) need a cross-process collectives backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize()
