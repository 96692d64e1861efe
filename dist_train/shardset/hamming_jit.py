"""The all-pairs Hamming search compiled with numba (hamming.py's "compiled" method).

Imported by hamming.py only when the search needs it (numba's import costs ~0.4 s); an
ImportError there (numba missing or unusable) leaves the numpy methods, which give the same
pairs. The kernel takes the queries of one task against the index in column chunks of COLS
hashes (a chunk stays in L1 while every query of the task passes over it): per query and chunk
it reduces min(popcount(q ^ x)) in a loop that LLVM vectorizes (AVX-512 VPOPCNTQ where the CPU
has it, else POPCNT or the bit-twiddling count), and rescans only the chunks whose minimum is
within the threshold (the chunk is narrower at large thresholds, where more chunks hold a
pair), writing the codes of their pairs into a preallocated buffer. It counts
every pair it finds, also past the end of the buffer; a task whose pairs did not fit is run
again with a buffer of exactly that count, so no pair is ever lost. Compiled as jit.py says
(`nogil`: tasks run in hamming.py's thread pool; cached per machine, ~1 s to compile).
"""

from __future__ import annotations

import numpy as np

from .hamming import TASK_ROWS
from .jit import njit as _jit

COLS = 512  # index hashes per chunk (4 KB): one minimum per query and chunk
NARROW_ABOVE = 16  # above this threshold chunks of COLS // 4: more chunks hold a pair to rescan
OUT_CODES = 1 << 17  # pairs a task's buffer holds (1 MB) before its second pass


@_jit(inline="always")
def _popcount(x):
    """Set bits of a uint64 (the classic SWAR count: LLVM emits POPCNT / VPOPCNTQ for it)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@_jit(inline="always")
def _min_distance(q, x):
    m = 64
    for j in range(len(x)):  # from 0 over a slice: no negative-index wraparound, so it vectorizes
        m = min(m, _popcount(q ^ x[j]))
    return m


@_jit(inline="always")
def _emit(q, x, threshold, code, out, found):
    for j in range(len(x)):
        if _popcount(q ^ x[j]) <= threshold:
            if found < len(out):
                out[found] = code + j
            found += 1
    return found


@_jit()
def scan_rows(index, query, threshold, same, lo, hi, cols, out):
    """Codes i * len(index) + j of the pairs of queries lo..hi-1 within `threshold` (j > i when
    `same`) into `out`; returns how many there are (if more than len(out), the first len(out)
    were written)."""
    n = len(index)
    found = 0
    for c0 in range(lo + 1 if same else 0, n, cols):
        c1 = min(c0 + cols, n)
        for i in range(lo, min(hi, c1 - 1) if same else hi):
            start = max(c0, i + 1) if same else c0
            x = index[start:c1]
            q = query[i]
            if _min_distance(q, x) <= threshold:
                found = _emit(q, x, threshold, i * n + start, out, found)
    return found


def task_codes(index: np.ndarray, query: np.ndarray, threshold: int, same: bool, lo: int) -> np.ndarray:
    """The codes of one task's pairs (queries lo..lo+TASK_ROWS-1), all of them."""
    hi = min(lo + TASK_ROWS, len(query))
    cols = COLS if threshold <= NARROW_ABOVE else max(1, COLS // 4)
    out = np.empty(OUT_CODES, np.int64)
    found = scan_rows(index, query, int(threshold), bool(same), int(lo), int(hi), cols, out)
    if found > len(out):  # did not fit: again, with room for every one
        out = np.empty(found, np.int64)
        scan_rows(index, query, int(threshold), bool(same), int(lo), int(hi), cols, out)
    return out[:found].copy()
