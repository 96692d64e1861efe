"""numba's `njit` with the package's policy for its compiled kernels (hamming_jit, resample_jit):
`nogil=True`; `cache=True`, compiled once per machine and kept in the package's __pycache__ (or
numba's user-wide cache folder when that is not writable); where no cache folder is writable at
all, compiled in every process instead (numba raises rather than falling back there).
Imported only with those kernels: numba's import costs 0.2-0.7 s."""

from __future__ import annotations

from typing import Any, Callable

import numba


def njit(**options: Any) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        try:
            return numba.njit(nogil=True, cache=True, **options)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available" (nothing writable)
            return numba.njit(nogil=True, **options)(fn)
    return wrap
