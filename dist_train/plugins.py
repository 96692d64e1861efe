"""Loading the plug-ins: the built-in tasks and those of installed packages.

A task (its layouts, labels, heads, metrics, prediction rows) registers itself when its module
is imported. Whoever needs the registries (the shard writer's layouts, the trainer's task
lookup) calls `load()` first, so the generic packages never import a task themselves. Another
package adds its own with an entry point in the group `dist_train.tasks`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN = ("dist_train.tasks.mask",)
ENTRY_POINT_GROUP = "dist_train.tasks"
_loaded = False


def load() -> None:
    """Import every plug-in once (later calls return at once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
