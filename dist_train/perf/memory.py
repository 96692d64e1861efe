"""What --grad-checkpointing saves: the trainer's peak memory with and without it.

Each setting runs `bench train --synthetic --no-bare` in a fresh process, because both peaks are
process-lifetime figures (CUDA's max allocated, the CPU's peak RSS): measured in one process,
the second run would only see the first one's peak again. Everything but the activations (the
interpreter, the model, its gradients and optimizer state, the one cached batch) is the same in
both processes, so the difference of the two peaks is the activation memory checkpointing saved.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dist_train.errors import UserError

ROOT = Path(__file__).resolve().parent.parent.parent  # the folder holding the dist_train package


def _train_argv(a: argparse.Namespace, checkpointing: bool) -> list[str]:
    argv = [sys.executable, "-m", "dist_train.bench", "train", "--synthetic", "--no-bare", "--model", a.model,
            "--img-size", str(a.img_size), "--batch-size", str(a.batch_size), "--steps", str(a.steps),
            "--warmup", str(a.warmup), "--mixed-precision", a.mixed_precision]
    return argv + ["--channels-last"] * a.channels_last + ["--grad-checkpointing"] * checkpointing


def _run(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode == 2:  # bad input (e.g. a model without checkpointing): its own line
            raise UserError(last.removeprefix("error: "))
        raise RuntimeError(f"bench train failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(a: argparse.Namespace) -> dict:
    if a.steps < 1 or a.warmup < 1:
        raise UserError("--steps and --warmup: expected at least 1")
    off, on = (_run(_train_argv(a, c)) for c in (False, True))
    saving = off["peak_memory_mb"] - on["peak_memory_mb"]
    return {
        "bench": "memory", "model": a.model, "img_size": a.img_size, "batch_size": a.batch_size, "steps": a.steps,
        "warmup": a.warmup, "mixed_precision": a.mixed_precision, "channels_last": a.channels_last,
        "device": off["device"], "memory_kind": off["memory_kind"],
        "peak_memory_mb_without": off["peak_memory_mb"], "peak_memory_mb_with": on["peak_memory_mb"],
        "saving_mb": round(saving, 1), "saving_fraction": round(saving / off["peak_memory_mb"], 3),
        "images_per_s_without": off["trainer_images_per_s"], "images_per_s_with": on["trainer_images_per_s"],
        "slowdown": round(off["trainer_images_per_s"] / on["trainer_images_per_s"], 3),
    }
