"""The shard writer's parallel map: worker processes that do not depend on the caller.

multiprocessing's spawn and forkserver children re-run the caller's `__main__` before their
first task (a script that imported torch pays that import in every worker; `python -` left the
forkserver spinning), and fork inherits locks held by other threads. The workers here are plain
subprocesses of `dist_train.shardset.worker` that import the image functions and nothing else,
fed over pipes (protocol in that module), so the map costs the same from the CLI, a script, a
notebook kernel or stdin.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from dist_train.errors import RunFailed

from .images import check_image
from .worker import FUNCTIONS, frame, read_exact, read_frame

MAX_REQUEST = 32 * 1024  # bytes per request, well under a pipe's buffer: writes never deadlock
IN_FLIGHT = 2  # requests per worker: one computing, one queued
AHEAD = 4  # chunks per worker decoded ahead of the one the caller waits for (bounds memory)
# sys.path[0] is the caller's folder under -c: the package's own root goes first
# glibc malloc in the workers: keep freed memory up to these sizes instead of handing it back to
# the kernel after every image (each decode, resize and encode otherwise touches fresh pages:
# ~400 page faults and ~1 ms of system time per 384x512 photo, a fifth of the work). A worker
# keeps at most TRIM bytes it does not use; allocations over MMAP still go straight to the kernel.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from dist_train.shardset.worker import main; main()"


def pool_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str, progress: bool) -> Iterator[Any]:
    """Ordered map of `fn` (one of `worker.FUNCTIONS`) over `items` in `workers` processes
    (in-process for 1), with a progress bar on stderr."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        chunk = max(1, min(16, len(items) // (workers * 8)))  # small: no worker idles long at the end
        with _workers(workers if _session else min(workers, len(items))) as pool:
            for result in pool.imap(fn, items, chunk):
                yield result
                bar.update()
    finally:
        bar.close()


_session: list[WorkerPool | None] = []  # inside `reuse_workers`: the pool kept for the next map


@contextlib.contextmanager
def _workers(n: int) -> Iterator[WorkerPool]:
    """A pool of n workers: the session's (started once, kept while it is clean) or a fresh one."""
    if not _session:
        with WorkerPool(n) as pool:
            yield pool
        return
    pool = _session[-1]
    if pool is None or len(pool.procs) != n or not pool.clean:
        if pool is not None:
            pool.__exit__(None, None, None)
        pool = _session[-1] = WorkerPool(n)
    yield pool


def reuse_workers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: every `pool_map` during a call of `fn` shares one set of worker processes
    (the writer's check and write passes start them once)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _session.append(None)
        try:
            return fn(*args, **kwargs)
        finally:
            pool = _session.pop()
            if pool is not None:
                pool.__exit__(None, None, None)
    return wrapper


def _chunks(name: str, items: Sequence[Any], size: int) -> list[bytes]:
    """Requests of up to `size` items and MAX_REQUEST bytes each, numbered in order."""
    requests: list[bytes] = []
    start = 0
    while start < len(items):
        n = min(size, len(items) - start)
        while True:
            body = json.dumps([len(requests), name, list(items[start:start + n])]).encode()
            if len(body) <= MAX_REQUEST or n == 1:
                break
            n = max(1, n // 2)
        requests.append(frame(body))
        start += n
    return requests


def _decode(stream: Any) -> tuple[int, list[Any]]:
    """One response: (seq, results in task order); a task that raised becomes RunFailed."""
    data = read_frame(stream)
    if data is None:
        raise EOFError("worker closed its output")
    seq, heads = json.loads(data)
    results = []
    for h in heads:
        if h[0] == "bytes":
            payload = read_exact(stream, h[2])
            if len(payload) < h[2]:
                raise EOFError("truncated payload")
            results.append((h[1], payload))
        elif h[0] == "error":
            results.append(RunFailed(f"shard writer: {h[1]}"))
        else:
            results.append(h[0])
    return seq, results


class WorkerPool:
    """`n` worker subprocesses; `imap` hands out chunks to whichever worker is free."""

    def __init__(self, n: int):
        root = str(Path(__file__).resolve().parents[2])
        env = {**MALLOC_ENV, **os.environ}  # the user's own malloc settings win
        self.procs = [subprocess.Popen([sys.executable, "-c", BOOT, root], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, bufsize=0, env=env) for _ in range(n)]
        self.clean = True  # no request is outstanding

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            if not self.clean:  # a worker may be blocked writing a response nobody reads
                p.kill()
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any], chunk: int) -> Iterator[Any]:
        name = fn.__name__
        if FUNCTIONS.get(name) is not fn:
            raise ValueError(f"{name}: not a shard worker function")
        requests = _chunks(name, items, chunk)
        self.clean = False
        busy = {p: 0 for p in self.procs}
        done: dict[int, list[Any]] = {}
        sent = want = 0
        sel = selectors.DefaultSelector()
        for p in self.procs:
            sel.register(p.stdout, selectors.EVENT_READ, p)

        def feed() -> None:  # one request per worker and pass: the first ones go to every worker
            nonlocal sent
            for depth in range(IN_FLIGHT):
                for p in self.procs:
                    if busy[p] <= depth and sent < len(requests) and sent - want < AHEAD * len(self.procs):
                        self._send(p, requests[sent])
                        busy[p] += 1
                        sent += 1

        feed()
        try:
            while want < len(requests):
                if want in done:
                    for r in done.pop(want):
                        if isinstance(r, RunFailed):
                            raise r
                        yield r
                    want += 1
                    feed()
                    continue
                for key, _ in sel.select():
                    p = key.data
                    try:
                        seq, results = _decode(p.stdout)
                    except (EOFError, OSError, ValueError) as e:
                        raise RunFailed(f"shard writer: a worker process failed (exit status {p.poll()}): {e}") from None
                    busy[p] -= 1
                    done[seq] = results
                feed()
            self.clean = True
        finally:
            sel.close()

    @staticmethod
    def _send(p: subprocess.Popen, request: bytes) -> None:
        try:
            view = memoryview(request)
            while view:
                view = view[p.stdin.write(view):]
        except OSError as e:
            raise RunFailed(f"shard writer: a worker process failed (exit status {p.poll()}): {e}") from None


def startup_seconds(n: int) -> float:
    """Seconds from starting `n` workers to each one's first answer (a trivial task each)."""
    start = time.perf_counter()
    with WorkerPool(n) as pool:
        list(pool.imap(check_image, [("", 1)] * n, 1))  # a missing file: answered at once
    return time.perf_counter() - start
