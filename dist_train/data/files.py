"""Image files as an evaluation loader: `predict --images` without a shard set.

`find_images` turns what the user typed (files, folders searched recursively, glob patterns)
into one list in a fixed order; `build_file_loader` reads it like the shard readers read a
split: every file exactly once over all ranks and workers (file i goes to reader i mod
readers), decoded and transformed by the same code (`ShardReader._load`, the eval `Transform`),
a file that cannot be read or decoded, or whose header gives more than MAX_PIXELS, warned
about, counted and skipped. A folder is searched as `shard` reads one: the same image extensions
(bmp, tiff, ppm/pgm are converted as the shard writer converts them, so a file's pixels are the
shard path's), macOS `._*` files, dot-files and folders and `.ipynb_checkpoints` skipped.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from dist_train.errors import UserError
from dist_train.shardset.images import encode_image
from dist_train.shardset.sources import FOLDER_EXTENSIONS, new_ignored, walk_images
from dist_train.shardset.tree import SourceTree
from dist_train.trust.media import DEFAULT_MAX_PIXELS, check_image_bytes
from dist_train.trust.tables import utf8_name

from .loaders import EvalLoader, _check_loader_args, _data_loader
from .readers import EvalReader, eval_collate
from .transforms import AugmentConfig, Transform

IMAGE_SUFFIXES = FOLDER_EXTENSIONS  # what `shard` takes from a class folder
MAX_PIXELS = DEFAULT_MAX_PIXELS  # PIL's decompression-bomb limit (89,478,485 pixels)
FILE_FORMATS = ("JPEG", "PNG", "WEBP")  # what the readers decode (`transforms.decode_rgb`); others become PNG
MAX_FILE_BYTES = 256 * 2**20  # larger files are refused unread


@dataclass(frozen=True)
class ImageFile:
    path: str  # where to read it
    name: str  # what the prediction file calls it: as given, or the folder as given / the path below it


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _folder_images(folder: str) -> list[ImageFile]:
    """The images below `folder`, recursively, sorted, walked as `shard` walks a class folder:
    symlinks followed only when they stay inside `folder`, each file and folder once (a link loop
    or a link beside its target adds nothing), junk (`._*`, dot-files and folders,
    `.ipynb_checkpoints`), FIFOs and devices skipped."""
    root, ignored = Path(folder), new_ignored()
    tree = SourceTree(root, ignored, where=f"--images {folder}")
    found = [os.path.join(folder, p.relative_to(root)) for p in walk_images(root, ignored, tree)]
    return [ImageFile(p, p) for p in sorted(found)]


def find_images(args: Sequence[str]) -> list[ImageFile]:
    """Files, folders (recursive) and glob patterns -> images (the extensions `shard` takes), in the
    order given (a folder's and a pattern's matches sorted), each file once. Anything that names no
    image, or a name that is not UTF-8 (no prediction file could hold it), is one UserError line."""
    out: list[ImageFile] = []
    for arg in args:
        if os.path.isdir(arg):
            found = _folder_images(arg)
        elif os.path.isfile(arg):
            if not _is_image(arg):
                raise UserError(f"--images {arg}: not an image file (expected {'/'.join(IMAGE_SUFFIXES)})")
            found = [ImageFile(arg, arg)]
        elif glob.has_magic(arg):
            found = [ImageFile(p, p) for p in sorted(glob.glob(arg, recursive=True))
                     if _is_image(p) and os.path.isfile(p)]
        else:
            raise UserError(f"--images {arg}: no such file or folder")
        for f in found:
            utf8_name(f.path, f"--images {arg}")
        if not found:
            raise UserError(f"--images {arg}: no images in it (expected files ending in {'/'.join(IMAGE_SUFFIXES)})")
        out.extend(found)
    seen: set[str] = set()
    unique = []
    for f in out:
        real = os.path.realpath(f.path)
        if real not in seen:
            seen.add(real)
            unique.append(f)
    return unique


def read_image_file(path: str) -> bytes:
    """The file's bytes, refused (ValueError/OSError: a bad sample) when it is larger than
    MAX_FILE_BYTES or its header says more than MAX_PIXELS, before anything is decoded."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise ValueError(f"file of {size:,} bytes, over the limit of {MAX_FILE_BYTES:,}")
    data = Path(path).read_bytes()
    fmt, _, _ = check_image_bytes(data, MAX_PIXELS)  # the header only (ImageRefused is a ValueError)
    if fmt not in FILE_FORMATS:  # bmp, tiff, ...: the lossless PNG the shard writer stores for them
        data = encode_image((path, None, 95))[1]
    return data


class FileReader(EvalReader):
    """Each file exactly once over all readers: file i goes to reader i mod readers; the batch's
    `key` is the file's name, `order` its index in the list, `target` -1."""

    image_formats = FILE_FORMATS

    def __init__(self, files: Sequence[ImageFile], transform: Transform, batch_size: int, world_size: int, rank: int):
        super().__init__([], [], transform, None, batch_size, world_size, rank)
        self.files = list(files)
        self.num_samples = len(self.files)

    def reader_samples(self, reader: int, readers: int) -> int:
        return len(range(reader, self.num_samples, readers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dl_worker, nworkers = self._worker()
        readers = self.world_size * nworkers
        batch: list[tuple[torch.Tensor, int, str, int]] = []
        for i in range(self.rank * nworkers + dl_worker, self.num_samples, readers):
            f = self.files[i]
            try:
                sample = {"__key__": f.name, "__url__": f.path, "jpg": read_image_file(f.path)}
            except Exception as e:  # unreadable, too large, not an image: a bad sample
                self._count_bad(f.name, e)
                continue
            item = self._load(sample, None)
            if item is None:
                continue
            batch.append((item[0], item[1], f.name, i))
            if len(batch) == self.batch_size:
                yield eval_collate(batch)
                batch = []
        if batch:
            yield eval_collate(batch)


def build_file_loader(files: Sequence[ImageFile], *, aug: AugmentConfig, batch_size: int, workers: int,
                      world_size: int, rank: int, pin_memory: bool = False) -> EvalLoader:
    """An EvalLoader (the batches `infer` takes) over image files instead of a shard split."""
    _check_loader_args(batch_size, workers, world_size, rank)
    reader = FileReader(files, Transform(aug, train=False), batch_size, world_size, rank)
    return EvalLoader(reader, _data_loader(reader, workers, pin_memory), workers)
