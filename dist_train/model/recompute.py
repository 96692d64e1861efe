"""Gradient checkpointing (`--grad-checkpointing`): activations recomputed in backward, not kept.

timm models checkpoint their blocks themselves (`model.set_grad_checkpointing()`, through
`timm.models.checkpoint_seq`, non-reentrant): the forward keeps only each block's input, and the
backward runs the block's forward again to get the rest. Gradients come out the same, but that
second forward is a training-mode forward, so every BatchNorm inside a checkpointed block would
update its running statistics (and `num_batches_tracked`) twice per step. `KeepRunningStats`
undoes the second update: it copies the buffers after the forward and puts them back after the
backward, so a run with checkpointing ends with the same statistics as one without.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from dist_train.errors import UserError


def set_grad_checkpointing(model: torch.nn.Module, name: str) -> None:
    """Turn on timm's gradient checkpointing; a model without it is a UserError (one line)."""
    fn = getattr(model, "set_grad_checkpointing", None)
    if fn is None:
        raise UserError(f"--grad-checkpointing: model {name} ({type(model).__name__}) has no "
                        "set_grad_checkpointing(); drop the flag")
    try:
        fn(True)
    except (AssertionError, NotImplementedError) as e:  # timm's way to say "not for this architecture"
        why = f" ({e})" if str(e) else ""
        raise UserError(f"--grad-checkpointing: timm model {name} does not support gradient checkpointing{why}; "
                        "drop the flag or pick another model") from None


class KeepRunningStats:
    """`with keep(model): loss.backward()` restores, after the backward, every buffer of the
    modules in training mode to its value before it (see the module doc). Disabled, it does
    nothing. The copies are allocated once and reused while the model's buffers stay the same
    tensors (they change when the model moves to another device or memory format)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._buffers: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    @contextlib.contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        buffers = [b for m in model.modules() if m.training for b in m.buffers(recurse=False)]
        if len(buffers) != len(self._buffers) or any(a is not b for a, b in zip(buffers, self._buffers)):
            self._buffers, self._saved = buffers, [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._saved, buffers)
        yield
        if buffers:
            torch._foreach_copy_(buffers, self._saved)
