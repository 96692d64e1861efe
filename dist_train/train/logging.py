"""What a run reports: the progress bar (and the trackers' per-step loss and LR), the start
summary, and summary.json (per-rank step counts and parameter hashes, so divergence cannot go unnoticed)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from dist_train.errors import atomic_write_json

from .checkpoint import Progress


class Meter:
    """Training loss and throughput since the last evaluation (kept on the device: no sync per step)."""

    def __init__(self, device: torch.device, num_classes: int) -> None:
        self.device, self.num_classes = device, num_classes
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.n, self.images, self.t0, self.wait_s = 0, 0, time.time(), 0.0
        self.classes = torch.zeros(self.num_classes, dtype=torch.int64)

    def count(self, targets: torch.Tensor) -> None:
        """The (hard, CPU) targets of a batch, before Mixup: which classes the trainer consumed."""
        self.classes += torch.bincount(targets[targets >= 0].cpu(), minlength=self.num_classes)[: self.num_classes]

    def class_counts(self, acc: Accelerator) -> list[int]:
        """Samples per class since the last reset, over all ranks."""
        return acc.reduce(self.classes.to(acc.device), reduction="sum").tolist()

    def add(self, loss: torch.Tensor, finite: torch.Tensor, images: int) -> None:
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.n += 1
        self.images += images

    def images_per_s(self, world: int) -> float:
        return self.images * world / max(time.time() - self.t0, 1e-9)

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """`batches` (any loader), the wall time of each `next` counted as waiting for data."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - start
            yield batch

    def data_wait(self, acc: Accelerator) -> float:
        """The share of the time since the last reset that the slowest rank's training loop spent
        waiting for its loader (`timed`; timm's data time): near 0 when the model sets the pace."""
        share = torch.tensor(self.wait_s / max(time.time() - self.t0, 1e-9), device=acc.device)
        return min(1.0, float(acc.reduce(share, reduction="max").item()))

    def train_loss(self, acc: Accelerator) -> float:
        return acc.reduce(self.loss_sum, reduction="mean").item() / max(self.n, 1)


class ProgressBar:
    """tqdm on the main process; every `every` steps, the only moments the loss leaves the device,
    the postfix (loss, lr, images/s) and the trackers get the main process's mean loss over those
    steps (`train_loss_step`, the configured loss) and the head's LR (`lr_step`)."""

    def __init__(self, acc: Accelerator, total: int, initial: int, every: int) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not acc.is_main_process, dynamic_ncols=True)
        self.acc, self.every = acc, every
        self.window, self.n = torch.zeros((), device=acc.device), 0

    def step(self, step: int, loss: torch.Tensor, lr: float, images_per_s: float) -> None:
        self.bar.update(1)
        self.window += loss.detach().float()
        self.n += 1
        if step % self.every == 0:
            mean = self.window.item() / self.n
            self.window.zero_()
            self.n = 0
            self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            self.acc.log({"train_loss_step": mean, "lr_step": lr}, step=step)

    def close(self) -> None:
        self.bar.close()


class SampleLog:
    """`--log-samples FILE`: every rank appends one JSON line per optimizer step, the keys of
    that step's samples on that rank and the LR the step used, so the data order can be checked.
    Each line is one write to a file opened for appending, so ranks' lines do not interleave."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, epoch: int, step: int, rank: int, lr: float, keys: list[str]) -> None:
        line = json.dumps({"epoch": epoch, "step": step, "rank": rank, "lr": lr, "keys": keys}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers on every rank, in one collective (what DDP does before each forward)."""
    buffers = [b for b in model.buffers() if b.numel()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
    torch.distributed.broadcast(flat, src=0)
    for b, part in zip(buffers, torch.split(flat, [b.numel() for b in buffers])):
        b.copy_(part.view_as(b).to(b.dtype))


def write_summary(acc: Accelerator, model: torch.nn.Module, progress: Progress, batches_seen: int, out: Path,
                  finished: bool, stopped_by: str | None = None, ema: torch.nn.Module | None = None) -> None:
    """`summary.json`: per-rank step and batch counts and a hash of every parameter and buffer.

    Under DDP all of them must agree; a difference means ranks diverged, which would otherwise
    go unnoticed until someone compares the weights. `finished`: the run reached its end
    (--epochs, --max-steps, or --patience): nothing is left for --resume auto; `stopped_by`: why
    it stopped early (signal, time-limit, patience), None when it ran to its end. `best`: the
    best evaluation (epoch, step, weights, val_macro_f1, val_acc, val_loss), null before the
    first; `best_val_macro_f1` null when no evaluation scored one (no validation split, or none
    ran yet).
    """
    raw = acc.unwrap_model(model)
    if acc.num_processes > 1:
        # DDP broadcasts rank 0's buffers at the start of each forward, so after the last training
        # step every rank still holds BatchNorm statistics of its own last batch. Adopt rank 0's, as
        # the next forward would; parameters are left alone: a difference there is real divergence.
        broadcast_buffers(raw)
    mine = [{"step": progress.step, "batches": batches_seen, "hash": state_hash(raw),
             "ema": None if ema is None else state_hash(ema)}]
    everyone = gather_object(mine) if acc.num_processes > 1 else mine
    if acc.is_main_process:
        summary = {"finished": finished, "stopped_by": stopped_by, "world_size": acc.num_processes,
                   "epoch": progress.epoch, "step": progress.step,
                   "best_val_macro_f1": progress.best_f1 if progress.best_f1 >= 0 else None,
                   "best": progress.best,
                   "steps_per_rank": [r["step"] for r in everyone],
                   "batches_per_rank": [r["batches"] for r in everyone],
                   "param_hash_per_rank": [r["hash"] for r in everyone]}
        if ema is not None:
            summary["ema_hash_per_rank"] = [r["ema"] for r in everyone]
        if len(set(summary["param_hash_per_rank"])) > 1:
            print("dist_train: WARNING: parameters differ across ranks", file=sys.stderr)
        atomic_write_json(out / "summary.json", summary)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def precision_used(acc: Accelerator) -> str:
    """The precision the steps run in. Accelerate keeps `mixed_precision` as asked where it has no
    autocast for it (fp16 on the CPU) and runs fp32 without a word."""
    if acc.mixed_precision == "no" or acc.native_amp:
        return acc.mixed_precision
    return (f"no ({acc.mixed_precision} was asked, but Accelerate has no {acc.mixed_precision} autocast on "
            f"{acc.device.type}: the steps run in fp32; bf16 is the CPU's mixed precision)")


def start_lines(acc: Accelerator, facts: dict[str, Any]) -> str:
    """The start summary: world size first, so a launch that did not form a group shows at once."""
    f, world = facts, acc.num_processes
    workers = ("0 workers (loading in the main process)" if f["workers"] == 0
               else _count(f["workers"], "worker") + " each")
    text = (f"dist_train: world size {world} ({acc.distributed_type.value}), device {acc.device}, "
            f"precision {precision_used(acc)}\n"
            f"  model {f['model']}: {f['params']:,} params, {f['trainable']:,} trainable; {f['weights']}\n"
            f"  global batch {f['global_batch']}, {f['batches']} batches / {f['steps_per_epoch']} steps per epoch, "
            f"{f['train_samples']} train samples in {_count(f['shards'], 'shard')}; {_count(world, 'rank')} x {workers}")
    if world * max(1, f["workers"]) > 1:  # readers read contiguous pieces; neighbours share their edge shards
        text += f"; rank 0's readers read from {f['shards_per_rank']} of the {f['shards']} shards"
    text += f"\n  output {f['output']}"
    if f.get("empty_classes"):  # e.g. a set sharded with --classes-from that lacks them
        names = f["empty_classes"]
        one = len(names) == 1
        text += (f"\n  no training sample of {'class' if one else f'{len(names)} classes'} "
                 f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''}: the model only learns not to "
                 f"predict {'it' if one else 'them'}")
    if f.get("validation"):
        text += f"\n  validation: split {f['validation']}"
    else:
        text += ("\n  no validation split: best/ gets the weights at each epoch end (the last one's in the end; "
                 "the EMA's with --model-ema)")
    if f.get("resumed_from"):
        text += f"\n  resumed from {f['resumed_from']}"
    return text
