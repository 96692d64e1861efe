"""Walking a source folder without leaving it: what `shard` may pack from a raw image set.

A source folder may come from someone else. Symlinks are followed only when their target is
inside the source tree, and no file or folder is used twice (a link back to a parent would
loop, a link beside its target would pack the same image twice, in both splits); broken links,
FIFOs, devices and sockets are never opened (a FIFO named x.jpg would block `shard` forever).
Each skipped entry is counted under its reason in `Source.ignored`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dist_train.trust.tables import utf8_name

# The reasons this module counts (sources.IGNORE_REASONS lists them with the others).
TREE_REASONS = ("outside_source", "repeated", "special")


class SourceTree:
    """The entries below `root` that may be read, each at most once (first in walk order wins)."""

    def __init__(self, root: Path, ignored: dict[str, int], where: str | None = None):
        self.root = Path(os.path.realpath(root))
        self.where = where or str(self.root)  # what an error line names (default: the root)
        self.ignored = ignored
        self.seen: set[str] = {str(self.root)}
        self._below = os.path.join(str(self.root), "")  # the root and a separator: what entries below start with

    def kind(self, p: Path) -> str | None:
        """"dir" or "file" for an entry that may be used (now marked as used), None for one that
        is skipped (and counted). A name that is not UTF-8 is one UserError line."""
        utf8_name(p, self.where)
        real = os.path.realpath(p)  # strings, not Paths: this runs for every file of the source
        if real != str(self.root) and not real.startswith(self._below):
            return self._skip("outside_source")
        try:
            mode = os.stat(real).st_mode
        except OSError:  # a broken link, or a link loop
            return self._skip("outside_source")
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            return self._skip("special")
        if real in self.seen:
            return self._skip("repeated")
        self.seen.add(real)
        return "dir" if stat.S_ISDIR(mode) else "file"

    def _skip(self, reason: str) -> None:
        self.ignored[reason] += 1
        return None

