"""The task registry: which Task handles a shard set, and the built-in tasks.

A task registers itself with `register`; its raw layouts become known to the shard writer at
the same time. The plug-ins are loaded on first use (`dist_train.plugins`), so generic code that
asks for "the task of this shard set" never imports a particular task. Plain classification
(`Task`) is the fallback for any shard set no registered task claims.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_train import plugins
from dist_train.errors import UserError
from dist_train.shardset.sources import register_layout

from .base import Criterion, RowIds, SuspectTable, TargetFn, Task

CLASSIFY = Task()
_registered: list[Task] = []


def register(task: Task) -> Task:
    """Add a task (and its layouts); tasks registered later are asked first."""
    _registered.insert(0, task)
    for layout in task.layouts:
        register_layout(layout)
    return task


def all_tasks() -> list[Task]:
    """Every task, the plug-ins loaded; plain classification last."""
    plugins.load()
    return [*_registered, CLASSIFY]


def task_for(info: dict) -> Task:
    """The task of a shard set (`_info.json`): the first that claims it."""
    return next(t for t in all_tasks() if t.claims(info))


def build_model(name: str, num_classes: int, head: str = "single", **kwargs: Any) -> torch.nn.Module:
    """The model for `head` from the task that offers it (a run folder records only the head)."""
    for task in all_tasks():
        if head in task.heads and (head != "single" or task is CLASSIFY):
            return task.create_model(name, num_classes, head=head, **kwargs)
    heads = sorted({h for t in all_tasks() for h in t.heads})
    raise UserError(f"--head {head!r}: expected one of {', '.join(heads)}")


__all__ = ["CLASSIFY", "Criterion", "RowIds", "SuspectTable", "TargetFn", "Task", "all_tasks", "build_model", "register",
           "task_for"]
