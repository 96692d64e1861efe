"""Duplicates inside one shard set or between two, from the fingerprints the shard step stored.

    python -m dist_train.duplicates A [B] [--threshold T] [--csv OUT.csv] [--grid OUT.png]
    python -m dist_train.duplicates --bench 10000 100000 1000000 [--threshold T] [--method M]

A alone: the exact and near-duplicate pairs inside it (what `shard` printed). A and B (e.g. a
training set and an evaluation set): the images of B that have a duplicate in A — "these N
test images are in your training data". Nothing is decoded again: A/_fingerprints.npz (and
B's) hold the hashes; only `--grid` reads the images of the pairs it draws. `--bench` times the
near-duplicate search on synthetic 64-bit hashes (hamming.py: banded, or all pairs compiled
with numba or in numpy, whichever is estimated fastest).
"""

from __future__ import annotations

import json
import resource
import time
import tracemalloc
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ArgParser, UserError, atomic_write_text, check_writable_file, cli_main
from .shardset.hamming import HASH_BITS, brute_pairs, compiled_kernels, estimate, have_compiled, near_pairs
from .shardset.duplicates import (
    DEFAULT_THRESHOLD,
    FINGERPRINTS_NAME,
    MAX_THRESHOLD,
    Fingerprints,
    Pairs,
    pair_caption,
    cross_label,
    pairs_between,
    pairs_csv,
    read_fingerprints,
)
from .infer.metrics import write_png
from .shardset.format import class_names, is_url, load_info
from .system import usable_cpus

GRID_PAIRS = 24
BRUTE_MAX = 10_000  # the three methods are compared at the smallest size, at most this


def parser() -> ArgParser:
    p = ArgParser(prog="python -m dist_train.duplicates", description=__doc__.split("\n\n")[0])
    p.add_argument("sets", nargs="*", type=Path, help="shard set A (local folder holding _fingerprints.npz), "
                   "and optionally B to check against A")
    p.add_argument("--threshold", type=int, help=f"near duplicates differ in at most T of {HASH_BITS} pHash bits "
                   f"(default: the one A was sharded with; {DEFAULT_THRESHOLD} for --bench)")
    p.add_argument("--csv", type=Path, help="write every pair found (columns as the shard set's _duplicates.csv)")
    p.add_argument("--grid", type=Path, metavar="PNG", help="draw the closest pairs (reads their images)")
    p.add_argument("--bench", type=int, nargs="+", metavar="N", help="time the search on N synthetic hashes")
    p.add_argument("--method", choices=("auto", "banded", "blocked", "compiled"), default="auto",
                   help="with --bench: the search to time (default auto: the one estimated fastest, as shard uses; "
                   "compiled: all pairs with numba, blocked: all pairs in numpy)")
    return p


def load_set(root: Path) -> tuple[Fingerprints, int, list[str]]:
    """(fingerprints, threshold, classes) of a local shard set."""
    if is_url(str(root)):
        raise UserError(f"{root}: a local shard set folder is expected (its {FINGERPRINTS_NAME} is read)")
    info = load_info(str(root))
    path = root / FINGERPRINTS_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; shard sets written before fingerprints existed have none "
                        f"(rerun python -m dist_train.shard ... --overwrite)")
    fp, threshold = read_fingerprints(path)
    return fp, threshold, [str(c) for c in class_names(info)]


# ----------------------------------------------------------------------------- drawing
def _thumb(source: Path | np.ndarray | None, side: int = 128) -> np.ndarray | None:
    if source is None or isinstance(source, np.ndarray):
        return source
    from PIL import Image

    with Image.open(source) as im:
        im.draft("RGB", (side, side))
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return np.asarray(im)


def draw_pairs(png: str | Path, pairs: Sequence[tuple], title: str, cols: int = 4) -> Path:
    """Pairs side by side (image or path, image or path, caption), `cols` pairs per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, -(-len(pairs) // cols))
    fig = Figure(figsize=(cols * 3.6, rows * 2.3 + 0.4))
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=9)
    for k, (a, b, caption) in enumerate(pairs):
        for side, src in enumerate((a, b)):
            ax = fig.add_subplot(rows, cols * 2, k * 2 + side + 1)
            img = _thumb(src)
            if img is not None:
                ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if side == 0:
                ax.set_title(caption, fontsize=5.5, loc="left", color="red" if "[" in caption and _cross(caption) else "black")
    return write_png(fig, png, dpi=110, tight=True)


def _cross(caption: str) -> bool:
    labels = [line.rsplit("[", 1)[1] for line in caption.split("\n")[1:] if "[" in line]
    return len(labels) == 2 and labels[0] != labels[1]


def _grid(png: Path, roots: Sequence[Path], fa: Fingerprints, fb: Fingerprints, pairs: Pairs, classes: list[str]) -> int:
    from .report import load_thumbnails

    infos = [load_info(str(r)) for r in roots]
    chosen = range(min(GRID_PAIRS, len(pairs)))
    want: dict[tuple[int, str], list[str]] = {}
    for k in chosen:
        for side, (f, x) in enumerate(((fa, pairs.a[k]), (fb, pairs.b[k]))):
            want.setdefault((min(side, len(roots) - 1), str(f.split[x])), []).append(str(f.key[x]))
    thumbs: dict[tuple[int, str], dict] = {}
    for (s, split), keys in want.items():
        thumbs[(s, split)] = load_thumbnails(str(roots[s]), infos[s], split, keys, side=128)
    last = len(roots) - 1
    items = [(thumbs[(0, str(fa.split[pairs.a[k]]))].get(str(fa.key[pairs.a[k]])),
              thumbs[(last, str(fb.split[pairs.b[k]]))].get(str(fb.key[pairs.b[k]])),
              pair_caption(fa, pairs, k, classes, fb)) for k in chosen]
    draw_pairs(png, items, f"{len(pairs)} duplicate pairs, closest first: {' vs '.join(map(str, roots))}")
    return len(items)


# ----------------------------------------------------------------------------- bench
def _synthetic(n: int, threshold: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pHashes, mirrored pHashes, src, dst): uniform random hashes, 1% of them planted as near
    copies (1..threshold bits flipped) of others."""
    h = rng.integers(0, 1 << 63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    mirror = rng.integers(0, 1 << 63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    planted = max(1, n // 100)
    src, dst = rng.choice(n, size=(2, planted), replace=False) if n >= 2 * planted else (np.array([0]), np.array([n - 1]))
    flips = np.zeros(len(src), np.uint64)
    for k in range(len(src)):
        for bit in rng.choice(HASH_BITS, size=int(rng.integers(1, threshold + 1)) if threshold else 0, replace=False):
            flips[k] |= np.uint64(1) << np.uint64(int(bit))
    h[dst] = h[src] ^ flips
    return h, mirror, src, dst


def _timed(fn, *args) -> tuple[object, float, int]:
    """(result, seconds, peak bytes allocated through numpy/Python meanwhile)."""
    tracemalloc.start()
    start = time.perf_counter()
    out = fn(*args)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, elapsed, peak


def _max_rss_mb() -> float:
    """The peak resident memory of this process so far (Linux: ru_maxrss is in KB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _compiled_start() -> float | None:
    """Seconds until the compiled search is ready in this process (numba's import, then its
    kernel from the cache or compiled), or None without numba."""
    if not have_compiled():
        return None
    start = time.perf_counter()
    near_pairs(np.arange(2, dtype=np.uint64), None, 0, "compiled")
    return round(time.perf_counter() - start, 3) if have_compiled() else None


def bench(sizes: Sequence[int], threshold: int, method: str = "auto", seed: int = 0) -> tuple[list[dict], dict]:
    """The search an image set needs (its pHashes among themselves, then its mirrored pHashes
    against them) on synthetic hashes, timed per size after the compiled search is made ready
    (its start-up reported apart); the estimated time of every method beside it, and at the
    smallest size every method measured, with the allocating all-pairs reference."""
    rng = np.random.default_rng(seed)
    threads = usable_cpus()
    start_rss = _max_rss_mb()
    compiled_start = _compiled_start()
    rows = []
    for n in sizes:
        h, mirror, src, dst = _synthetic(n, threshold, rng)
        own, mirrored = estimate(n, n, threshold, True, threads), estimate(n, n, threshold, False, threads)
        chosen = [method if method != "auto" else min(e, key=e.get) for e in (own, mirrored)]
        cpu = time.process_time()
        (i, j, _), own_s, own_peak = _timed(near_pairs, h, None, threshold, method)
        (mi, _, _), mirror_s, mirror_peak = _timed(near_pairs, h, mirror, threshold, method)
        cpu = time.process_time() - cpu  # all threads' CPU time: what the search cost whatever else runs
        rss = _max_rss_mb()  # before the recall check below allocates
        hit = np.isin(np.minimum(src, dst) * n + np.maximum(src, dst), i * n + j)[src != dst].sum()
        rows.append({"n": n, "threshold": threshold, "method": "/".join(dict.fromkeys(chosen)), "threads": threads,
                     "seconds": round(own_s + mirror_s, 3), "own_seconds": round(own_s, 3),
                     "mirrored_seconds": round(mirror_s, 3), "cpu_seconds": round(cpu, 3),
                     "peak_mb": round(max(own_peak, mirror_peak) / 2**20, 1),
                     "max_rss_mb": rss, "start_rss_mb": start_rss,
                     "pairs": len(i), "mirrored_pairs": len(mi), "planted_recall": round(int(hit) / len(src), 4),
                     **{f"estimated_{m}_s": round(own[m] + mirrored[m], 3) for m in own}})
    n = min(min(sizes), BRUTE_MAX)
    h = _synthetic(n, threshold, rng)[0]
    methods = ("banded", "blocked", "compiled") if have_compiled() else ("banded", "blocked")
    peers = {"n": n, **{m: round(_timed(near_pairs, h, None, threshold, m)[1], 3) for m in methods},
             "all_pairs": round(_timed(brute_pairs, h, threshold)[1], 3), "compiled_start_s": compiled_start}
    return rows, peers


def _print_bench(rows: list[dict], peers: dict) -> None:
    if peers["compiled_start_s"] is not None:
        print(f"compiled search ready in {peers['compiled_start_s']:.2f} s (numba's import, its kernel cached or "
              f"compiled), not counted below", flush=True)
    for r in rows:
        estimated = ", ".join(f"{k[10:-2]} {v:.2f} s" for k, v in r.items() if k.startswith("estimated_"))
        print(f"n={r['n']:>9,}: {r['method']} {r['seconds']:9.2f} s (own pHashes {r['own_seconds']:.2f} s, "
              f"mirrored {r['mirrored_seconds']:.2f} s; {r['threads']} thread(s) for all pairs, "
              f"CPU {r['cpu_seconds']:.2f} s), "
              f"peak {r['peak_mb']:.1f} MB allocated, max RSS {r['max_rss_mb']:.0f} MB "
              f"({r['start_rss_mb']:.0f} MB before), recall of planted pairs {r['planted_recall']:.3f}; "
              f"estimated {estimated}", flush=True)
    timed = ", ".join(f"{m} {peers[m]:.3f} s" for m in ("banded", "blocked", "compiled") if m in peers)
    print(f"own pHashes at n={peers['n']:,}: {timed}, all-pairs allocating {peers['all_pairs']:.3f} s", flush=True)


@cli_main
def main(argv: Sequence[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= MAX_THRESHOLD:
        raise UserError(f"--threshold {args.threshold}: expected 0..{MAX_THRESHOLD} bits of {HASH_BITS}")
    if not args.bench and args.method != "auto":
        raise UserError(f"--method {args.method}: only with --bench (the search otherwise picks its method)")
    if args.bench:
        if args.sets or args.csv or args.grid:
            raise UserError("--bench N... runs on synthetic hashes: it takes no shard sets, --csv or --grid")
        if any(n < 2 for n in args.bench):
            raise UserError(f"--bench {' '.join(map(str, args.bench))}: expected sizes of 2 or more")
        if args.method == "compiled" and compiled_kernels() is None:
            raise UserError("--method compiled: numba cannot be imported here (pip install numba)")
        rows, peers = bench(args.bench, DEFAULT_THRESHOLD if args.threshold is None else args.threshold, args.method)
        _print_bench(rows, peers)
        print(json.dumps({"bench": "duplicates", "rows": rows, "peers": peers}))
        return {"rows": rows, "peers": peers}
    if not 1 <= len(args.sets) <= 2:
        raise UserError("expected one shard set A (duplicates inside it) or two, A B (B's images found in A); "
                        "or --bench N...")
    for path in (args.csv, args.grid):
        if path is not None:
            check_writable_file(path, "--csv" if path is args.csv else "--grid")
    return report(args)


def report(args) -> dict:
    fa, threshold, classes = load_set(args.sets[0])
    fb, _, classes_b = load_set(args.sets[1]) if len(args.sets) == 2 else (None, 0, classes)
    threshold = threshold if args.threshold is None else args.threshold
    pairs = pairs_between(fa, fb, threshold)
    if classes_b != classes:  # labels of different class lists are not comparable
        fb.label = np.full(len(fb), -1, dtype=np.int64)
    cross = int(cross_label(fa, fa if fb is None else fb, pairs).sum())
    kinds = f"{int(pairs.exact.sum())} exact, {int((~pairs.exact).sum())} near (<= {threshold} bits)"
    if fb is None:
        images = len(np.union1d(pairs.a, pairs.b))
        print(f"{args.sets[0]}: {len(pairs)} duplicate pairs ({kinds}) among {images} of {len(fa)} images; "
              f"{cross} pair(s) with different labels")
    else:
        found = np.unique(pairs.b)
        print(f"{args.sets[1]}: {len(found)} of its {len(fb)} images ({len(found) / max(len(fb), 1):.1%}) have a "
              f"duplicate in {args.sets[0]} ({len(pairs)} pairs: {kinds}; {cross} with different labels)")
    other = fa if fb is None else fb
    for k in range(min(5, len(pairs))):
        print("  " + pair_caption(fa, pairs, k, classes, other).replace("\n", "  |  "))
    if args.csv:
        atomic_write_text(args.csv, pairs_csv(fa, other, pairs, classes))
        print(f"wrote {args.csv}")
    if args.grid and len(pairs):
        n = _grid(args.grid, args.sets, fa, other, pairs, classes)
        print(f"wrote {args.grid} ({n} pairs)")
    return {"pairs": pairs, "cross_label": cross, "threshold": threshold}


if __name__ == "__main__":
    main()
