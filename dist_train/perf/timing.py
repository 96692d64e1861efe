"""Timing helpers: device sync, CPU seconds of a process tree, images/s of a batch stream, peak memory,
and stdout kept for the JSON lines."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from typing import Iterator

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and of its live children (the DataLoader
    workers), from /proc; None without /proc. Unlike images/s, CPU time per image hardly
    moves when other jobs share the machine."""
    if not os.path.isdir("/proc"):
        return None
    me, ticks = os.getpid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        if int(entry.name) == me or int(fields[1]) == me:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def rate(batch_sizes: Iterator[int], seconds: float, warmup: int, device: torch.device) -> dict:
    """Images/s of a batch stream: `warmup` batches untimed (worker start-up, prefetch queue
    drained), then every batch until `seconds` have passed (at least one); with /proc also
    the CPU milliseconds per image of this process and its workers."""
    for _ in range(warmup):
        next(batch_sizes)
    sync(device)
    cpu = cpu_seconds()
    start = time.perf_counter()
    images = batches = 0
    while True:
        images += next(batch_sizes)
        batches += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    sync(device)
    elapsed = time.perf_counter() - start
    out = {"images": images, "batches": batches, "elapsed_s": round(elapsed, 3),
           "images_per_s": round(images / elapsed, 1)}
    if cpu is not None:
        out["cpu_ms_per_image"] = round(1000 * (cpu_seconds() - cpu) / images, 3)
    return out


def loader_warmup(workers: int) -> int:
    """Batches to drain before timing: the first of each worker plus the prefetch queue
    (DataLoader's prefetch_factor 2 per worker), so timing starts in the steady state."""
    return 3 * workers + 1 if workers else 2


def peak_memory(device: torch.device) -> dict:
    """The most memory this process has held so far: on CUDA the caching allocator's peak of
    allocated tensor bytes (`torch.cuda.max_memory_allocated`), on the CPU the peak resident set
    size (`ru_maxrss`, the whole process: interpreter, libraries, model, optimizer state and the
    largest set of live activations). Both are process-lifetime peaks, so compare two settings
    in two fresh processes (`bench memory` does)."""
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "memory_kind": "cuda_max_allocated"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_memory_mb": round(kib / 1024, 1), "memory_kind": "cpu_peak_rss"}


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout meanwhile (by us, the peers, their worker processes) goes to
    stderr, so stdout holds only the JSON lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
