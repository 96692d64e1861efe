"""The fuzz suite's tools (tests/test_fuzz.py): the valid base files every case starts from,
crafted files (each built here, nothing binary committed), a command run in this process, and
the contract every run must keep.

The contract (issue 20): a command given any file ends in success or in exactly one `error: ...`
line with exit 1 or 2; no traceback; nothing created or removed outside its output; no command
read from a file runs (a canary file a `pipe:` address would create stays absent).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import struct
import tarfile
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# ----------------------------------------------------------------------------- the base files
IMG = 16


def build_base(root: Path) -> dict[str, Path]:
    """A tiny labeled shard set (3 classes, folder layout, several shards), a run trained on it
    (config.yaml, run.json, checkpoints/ with progress.json, best/), a `--save-probs` file and an
    out-of-fold file with its CV folder. Returns the paths by name; copy before changing."""
    from PIL import Image

    from conftest import run_main
    from dist_train import predict
    from dist_train.infer import files
    from dist_train.shardset.writer import write_shards

    src = root / "src"
    rng = np.random.default_rng(0)
    for c in range(3):  # distinct noisy images (identical ones would be grouped as duplicates)
        (src / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 96, (IMG, IMG, 3), dtype=np.uint8)
            pixels[..., c] += 128
            Image.fromarray(pixels).save(src / f"class{c}" / f"{i:03d}.png")
    shards = root / "shards"
    write_shards(src, shards, layout="folder", samples_per_shard=4, workers=1, progress=False)
    run = root / "run"
    p = run_main(["--data", str(shards), "--output", str(run), "--model", "test_resnet", "--img-size", str(IMG),
                  "--batch-size", "4", "--epochs", "1", "--workers", "0", "--seed", "0", "--warmup-epochs", "0",
                  "--log-with", "none", "--model-ema"])
    assert p.returncode == 0, p.stderr[-3000:]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        csv = predict.main(["--run", str(run), "--data", str(shards), "--split", "validation", "--out",
                            str(root / "pred.csv"), "--save-probs", "--workers", "0", "--batch-size", "8"])
    probs = predict.probs_path(csv)
    pred = files.load_probs(probs)
    cv = root / "cv"
    cv.mkdir()
    files.save_oof(cv / "oof.probs.npz", pred, fold=[i % 2 for i in range(len(pred.ids))],
                   meta=[{}] * len(pred.ids), data=str(shards), split="validation")
    for k in (0, 1):
        shutil.copytree(run, cv / f"fold-{k}", ignore=shutil.ignore_patterns("checkpoints", "tb"))
    return {"src": src, "shards": shards, "run": run, "probs": probs, "cv": cv}


# ----------------------------------------------------------------------------- running a command
@dataclass
class Outcome:
    code: int
    out: str
    err: str
    crash: str | None = None  # the traceback of an exception that escaped main()

    def error_lines(self) -> list[str]:
        return [line for line in self.err.replace("\r", "\n").splitlines() if line.startswith("error:")]


def call(main: Callable, argv: list[str]) -> Outcome:
    """`main(argv)` in this process: its exit code, output, and any exception that escaped it."""
    out, err, code, crash = io.StringIO(), io.StringIO(), 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 (a crash is what the contract forbids)
            crash = traceback.format_exc()
            code = -1
    return Outcome(code, out.getvalue(), err.getvalue(), crash)


def call_reader(fn: Callable, *args) -> Outcome:
    """A reader function called directly: success, or a UserError (exit 2 as a command)."""
    from dist_train.errors import UserError

    try:
        fn(*args)
    except UserError as e:
        return Outcome(2, "", f"error: {e}\n")
    except BaseException:  # noqa: BLE001
        return Outcome(-1, "", "", traceback.format_exc())
    return Outcome(0, "", "")


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots` (links not followed): path -> (size, mtime_ns)."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                found[p] = (st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns)
    return found


def contract(o: Outcome, before: dict, after: dict, outputs: tuple[Path, ...] = (),
             codes: tuple[int, ...] = (0, 1, 2), canary: Path | None = None) -> list[str]:
    """What went wrong (empty: the run kept the contract). `outputs`: paths the command may create
    or change; `codes`: the exits allowed (checkpoint --verify's exit 1 is a finding without an
    error line)."""
    problems = []
    if o.crash is not None:
        problems.append("crashed:\n" + o.crash[-3000:])
    if "Traceback" in o.err:
        problems.append("traceback on stderr:\n" + o.err[-3000:])
    if o.code not in codes:
        problems.append(f"exit {o.code}")
    errors = o.error_lines()
    if o.code == 2 and len(errors) != 1:
        problems.append(f"exit 2 with {len(errors)} error lines:\n{o.err[-2000:]}")
    if o.code == 0 and errors:
        problems.append(f"exit 0 with an error line: {errors}")
    if o.code == 1 and 1 in codes and len(errors) > 1:
        problems.append(f"exit 1 with {len(errors)} error lines")

    def inside(p: str) -> bool:
        return any(p == str(x) or p.startswith(str(x) + os.sep) or str(x).startswith(p + os.sep) for x in outputs)

    created = sorted(p for p in after.keys() - before.keys() if not inside(p))
    removed = sorted(p for p in before.keys() - after.keys() if not inside(p))
    changed = sorted(p for p in before.keys() & after.keys()
                     if before[p] != after[p] and not inside(p) and not os.path.isdir(p))
    for what, paths in (("created", created), ("removed", removed), ("changed", changed)):
        if paths:
            problems.append(f"{what} outside the output: {paths[:5]}")
    if canary is not None and canary.exists():
        problems.append(f"a command read from a file ran: {canary} exists")
    return problems


# ----------------------------------------------------------------------------- crafted files
def pipe_address(canary: Path) -> str:
    """A data address that, if run, creates `canary` (and then fails)."""
    return f"pipe:touch {canary}; false"


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def tar_member_declaring(name: str, size: int) -> bytes:
    """A ustar header for `name` declaring `size` bytes (GNU base-256 size field beyond 8 GiB),
    followed by 512 bytes only: a reader that trusts the size allocates it."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    return ti.tobuf(format=tarfile.GNU_FORMAT) + bytes(512)


def tar_with_link(name: str, target: str, symlink: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.SYMTYPE if symlink else tarfile.LNKTYPE
        ti.linkname = target
        tar.addfile(ti)
    return buf.getvalue()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header (SOF0) is patched to declare width x height."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def safetensors_with_header(header: dict | bytes, declared_len: int | None = None, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + body


def npz_bomb(path: Path, rows: int, cols: int, data_bytes: int) -> None:
    """An npz whose `prob` member declares (rows, cols) float32 and inflates to `data_bytes` of
    zeros from a small deflate stream (identical fully flushed blocks repeated), beside a 3-row
    `ids`: a reader that inflates before it checks shapes pays for all of it."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, cols)}
    text = repr(header).encode("latin1")
    text += b" " * (64 - (10 + len(text) + 1) % 64) + b"\n"
    npy_head = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    chunk = 1 << 22
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(npy_head) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)
    n = max(1, data_bytes // chunk)
    stream = first + block * n + comp.flush()
    size = len(npy_head) + n * chunk
    crc = 0  # left wrong: zipfile checks it only after inflating everything
    others = io.BytesIO()
    np.savez(others, ids=np.array(["a", "b", "c"]), classes=np.array(["x", "y"]), label=np.zeros(3, np.int64),
             id_column=np.array("key"))
    _zip_with_raw_member(path, others.getvalue(), "prob.npy", stream, crc, size)


def _zip_with_raw_member(path: Path, base_zip: bytes, name: str, deflated: bytes, crc: int, size: int) -> None:
    """`base_zip`'s members plus one more whose deflate stream is given as is."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(base_zip)) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    out, central = io.BytesIO(), io.BytesIO()
    entries = [(n, zlib.crc32(d), len(d), len(d), 0, d) for n, d in members] + [(name, crc, len(deflated), size, 8, deflated)]
    for n, c, csize, usize, method, data in entries:
        offset = out.tell()
        fname = n.encode()
        zip64 = usize >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, usize, csize) if zip64 else b""
        out.write(struct.pack("<IHHHHHIII", 0x04034B50, 45, 0, method, 0, 0, c,
                              0xFFFFFFFF if zip64 else csize, 0xFFFFFFFF if zip64 else usize) +
                  struct.pack("<HH", len(fname), len(extra)) + fname + extra + data)
        cextra = struct.pack("<HHQQ", 1, 16, usize, csize) if zip64 else b""
        central.write(struct.pack("<IHHHHHHIII", 0x02014B50, 45, 45, 0, method, 0, 0, c,
                                  0xFFFFFFFF if zip64 else csize, 0xFFFFFFFF if zip64 else usize) +
                      struct.pack("<HHHHHII", len(fname), len(cextra), 0, 0, 0, 0, offset) + fname + cextra)
    cd = central.getvalue()
    start = out.tell()
    out.write(cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(cd), start, 0))
    path.write_bytes(out.getvalue())


@dataclass
class Case:
    """One crafted input: `make(case_dir, base) -> argv` builds it in a fresh folder and returns
    the command's arguments; `outputs` are paths (relative to the case folder) it may write."""

    name: str
    command: str
    make: Callable[[Path, dict], list[str]]
    outputs: tuple[str, ...] = ("out",)
    needs: str = ""  # the part of the trust layer that makes it pass (for the report)
    codes: tuple[int, ...] = (0, 1, 2)
    extra: dict = field(default_factory=dict)
