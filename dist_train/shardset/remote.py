"""Reading one small file of a shard set at a URL (its `_info.json`), with failures as one line.

webdataset's gopen runs curl, aws or gsutil and, when they fail, raises an error holding the
whole argument tuple, while the command's own explanation goes straight to the terminal. Here
http(s) is read with urllib (status, refusal or timeout in words), and every other scheme still
goes through gopen (pipe:, s3://, gs://, handlers users register) with the command's stderr
captured, so the line can say how it exited and why.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Iterator

import webdataset as wds

from dist_train.errors import UserError

HTTP_TIMEOUT_ENV = "DIST_TRAIN_HTTP_TIMEOUT"
DEFAULT_HTTP_TIMEOUT = 30.0
STDERR_TAIL = 300  # characters of a failed command's stderr kept in the error line


class ReadFailed(Exception):
    """The file could not be read; the message is the reason, in words."""


def http_timeout() -> float:
    """Seconds to wait for an http(s) server: $DIST_TRAIN_HTTP_TIMEOUT, default 30."""
    raw = os.environ.get(HTTP_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_HTTP_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{HTTP_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return seconds


def read_http(url: str, limit: int = -1) -> bytes:
    """The file at an http(s) URL (at most `limit` + 1 bytes when `limit` >= 0); ReadFailed says why not."""
    timeout = http_timeout()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read(limit + 1 if limit >= 0 else -1)
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        why = _reason(e.reason, timeout)
    except (OSError, http.client.HTTPException) as e:  # a timeout or reset while reading the body
        why = _reason(e, timeout)
    raise ReadFailed(why)


def _reason(e: object, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s; set {HTTP_TIMEOUT_ENV} to wait longer"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def read_gopen(url: str, limit: int = -1) -> bytes:
    """The file at any other URL, through webdataset's gopen; a failing command is a ReadFailed
    with its exit status and the tail of its stderr. A command that succeeds keeps its stderr."""
    stream, failure = None, None
    with _stderr_of_children() as captured:
        try:
            stream = wds.gopen(url)
            with stream:
                data = stream.read(limit + 1 if limit >= 0 else -1)
        except Exception as e:  # remote errors come as many types (IOError from a command, ValueError, ...)
            failure = e
    err = captured[0].strip()
    if failure is None:
        if err:
            print(err, file=sys.stderr, flush=True)
        return data
    status = getattr(stream, "status", None)
    why = f"command exited with status {status}" if status else str(failure)
    tail = " | ".join(line.strip() for line in err.splitlines() if line.strip())[-STDERR_TAIL:]
    raise ReadFailed(f"{why}: {tail}" if tail else why)


@contextlib.contextmanager
def _stderr_of_children() -> Iterator[list[str]]:
    """File descriptor 2 sent to a temporary file for the block, the only way to read back what a
    child process writes there; the list holds the text once the block has ended."""
    captured: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            captured.append(f.read().decode("utf-8", errors="replace"))
