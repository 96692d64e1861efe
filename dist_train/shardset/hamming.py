"""All pairs of 64-bit hashes within a Hamming distance: three exact methods and a chooser.

- banded (multi-index hashing, Norouzi et al., 2012): the 64 bits are cut into m bands; two
  hashes within distance T agree within floor(T/m) bits on at least one band (pigeonhole), so
  each band is looked up in a dense bucket table under every flip pattern of that many bits, and
  only the candidates found are verified with a popcount; m is the one of least estimated time.
  It prunes well at small T; at the default 14 bits of 64 the flip patterns and candidates grow
  until it costs more than all pairs.
- compiled: every pair, in a numba kernel (hamming_jit.py: xor, popcount and a minimum per
  query and chunk of 512 hashes in one vectorized loop, rescanning only chunks with a hit),
  about 0.08 ns a pair on one core with AVX-512 VPOPCNTQ (0.23 with AVX2 only); tasks of
  TASK_ROWS queries over a thread pool of `usable_cpus()` threads (the kernel
  releases the GIL). Used when numba imports; its first use in a process costs
  COMPILED_START_S (numba's import, the cached machine code).
- blocked: every pair in numpy, the fallback without numba: BLOCK_ROWS queries x BLOCK_COLS
  hashes at a time in preallocated buffers (xor, popcount into uint8, minimum per row;
  positions are taken only in the rows whose minimum is within T), about 0.65 ns a pair on one
  core; tasks of TASK_ROWS queries over the same thread pool (numpy's ufuncs release the GIL),
  each with its own buffers (BLOCK_ROWS x BLOCK_COLS x 9 bytes): memory stays bounded whatever n.
- `near_pairs` runs the one of smallest estimated time (`estimate`, a cost model fitted on the
  2-core CPU box); all give exactly the pairs of `brute_pairs`, the all-pairs reference.
Without np.bitwise_count (numpy < 2) the numpy popcount is a byte lookup table (slower, same result).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from typing import Iterator

import numpy as np

from ..system import usable_cpus

HASH_BITS = 64
MAX_BAND_BITS = 24  # dense bucket tables of at most 2^24 entries
CHUNK = 1 << 16  # queries per vectorized step of the banded search (bounds the memory of one step)
BLOCK_ROWS, BLOCK_COLS = 32, 8192  # a block: 2 MB of xor, 256 KB of counts
TASK_ROWS = 256  # queries per thread-pool task
FEW_ROWS = 4  # a block with hits in at most this many rows is searched row by row


def _has_vector_popcount() -> bool:
    """Whether the CPU has AVX-512 VPOPCNTQ (read from /proc/cpuinfo; elsewhere assumed not)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_vpopcntdq" in line.split()
    except OSError:
        pass
    return False


# Cost model, seconds per unit, fitted on one core of the 2-core CPU box (numpy 2.4; README,
# "Duplicates and leakage"); only their ratios decide the method.
PAIR_S = 0.65e-9  # blocked: one pair
# compiled: one pair, with AVX-512 VPOPCNTQ; else AVX2's byte-shuffle count (measured with numba
# told this CPU had AVX2 only; SSE4.2's scalar POPCNT: 0.39 ns)
COMPILED_PAIR_S = 0.08e-9 if _has_vector_popcount() else 0.23e-9
COMPILED_START_S = 0.7  # compiled: its first use in a process (numba's import, loading the cached kernel)
LOOKUP_S = 15e-9  # banded: one query under one flip pattern of one band
CANDIDATE_S = 30e-9  # banded: one candidate gathered and verified
SORT_S = 10e-9  # banded: per hash and per bucket of a band (argsort, bucket table)
HAVE_BITWISE_COUNT = hasattr(np, "bitwise_count")
HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # without importing it
_jit_module = None  # hamming_jit once imported; False once its import failed
_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


def _count_bits(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 of x into the uint8 array `out` (same shape)."""
    if HAVE_BITWISE_COUNT:
        return np.bitwise_count(x, out=out)
    return np.sum(_BYTE_BITS[x.view(np.uint8).reshape(*x.shape, 8)], axis=-1, dtype=np.uint8, out=out)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _count_bits(x, np.empty(x.shape, np.uint8)).astype(np.int64)


# ----------------------------------------------------------------------------- choice
def _band_edges(m: int) -> list[tuple[int, int]]:
    edges = [round(i * HASH_BITS / m) for i in range(m + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(m)]


def _banded_seconds(n_index: int, n_query: int, threshold: int, bands: list[tuple[int, int]]) -> float:
    radius = threshold // len(bands)
    seconds = 0.0
    for _, width in bands:
        patterns = sum(math.comb(width, r) for r in range(radius + 1))
        seconds += (SORT_S * (n_index + 2 ** width) + LOOKUP_S * n_query * patterns
                    + CANDIDATE_S * n_query * patterns * n_index / 2 ** width)
    return seconds


def plan_bands(n: int, threshold: int) -> list[tuple[int, int]]:
    """(shift, width) of each band: the band count with the least estimated time for n uniform
    hashes (bucket tables, lookups under every flip pattern, candidates to verify)."""
    fewest = math.ceil(HASH_BITS / MAX_BAND_BITS)
    plans = [_band_edges(m) for m in range(fewest, max(fewest, threshold + 1) + 1)]
    return min(plans, key=lambda bands: _banded_seconds(n, n, threshold, bands))


def compiled_kernels():
    """hamming_jit (numba's compiled search), or None where numba cannot be imported."""
    global _jit_module
    if _jit_module is None:
        try:
            _jit_module = importlib.import_module(".hamming_jit", __package__)
        except ImportError:
            _jit_module = False
    return _jit_module or None


def have_compiled() -> bool:
    """Whether the compiled method can run (numba is installed and, once tried, imported)."""
    return _jit_module is not False and (bool(_jit_module) or HAVE_NUMBA)


def estimate(n_index: int, n_query: int, threshold: int, same: bool, threads: int) -> dict[str, float]:
    """Estimated seconds of each method that can run, for uniform random hashes (banded: one
    thread; blocked and compiled: `threads` threads over their tasks; compiled with its start-up
    cost while it has not been used in this process)."""
    banded = _banded_seconds(n_index, n_query, threshold, plan_bands(max(n_index, n_query), threshold))
    pairs = n_index * (n_index - 1) / 2 if same else n_index * n_query
    workers = max(1, min(threads, math.ceil(n_query / TASK_ROWS)))
    cost = {"banded": banded, "blocked": PAIR_S * pairs / workers}
    if have_compiled():
        start = 0.0 if _jit_module else COMPILED_START_S
        cost["compiled"] = start + COMPILED_PAIR_S * pairs / workers
    return cost


def near_pairs(index: np.ndarray, query: np.ndarray | None, threshold: int, method: str = "auto",
               threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i into query, j into index, distance) with Hamming distance <= threshold, sorted.

    query None: pairs within `index` itself, each once with i < j. Otherwise every query
    against every index entry (i == j allowed: they are different sets). `method`: "auto" (the
    smallest `estimate`, among the others if the compiled one was chosen but numba does not
    import), "banded", "blocked" or "compiled"; `threads` for the all-pairs methods (default:
    usable cores).
    """
    index = np.ascontiguousarray(index, dtype=np.uint64)
    same = query is None
    query = index if same else np.ascontiguousarray(query, dtype=np.uint64)
    if not len(index) or not len(query) or threshold < 0:
        return _EMPTY
    threads = usable_cpus() if threads is None else max(1, threads)
    chosen = method
    for _ in range(2 if method == "auto" else 0):  # twice if numba is installed but does not import
        cost = estimate(len(index), len(query), threshold, same, threads)
        chosen = min(cost, key=cost.get)
        if chosen != "compiled" or compiled_kernels() is not None:
            break
    if chosen == "banded":
        i, j = _banded(index, query, threshold, same)
    elif chosen == "blocked":
        i, j = _blocked(index, query, threshold, same, threads)
    elif chosen == "compiled":
        if compiled_kernels() is None:
            raise ValueError("method 'compiled': numba cannot be imported (pip install numba)")
        i, j = _compiled(index, query, threshold, same, threads)
    else:
        raise ValueError(f"method {method!r}: expected auto, banded, blocked or compiled")
    return i, j, popcount(query[i] ^ index[j])


# ----------------------------------------------------------------------------- banded
def _flip_patterns(width: int, radius: int) -> Iterator[int]:
    for r in range(radius + 1):
        for bits in combinations(range(width), r):
            yield sum(1 << b for b in bits)


def _band(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


def _banded(index: np.ndarray, query: np.ndarray, threshold: int, same: bool) -> tuple[np.ndarray, np.ndarray]:
    bands = plan_bands(max(len(index), len(query)), threshold)
    radius = threshold // len(bands)
    found = [_band_pairs(index, query, shift, width, radius, threshold, same) for shift, width in bands]
    code = np.unique(np.concatenate([i * len(index) + j for i, j in found]))  # found in every band it agrees on
    return code // len(index), code % len(index)


def _band_pairs(index: np.ndarray, query: np.ndarray, shift: int, width: int, radius: int, threshold: int,
                same: bool) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs whose band values differ in at most `radius` bits (dense bucket table)."""
    keys = _band(index, shift, width)
    order = np.argsort(keys, kind="stable")
    count = np.bincount(keys, minlength=1 << width)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    qkeys = _band(query, shift, width)
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for pattern in _flip_patterns(width, radius):
        for lo in range(0, len(query), CHUNK):
            q = qkeys[lo:lo + CHUNK] ^ pattern
            n = count[q]
            hit = np.flatnonzero(n)
            if not len(hit):
                continue
            n_hit = n[hit]
            rows = np.repeat(hit + lo, n_hit)
            offsets = np.arange(n_hit.sum()) - np.repeat(np.cumsum(n_hit) - n_hit, n_hit)
            cols = order[np.repeat(start[q[hit]], n_hit) + offsets]
            keep = rows < cols if same else np.ones(len(rows), bool)
            rows, cols = rows[keep], cols[keep]
            keep = popcount(query[rows] ^ index[cols]) <= threshold
            out_i.append(rows[keep])
            out_j.append(cols[keep])
    return np.concatenate(out_i), np.concatenate(out_j)


# ----------------------------------------------------------------------------- all pairs
def _pooled(task, n_query: int, rows: int, threads: int, n_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) sorted, from the codes i * n_index + j that task(lo) returns for queries lo..lo+rows-1,
    the tasks spread over `threads` threads."""
    starts = range(0, n_query, rows)
    if threads == 1 or len(starts) == 1:
        codes = [task(lo) for lo in starts]
    else:
        with ThreadPoolExecutor(min(threads, len(starts)), thread_name_prefix="hamming") as pool:
            codes = list(pool.map(task, starts))
    code = np.sort(np.concatenate(codes))
    return code // n_index, code % n_index


def _compiled(index: np.ndarray, query: np.ndarray, threshold: int, same: bool,
              threads: int) -> tuple[np.ndarray, np.ndarray]:
    jit = compiled_kernels()
    return _pooled(lambda lo: jit.task_codes(index, query, threshold, same, lo), len(query), jit.TASK_ROWS,
                   threads, len(index))


def _blocked(index: np.ndarray, query: np.ndarray, threshold: int, same: bool,
             threads: int) -> tuple[np.ndarray, np.ndarray]:
    local = threading.local()

    def task(lo: int) -> np.ndarray:
        if not hasattr(local, "x"):
            local.x = np.empty(BLOCK_ROWS * BLOCK_COLS, np.uint64)
            local.c = np.empty(BLOCK_ROWS * BLOCK_COLS, np.uint8)
        return _blocked_rows(index, query, threshold, same, lo, min(lo + TASK_ROWS, len(query)), local.x, local.c)

    return _pooled(task, len(query), TASK_ROWS, threads, len(index))


def _blocked_rows(index: np.ndarray, query: np.ndarray, threshold: int, same: bool, lo: int, hi: int,
                  xbuf: np.ndarray, cbuf: np.ndarray) -> np.ndarray:
    """Codes i * len(index) + j of the pairs of queries lo..hi-1 (with j > i when same)."""
    n = len(index)
    out = [np.zeros(0, np.int64)]
    for r0 in range(lo, hi, BLOCK_ROWS):
        q = query[r0:min(r0 + BLOCK_ROWS, hi), None]
        for c0 in range(r0 + 1 if same else 0, n, BLOCK_COLS):
            w = min(BLOCK_COLS, n - c0)
            x, c = xbuf[:len(q) * w].reshape(len(q), w), cbuf[:len(q) * w].reshape(len(q), w)
            np.bitwise_xor(q, index[None, c0:c0 + w], out=x)
            _count_bits(x, c)
            rows = np.flatnonzero(np.minimum.reduce(c, axis=1) <= threshold)
            if len(rows) > FEW_ROWS:  # positions in the whole block
                k = np.flatnonzero(c.reshape(-1) <= threshold)
                i, j = k // w + r0, k % w + c0
            elif len(rows):  # in the rows holding a hit only
                cols = [np.flatnonzero(c[r] <= threshold) for r in rows.tolist()]
                i = np.repeat(rows + r0, [len(k) for k in cols])
                j = np.concatenate(cols) + c0
            else:
                continue
            if same and c0 <= r0 + len(q):  # the block on the diagonal: each pair once, i < j
                i, j = i[i < j], j[i < j]
            out.append(i * n + j)
    return np.concatenate(out)


def brute_pairs(hashes: np.ndarray, threshold: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs reference (i < j with distance <= threshold), the plain way (allocating)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lo in range(0, len(hashes), block):
        d = popcount(hashes[lo:lo + block, None] ^ hashes[None, :])
        i, j = np.nonzero(d <= threshold)
        keep = i + lo < j
        out_i.append(i[keep] + lo)
        out_j.append(j[keep])
    return np.concatenate(out_i), np.concatenate(out_j)
