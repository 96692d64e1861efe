"""What all ranks must agree on before each optimizer step, and the limits that stop a run.

- A non-finite loss on any rank: every rank skips the step (gradients dropped, BatchNorm
  statistics restored to before it); `max_bad_steps` in a row stop the run, leaving the last
  good checkpoint as it was. Skipping only helps when there is a good state to stay in: a
  non-finite loss before any good update (the first batches already give NaN, or an infinite
  --lr), or once the weights themselves are non-finite, stops the run at once (RunFailed).
  Non-finite weights are never written to best/ (`require_finite`).
- SIGTERM/SIGUSR1 (as SLURM sends before preemption) on any rank, or Ctrl-C (SIGINT) during
  the training loop: every rank finishes the same step, checkpoints and exits 0. Ranks are signalled at different moments, hence the
  agreement, in one all-reduce per step.
- `--time-limit`: when the next steps and a checkpoint would not fit before the deadline on
  any rank, the same: a clean stop that `--resume auto` continues.
- Too many undecodable samples in an epoch (`max_bad_fraction`): the run stops.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from dist_train.errors import RunFailed, UserError, is_out_of_memory

# A second Ctrl-C at least this long after the first stops at once. Launchers (torchrun's agent,
# `dist-train --processes N`) forward the terminal's SIGINT to ranks that got it from the
# terminal already, milliseconds apart: that pair is one Ctrl-C.
CTRL_C_AGAIN_S = 1.0


class StepGuard:
    """`time_limit` (seconds from now, None: none) and `clock` (monotonic seconds) for the time budget."""

    def __init__(self, max_bad_steps: int, max_bad_fraction: float, time_limit: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bad_steps = max_bad_steps
        self.max_bad_fraction = max_bad_fraction
        self.bad_in_row = 0
        self.signalled = False
        self.clock = clock
        self.deadline = None if time_limit is None else clock() + time_limit
        self._last_check: float | None = None
        self.step_s = 0.0  # the longest step seen: the next one may take as long
        self.save_s = 0.0  # the longest checkpoint save seen
        self._buffers: list[torch.Tensor] = []
        self._params: list[torch.Tensor] = []
        self._snapshot: list[torch.Tensor] = []
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signalled = True

    @contextlib.contextmanager
    def ctrl_c_stops(self) -> Iterator[None]:
        """Ctrl-C inside: a stop like SIGTERM's (the same step on every rank, a checkpoint, exit
        0, `--resume auto` continues); Ctrl-C again CTRL_C_AGAIN_S later raises KeyboardInterrupt
        (one line, exit 130: the newest complete checkpoint stays). SIGINT ignored (a background
        job) stays ignored; the handler before is put back on the way out."""
        first: list[float] = []

        def handler(signum: int, frame: Any) -> None:
            now = time.monotonic()
            if first and now - first[0] >= CTRL_C_AGAIN_S:
                raise KeyboardInterrupt("stopped at once, without a checkpoint: --resume auto continues from the "
                                        "newest complete one")
            first[:] = first or [now]
            self.signalled = True

        before = signal.getsignal(signal.SIGINT)
        if before is signal.SIG_IGN:
            yield
            return
        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, before)

    def watch(self, model: torch.nn.Module) -> None:
        """The buffers a skipped step restores (BatchNorm must not keep a skipped step's forwards)."""
        self._buffers = list(model.buffers())
        self._params = list(model.parameters())
        self._snapshot = [b.detach().clone() for b in self._buffers]

    def snapshot(self) -> None:
        if self._buffers:
            torch._foreach_copy_(self._snapshot, self._buffers)

    def restore(self) -> None:
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._snapshot)

    def note_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def _out_of_time(self) -> bool:
        """Whether two more steps and a checkpoint would pass the deadline."""
        now = self.clock()
        if self._last_check is not None:
            self.step_s = max(self.step_s, now - self._last_check)
        self._last_check = now
        return self.deadline is not None and now + 2 * self.step_s + self.save_s >= self.deadline

    def check(self, acc: Accelerator, nonfinite: torch.Tensor, step: int,
              trained: bool = True) -> tuple[bool, str | None]:
        """-> (skip this step, why to stop after it: "signal", "time-limit" or None), the same on every rank.
        `trained`: whether a good update was made before this step (in this run or the one resumed)."""
        local = [nonfinite.float(), torch.tensor(float(self.signalled)), torch.tensor(float(self._out_of_time()))]
        flags = torch.stack([f.to(nonfinite.device) for f in local])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        skip, signalled, late = (flags > 0).tolist()
        stop = "signal" if signalled else "time-limit" if late else None
        self.bad_in_row = self.bad_in_row + 1 if skip else 0
        if skip:
            self._nothing_to_go_back_to(step, trained)
        if skip and acc.is_main_process:
            tqdm.write(f"dist_train: non-finite loss at step {step}: step skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.max_bad_steps:
            raise RunFailed(f"{self.bad_in_row} non-finite losses in a row (--max-bad-steps {self.max_bad_steps}) at "
                            f"step {step}: stopped; the newest checkpoint is the last good one (lower --lr or use --clip-grad)",
                            all_ranks=True)
        return skip, stop

    def _nothing_to_go_back_to(self, step: int, trained: bool) -> None:
        """A skipped step keeps the weights as they are: useless before any good update, or when
        they are already non-finite. Both facts are the same on every rank (the skip is agreed,
        DDP keeps the parameters identical)."""
        if not trained:
            raise RunFailed(f"non-finite loss at step {step}, before any good update: the model gives NaN/inf from "
                            "the start, so there is no good state to keep; check --lr and the inputs (lower --lr, "
                            "--clip-grad); nothing was written to best/", all_ranks=True)
        if not all_finite(self._params):
            raise RunFailed(f"non-finite loss at step {step} with non-finite weights: an earlier update overflowed "
                            "(--lr too large?), skipping steps cannot recover; the newest checkpoint before it is "
                            "the last good one (lower --lr or use --clip-grad)", all_ranks=True)

    def check_bad_samples(self, bad: int, seen: int, epoch: int) -> None:
        """`bad` undecodable samples (all ranks) among `seen` delivered this epoch."""
        if bad > self.max_bad_fraction * max(seen, 1):
            raise RunFailed(f"{bad} undecodable samples in epoch {epoch} exceed --max-bad-fraction "
                            f"{self.max_bad_fraction}: check the shards with `python -m dist_train.shard --inspect`",
                            all_ranks=True)


def all_finite(tensors: Any) -> bool:
    """Whether every floating-point tensor among `tensors` holds finite values only."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def require_finite(acc: Accelerator, module: torch.nn.Module, what: str) -> None:
    """RunFailed on every rank when `module`'s weights (parameters and buffers) are not all
    finite on any: nothing non-finite is saved as `what`."""
    bad = torch.tensor(float(not all_finite(module.state_dict().values())), device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item() > 0:
        raise RunFailed(f"the weights are not finite (NaN/inf): not saved to {what}; the run diverged (lower --lr "
                        "or use --clip-grad)", all_ranks=True)


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int, img_size: int, device: Any) -> Iterator[None]:
    """A step that runs out of memory ends the run with one line naming the settings to lower:
    the allocator's own message names neither."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(
            f"out of memory in a training step on {device} with --batch-size {batch_size} and "
            f"--img-size {img_size} (one batch is {batch_size * 3 * img_size * img_size * 4:,} bytes of float32 "
            "input alone): use a smaller --batch-size (and --grad-accum-steps to keep the global batch) or a "
            "smaller --img-size") from None
