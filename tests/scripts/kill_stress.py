"""kill -9 at random moments, by hand (the suite's test kills at 4 chosen moments instead).

    python tests/scripts/kill_stress.py --data SHARDS --work DIR [--rounds 4] [--seed 0] [--max-delay 0.6]

Per round: an uninterrupted 2-rank run is the reference (once); then a fresh run is launched
with `--resume auto` again and again, each launch SIGKILLed (launcher and ranks) a random
0..max-delay s after it first writes into checkpoints/, until a checkpoint of the last step
exists; after every kill each complete checkpoint must verify; a last launch finishes and its
weights must equal the reference's. Prints one line per kill and a verdict per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dist_train.train.checkpoint import Checkpointer  # noqa: E402
from dist_train.train.integrity import verify  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
TRAIN = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--lr", "0.01", "--seed", "0",
         "--warmup-epochs", "0", "--val-split", "none", "--epochs", "2", "--workers", "0", "--checkpoint-every", "2"]


def command(data: str, out: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend",
            "no", "dist_train/run.py", "--data", data, "--output", str(out), *TRAIN, "--resume", "auto"]


def kill_once(data: str, out: Path, port: int, max_delay: float, rng: random.Random) -> str:
    """One launch killed at a random moment; returns what was in checkpoints/ just before."""
    root = out / "checkpoints"
    listing = lambda: set(p.name for p in root.iterdir()) if root.is_dir() else set()  # noqa: E731
    before = listing()
    proc = subprocess.Popen(command(data, out, port), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.time() + 120
    while proc.poll() is None and time.time() < end and not listing() - before:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, max_delay))
    seen = sorted(n for n in listing() if n.startswith("."))
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(9)
    proc.wait()
    return ", ".join(seen) or "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=0.6)
    a = ap.parse_args()
    rng, ref = random.Random(a.seed), a.work / "reference"
    if not (ref / "summary.json").is_file():
        subprocess.run(command(a.data, ref, 29650), cwd=ROOT, env=ENV, check=True, capture_output=True)
    last = Checkpointer(ref, keep=1).latest()
    for r in range(a.rounds):
        out, kills = a.work / f"run{r}", 0
        while (newest := Checkpointer(out, keep=1).latest()) is None or newest.name != last.name:
            seen = kill_once(a.data, out, 29660 + kills % 50, a.max_delay, rng)
            kills += 1
            done = Checkpointer(out, keep=1).complete()
            bad = [verify(c).line() for c in done if not verify(c).good]
            print(f"round {r} kill {kills}: partial folders at the kill: {seen}; newest complete "
                  f"{done[-1].name if done else 'none'}; damaged: {bad or 'none'}", flush=True)
        subprocess.run(command(a.data, out, 29640), cwd=ROOT, env=ENV, check=True, capture_output=True)
        same = all(torch.equal(t, load_file(last / "model.safetensors")[k])
                   for k, t in load_file(out / "checkpoints" / last.name / "model.safetensors").items())
        steps = json.loads((out / "summary.json").read_text())["steps_per_rank"]
        print(f"round {r}: {kills} kills, steps {steps}, weights identical to the reference: {same}", flush=True)


if __name__ == "__main__":
    main()
