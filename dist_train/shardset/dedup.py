"""Duplicate images: fingerprints, the near-duplicate search (hamming.py) and groups.

- `fingerprint(rgb)`: an exact fingerprint of the decoded pixels (128-bit XXH3 of the size and
  the RGB bytes: a PNG and a JPEG of the same pixels match, and so do the same bytes under two
  names; XXH3 hashes several GB/s where sha256 would make sharding a third slower, and it is
  not collision-resistant against a forger, who could at most make two images look identical) and a 64-bit perceptual hash (pHash: the signs, against their median, of the
  8x8 lowest frequencies of the DCT of a 32x32 grey thumbnail), robust to re-encoding,
  resizing, small crops and brightness/contrast shifts. The hash of the mirrored image comes
  with it (a sign flip of the odd horizontal frequencies), so a mirrored copy counts as a near
  duplicate: training flips images anyway. An image whose thumbnail is (almost) flat has no
  structure to hash and is matched exactly only (`flat`).
- `near_pairs` (in hamming.py, imported here for the callers): all pairs within a Hamming
  distance, by multi-index hashing or by a blocked, threaded all-pairs kernel, whichever is
  estimated faster.
- `components`: union-find over exact pairs, near pairs and the layout's own groups.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import xxhash
from PIL import Image

from .hamming import HASH_BITS, brute_pairs, near_pairs, plan_bands, popcount  # noqa: F401 (the search, for callers)

DEFAULT_THRESHOLD = 14  # bits of 64; tuned on real photos (README, "Duplicates and leakage")
MAX_THRESHOLD = 20
THUMB = 32  # side of the grey thumbnail the DCT is taken of
LOW = 8  # the LOW x LOW lowest frequencies give the 64 bits
FLAT_STD = 2.0  # grey levels: a thumbnail flatter than this has no perceptual hash worth comparing
EXACT_BYTES = 16


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


def exact_digest(rgb: Image.Image, pixels: np.ndarray | None = None) -> bytes:
    """16 bytes identifying the decoded pixels and their size (RGB image; `pixels`: its
    `np.asarray`, the same bytes as `tobytes()`, when the caller has it already)."""
    h = xxhash.xxh3_128(f"{rgb.width}x{rgb.height}\0".encode())
    h.update(rgb.tobytes() if pixels is None else np.ascontiguousarray(pixels))
    return h.digest()


def perceptual(rgb: Image.Image) -> tuple[int, int, bool]:
    """(pHash, pHash of the mirrored image, flat) of an RGB image."""
    grey = np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX, reducing_gap=2.0).convert("L"),
                      dtype=np.float64)
    coef = _DCT @ grey @ _DCT.T
    return _bits(coef), _bits(coef * _MIRROR_SIGN), bool(grey.std() < FLAT_STD)


def fingerprint(rgb: Image.Image, pixels: np.ndarray | None = None) -> tuple[bytes, int, int, bool]:
    """(exact digest, pHash, mirrored pHash, flat) of a decoded RGB image (`pixels`: see exact_digest)."""
    return (exact_digest(rgb, pixels), *perceptual(rgb))


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
