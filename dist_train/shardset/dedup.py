"""Duplicate images: fingerprints, a near-duplicate search that is not all-pairs, and groups.

- `fingerprint(rgb)`: an exact fingerprint of the decoded pixels (128-bit XXH3 of the size and
  the RGB bytes: a PNG and a JPEG of the same pixels match, and so do the same bytes under two
  names; XXH3 hashes several GB/s where sha256 would make sharding a third slower, and it is
  not collision-resistant against a forger, who could at most make two images look identical) and a 64-bit perceptual hash (pHash: the signs, against their median, of the
  8x8 lowest frequencies of the DCT of a 32x32 grey thumbnail), robust to re-encoding,
  resizing, small crops and brightness/contrast shifts. The hash of the mirrored image comes
  with it (a sign flip of the odd horizontal frequencies), so a mirrored copy counts as a near
  duplicate: training flips images anyway. An image whose thumbnail is (almost) flat has no
  structure to hash and is matched exactly only (`flat`).
- `near_pairs`: all pairs within a Hamming distance by multi-index hashing (Norouzi et al.,
  2012): the 64 bits are cut into m bands; two hashes within distance T agree within
  floor(T/m) bits on at least one band (pigeonhole), so each band is looked up in a dense
  bucket table under every flip pattern of that many bits, and only the candidates found are
  verified with a popcount. m is chosen per call from the set size (bands of about log2(n)
  bits keep the buckets small). Vectorized numpy; `brute_pairs` is the all-pairs reference.
- `components`: union-find over exact pairs, near pairs and the layout's own groups.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Iterator, Sequence

import numpy as np
import xxhash
from PIL import Image

HASH_BITS = 64
DEFAULT_THRESHOLD = 14  # bits of 64; tuned on real photos (README, "Duplicates and leakage")
MAX_THRESHOLD = 20
THUMB = 32  # side of the grey thumbnail the DCT is taken of
LOW = 8  # the LOW x LOW lowest frequencies give the 64 bits
FLAT_STD = 2.0  # grey levels: a thumbnail flatter than this has no perceptual hash worth comparing
EXACT_BYTES = 16
MAX_BAND_BITS = 24  # dense bucket tables of at most 2^24 entries
CHUNK = 1 << 16  # queries per vectorized step (bounds the memory of one step)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


_DCT = _dct_matrix(THUMB)[:LOW]  # only the low rows are needed
_MIRROR_SIGN = np.where(np.arange(LOW) % 2 == 1, -1.0, 1.0)[None, :]  # odd horizontal frequencies flip


def _bits(coef: np.ndarray) -> int:
    flat = coef.reshape(-1)
    return int(np.packbits(flat > np.median(flat), bitorder="little").view("<u8")[0])


def exact_digest(rgb: Image.Image) -> bytes:
    """16 bytes identifying the decoded pixels and their size (RGB image)."""
    h = xxhash.xxh3_128(f"{rgb.width}x{rgb.height}\0".encode())
    h.update(rgb.tobytes())
    return h.digest()


def perceptual(rgb: Image.Image) -> tuple[int, int, bool]:
    """(pHash, pHash of the mirrored image, flat) of an RGB image."""
    grey = np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX, reducing_gap=2.0).convert("L"),
                      dtype=np.float64)
    coef = _DCT @ grey @ _DCT.T
    return _bits(coef), _bits(coef * _MIRROR_SIGN), bool(grey.std() < FLAT_STD)


def fingerprint(rgb: Image.Image) -> tuple[bytes, int, int, bool]:
    """(exact digest, pHash, mirrored pHash, flat) of a decoded RGB image."""
    return (exact_digest(rgb), *perceptual(rgb))


# ----------------------------------------------------------------------------- search
def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)


def _flip_patterns(width: int, radius: int) -> Iterator[int]:
    for r in range(radius + 1):
        for bits in combinations(range(width), r):
            yield sum(1 << b for b in bits)


def plan_bands(n: int, threshold: int) -> list[tuple[int, int]]:
    """(shift, width) of each band: the band count with the least estimated work for n uniform
    hashes (lookups plus candidates to verify)."""
    best = None
    fewest = math.ceil(HASH_BITS / MAX_BAND_BITS)
    for m in range(fewest, max(fewest, threshold + 1) + 1):
        width, radius = HASH_BITS / m, threshold // m
        lookups = m * sum(math.comb(math.ceil(width), r) for r in range(radius + 1))
        cost = lookups * (1 + n / 2 ** math.floor(width))
        if best is None or cost < best[0]:
            best = (cost, m)
    m = best[1]
    edges = [round(i * HASH_BITS / m) for i in range(m + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(m)]


def _band(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


def near_pairs(index: np.ndarray, query: np.ndarray | None, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i into query, j into index, distance) with Hamming distance <= threshold.

    query None: pairs within `index` itself, each once with i < j. Otherwise every query
    against every index entry (i == j allowed: they are different sets).
    """
    index = np.ascontiguousarray(index, dtype=np.uint64)
    same = query is None
    query = index if same else np.ascontiguousarray(query, dtype=np.uint64)
    found_i, found_j = [], []
    if len(index) and len(query) and threshold >= 0:
        bands = plan_bands(max(len(index), len(query)), threshold)
        radius = threshold // len(bands)
        for shift, width in bands:
            i, j = _band_pairs(index, query, shift, width, radius, threshold, same)
            found_i.append(i)
            found_j.append(j)
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    code = np.unique(i * len(index) + j)  # a pair is found in every band it agrees on
    i, j = code // len(index), code % len(index)
    return i, j, popcount(query[i] ^ index[j])


def _band_pairs(index: np.ndarray, query: np.ndarray, shift: int, width: int, radius: int, threshold: int,
                same: bool) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs whose band values differ in at most `radius` bits (dense bucket table)."""
    keys = _band(index, shift, width)
    order = np.argsort(keys, kind="stable")
    count = np.bincount(keys, minlength=1 << width)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    qkeys = _band(query, shift, width)
    out_i, out_j = [], []
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
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def brute_pairs(hashes: np.ndarray, threshold: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs reference (i < j with distance <= threshold): the limit the banded search beats."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    out_i, out_j = [], []
    for lo in range(0, len(hashes), block):
        d = popcount(hashes[lo:lo + block, None] ^ hashes[None, :])
        i, j = np.nonzero(d <= threshold)
        keep = i + lo < j
        out_i.append(i[keep] + lo)
        out_j.append(j[keep])
    return np.concatenate(out_i), np.concatenate(out_j)


# ----------------------------------------------------------------------------- groups
def exact_pairs(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j), i < j: each image paired with the first one of the same exact digest."""
    if not len(digests):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    void = np.ascontiguousarray(digests).view(np.dtype((np.void, digests.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
    head = first[inverse.reshape(-1)]
    dup = np.flatnonzero(head != np.arange(len(digests)))
    return head[dup].astype(np.int64), dup.astype(np.int64)


def components(n: int, links: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Union-find over n items: the component of each item, numbered by its smallest member."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = root(x), root(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    return np.array([root(x) for x in range(n)], dtype=np.int64)


def group_links(groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Links that keep the layout's own groups (e.g. a person's photos) together."""
    _, first, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_index=True, return_inverse=True)
    head = first[inverse.reshape(-1)]
    dup = np.flatnonzero(head != np.arange(len(groups)))
    return head[dup].astype(np.int64), dup.astype(np.int64)
