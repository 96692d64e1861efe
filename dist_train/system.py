"""Facts about the machine that several packages need."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask under taskset/Slurm), not the whole host's:
    the default shard workers, the trainer's CPU threads and the benchmarks' worker counts."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
