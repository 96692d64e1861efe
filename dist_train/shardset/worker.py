"""A shard writer worker: `python -m dist_train.shardset.worker`, started by `dist_train.shardset.pool`.

It imports only the image functions (PIL, numpy), never the caller's `__main__`, so it starts in
the same ~0.2 s whether the writer was called from the CLI, from a script that imported torch,
from `python -` or from a notebook kernel (multiprocessing's spawn and forkserver children re-run
the caller's main module first: a torch import each, or a hang when there is none to re-run).

Protocol on stdin/stdout, between this process and the pool that started it (no pickle):
request  = 4-byte little-endian length + JSON [seq, function name, [task, ...]]
response = 4-byte length + JSON [seq, [result, ...]] + the bytes its results refer to, where a
result is [value] (JSON), ["bytes", value, n] (a (value, bytes) pair: the value as JSON, e.g. a
member's extension, and the next n payload bytes) or ["error", text] (the function raised).
EOF on stdin: exit.
"""

from __future__ import annotations

import json
import signal
import struct
import sys
from typing import Any, BinaryIO, Callable

from .images import check_and_encode, check_image, encode_image

FUNCTIONS: dict[str, Callable[[Any], Any]] = {"check_image": check_image, "encode_image": encode_image,
                                              "check_and_encode": check_and_encode}
HEADER = struct.Struct("<I")


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Exactly n bytes (a raw pipe may return fewer per read); fewer only at EOF."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next length-prefixed frame; None at a clean EOF."""
    head = read_exact(stream, HEADER.size)
    if not head:
        return None
    if len(head) < HEADER.size:
        raise EOFError("truncated frame header")
    (n,) = HEADER.unpack(head)
    data = read_exact(stream, n)
    if len(data) < n:
        raise EOFError("truncated frame")
    return data


def frame(data: bytes) -> bytes:
    return HEADER.pack(len(data)) + data


def encode_results(seq: int, results: list[Any]) -> bytes:
    """One response: the JSON header frame followed by the payload bytes it announces."""
    heads, payload = [], []
    for r in results:
        if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], bytes):
            heads.append(["bytes", r[0], len(r[1])])
            payload.append(r[1])
        elif isinstance(r, _Failed):
            heads.append(["error", r.text])
        else:
            heads.append([r])
    return frame(json.dumps([seq, heads]).encode()) + b"".join(payload)


class _Failed:
    def __init__(self, text: str):
        self.text = text


def _call(fn: Callable[[Any], Any], task: Any) -> Any:
    try:
        return fn(tuple(task) if isinstance(task, list) else task)
    except Exception as e:  # sent back; the pool raises it in the caller
        return _Failed(f"{type(e).__name__}: {e}")


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    while (request := read_frame(inp)) is not None:
        seq, name, tasks = json.loads(request)
        fn = FUNCTIONS[name]
        out.write(encode_results(seq, [_call(fn, t) for t in tasks]))
        out.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's: it closes our stdin
    # numba (the compiled resize of long jobs) probes for BLAS by importing scipy.linalg: 0.2 s of
    # its ~0.5 s start in every worker. No worker function uses BLAS: the probe finds none.
    sys.modules.setdefault("scipy.linalg.cython_blas", None)  # type: ignore[arg-type]
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the caller went away
        pass


if __name__ == "__main__":
    main()
