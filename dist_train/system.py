"""Facts about the machine that several packages need."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask under taskset/Slurm), not the whole host's:
    the default shard workers, the trainer's CPU threads and the benchmarks' worker counts."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Data loader workers per process when --workers is not given: the cores this process may
    use, shared by the processes of this machine (LOCAL_WORLD_SIZE under a launcher), less one
    for the process itself, at most 8. 2 cores and 2 processes: 0 (each process loads its own
    batches); 16 cores and 1 process: 8."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(0, min(8, usable_cpus() // local - 1))
