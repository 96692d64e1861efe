"""MosaicML Streaming's dataset for `bench peers` (a module of its own: DataLoader workers started
by spawn import it by name, and importing `streaming` costs seconds, paid only when it runs)."""

from __future__ import annotations

from typing import Callable

import torch
from streaming import StreamingDataset


class MDSImages(StreamingDataset):
    """Its docs' pattern: subclass, `__getitem__` decodes the sample and applies the transform."""

    def __init__(self, local: str, batch_size: int, decode: Callable[[bytes], torch.Tensor]):
        super().__init__(local=local, shuffle=True, batch_size=batch_size)
        self.decode = decode

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = super().__getitem__(i)
        return self.decode(sample["image"]), sample["label"]
