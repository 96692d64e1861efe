"""Surviving clusters: preemption signals, a dead rank, bad shards, non-finite losses, remote
(HTTP) shards, and the bad-input matrix. CPU only; DDP runs are 2 gloo ranks.

Every subprocess has a timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, free_port, launch, run_main

BASE = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--lr", "0.01", "--seed", "0",
        "--warmup-epochs", "0", "--val-split", "none", "--no-plots"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
STEPS_PER_EPOCH = 11  # 168 train samples / (8 x 2 ranks), rounded up (the DDP runs below)


def run_py(args: list[str]) -> subprocess.CompletedProcess:
    """One process of dist_train/run.py, in this process (conftest.run_main)."""
    return run_main(args)


def launch_cmd(args: list[str], nproc: int = 2, script: str = "dist_train/run.py") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", script, *args]


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launch and its ranks: torchrun starts each rank in a session of its own, so killing
    the launcher's process group alone would leave them running."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.kill()
    proc.communicate()


@pytest.fixture
def start():
    """start(args, script=, env=): a 2-rank launch in its own session (the test may signal the whole group, as
    SLURM does); whatever is left of it is killed at teardown."""
    procs: list[subprocess.Popen] = []

    def _start(args: list[str], script: str = "dist_train/run.py", env: dict | None = None) -> subprocess.Popen:
        procs.append(subprocess.Popen(launch_cmd(args, script=script), cwd=ROOT, env={**ENV, **(env or {})},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
        return procs[-1]

    yield _start
    for proc in procs:
        if proc.poll() is None:
            kill_tree(proc)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Poll until `path` exists; the run must still be going."""
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended ({proc.returncode}) before {path.name}:\n{out[-2000:]}\n{err[-4000:]}")
        if time.time() > end:
            raise AssertionError(f"no {path} after {timeout}s")
        time.sleep(0.05)


def ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """RANK -> rank process: the launcher (torchrun's agent runs inside it) starts them as children."""
    found = {}
    for child in psutil.Process(proc.pid).children():
        if "dist_train/run.py" in " ".join(child.cmdline()):
            found[int(child.environ()["RANK"])] = child
    assert sorted(found) == [0, 1], found
    return found


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"still running after {timeout}s") from None


def rank_errors(stderr: str) -> list[str]:
    """Errors raised inside a rank (torch prefixes a rank's uncaught exception with [rankN]:)."""
    return [line for line in stderr.splitlines() if re.match(r"\[rank\d+\]:.*(Traceback|Error)", line)]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def error_line(stderr: str, marker: str) -> str:
    """The one line of a log that holds `marker`; it must be a whole `error: ...` line, not
    trail a progress bar (a `grep '^error:'` of the SLURM log must find it)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if marker in line]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: "), f"error message glued to other output: {lines[0]!r}"
    return lines[0]


def final_checkpoint(out: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(name, weights) of the newest complete checkpoint of a run."""
    done = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-") and (p / "progress.json").is_file())
    return done[-1].name, load_file(done[-1] / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(mask_shards, tmp_path_factory) -> dict:
    """One uninterrupted 2-rank run of the resume tests' arguments (--epochs 2 --checkpoint-every 2):
    its last checkpoint's weights and summary.json. --workers 0 or 1 (one reader per rank either
    way) and --dist-timeout give bit-identical weights, so the three resume cases share it."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    launch(["dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "2",
            "--workers", "0", "--checkpoint-every", "2"], timeout=120)
    name, weights = final_checkpoint(out)
    s = summary(out)
    assert name == f"step-{2 * STEPS_PER_EPOCH:08d}" and s["finished"] is True
    return {"name": name, "weights": weights, "summary": s}


def assert_same_weights_as_uninterrupted(out: Path, ref: dict) -> None:
    """The resumed run ends where the uninterrupted one does: same last checkpoint, same weights
    (every parameter and buffer), same parameter hashes in summary.json."""
    name, weights = final_checkpoint(out)
    assert name == ref["name"]
    assert weights.keys() == ref["weights"].keys()
    for k in weights:
        torch.testing.assert_close(weights[k], ref["weights"][k], atol=1e-6, rtol=0,
                                   msg=lambda m, k=k: f"{k} differs from the uninterrupted run: {m}")
    assert summary(out)["param_hash_per_rank"] == ref["summary"]["param_hash_per_rank"]


# ----------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("target, sig, workers", [
    # SLURM preemption: every process of the job, DataLoader workers included; torchrun's agent
    # also forwards its own SIGTERM to each rank's process group.
    ("group", signal.SIGTERM, 1),
    # SLURM's --signal=USR1@300 warning as one rank sees it first: the others must follow.
    ("rank1", signal.SIGUSR1, 0),
], ids=["group-SIGTERM", "rank1-SIGUSR1"])
@pytest.mark.ranks
def test_signal_checkpoints_and_resume_continues(start, mask_shards, uninterrupted, tmp_path, target, sig, workers):
    out = tmp_path / "run"
    args = ["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "2", "--workers", str(workers),
            "--checkpoint-every", "2"]
    proc = start(args)
    wait_for(out / "checkpoints" / "step-00000002", proc)
    signalled = time.time()
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        ranks(proc)[int(target[-1])].send_signal(sig)
    stdout, stderr = finish(proc, timeout=60)
    assert time.time() - signalled < 25, "ranks did not stop by themselves (torchrun kills them after 30 s)"
    assert not rank_errors(stderr), "a rank failed:\n" + "\n".join(rank_errors(stderr))
    if target != "group":  # a signalled launcher (torchrun's agent) exits 1 on its own: outside our control
        assert proc.returncode == 0, stderr[-3000:]
    stops = re.findall(r"stopped by signal at step (\d+)", stdout)
    assert len(stops) == 1, stdout  # one line, from the main process only
    step = int(stops[0])
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["step"] == step and 0 < progress["batch"] < STEPS_PER_EPOCH  # mid-epoch
    assert load_file(ckpt / "model.safetensors")
    s = summary(out)
    assert s["finished"] is False and s["steps_per_rank"] == [step, step]  # both ranks stopped at the same step

    p = launch(["dist_train/run.py", *args, "--resume", "auto"], timeout=120)
    assert f"resumed from {ckpt}" in p.stdout
    s = summary(out)
    assert s["finished"] is True and s["steps_per_rank"] == [2 * STEPS_PER_EPOCH] * 2
    assert s["batches_per_rank"] == [2 * STEPS_PER_EPOCH - step] * 2  # the resumed launch only ran the rest
    assert_same_weights_as_uninterrupted(out, uninterrupted)  # same data order, optimizer state, schedule


def test_ctrl_c_stops_with_a_checkpoint_and_resume_continues(mask_shards, tmp_path, monkeypatch):
    """Ctrl-C mid-epoch (SIGINT) is a stop like SIGTERM's: the step finishes, a checkpoint, exit 0
    and the stop line, no traceback; --resume auto ends the epoch. It was a KeyboardInterrupt
    traceback (one per rank under a launcher) that lost every step since the last checkpoint."""
    from dist_train.train.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_ctrl_c(self, batches):
        loss = real_step(self, batches)
        if self.progress.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, after 3 of the epoch's steps
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    out = tmp_path / "run"
    args = ["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1", "--workers", "0"]

    def not_handled(signum, frame):  # (a KeyboardInterrupt here would end the whole test session)
        raise AssertionError("the training loop left Ctrl-C to the handler before it")

    before = signal.signal(signal.SIGINT, not_handled)
    try:
        p = run_py(args)
        assert signal.getsignal(signal.SIGINT) is not_handled  # Ctrl-C interrupts again once the loop is left
    finally:
        signal.signal(signal.SIGINT, before)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.findall(r"stopped by signal at step (\d+)", p.stdout) == ["4"], p.stdout[-2000:]
    assert (out / "checkpoints" / "step-00000004" / "progress.json").is_file()
    s = summary(out)
    assert s["finished"] is False and s["stopped_by"] == "signal" and s["step"] == 4

    monkeypatch.setattr(Trainer, "train_step", real_step)
    p = run_py([*args, "--resume", "auto"])
    assert p.returncode == 0 and "resumed from" in p.stdout and "step-00000004" in p.stdout, p.stderr[-3000:]
    s = summary(out)
    assert s["finished"] is True and s["epoch"] == 1 and s["batches_per_rank"] == [s["step"] - 4]


def test_a_second_ctrl_c_stops_at_once_and_workers_leave_ctrl_c_to_the_rank(monkeypatch):
    """The terminal's SIGINT and a launcher's copy of it, milliseconds apart, are one Ctrl-C; one
    CTRL_C_AGAIN_S later, a second one raises KeyboardInterrupt (cli_main: one line, exit 130).
    A loader worker ignores SIGINT (it used to end, and the rank with it)."""
    from dist_train.data import loaders
    from dist_train.train import guard as guard_module

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        guard = guard_module.StepGuard(5, 0.01)
        with guard.ctrl_c_stops():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert guard.signalled
            monkeypatch.setattr(guard_module, "CTRL_C_AGAIN_S", 0.0)
            with pytest.raises(KeyboardInterrupt, match="without a checkpoint"):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is saved[signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's Ctrl-C stays ignored
        with guard.ctrl_c_stops():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        loaders._ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.mark.ranks
def test_dead_rank_others_exit_within_timeout_and_restart_resumes(start, mask_shards, uninterrupted, tmp_path):
    """Rank 1 freezes (SIGSTOP: a lost node or a hung NCCL peer, no connection reset to notice),
    then is SIGKILLed. Rank 0 must give up after --dist-timeout, not hang."""
    timeout = 10
    out = tmp_path / "run"
    args = ["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "2", "--workers", "0",
            "--checkpoint-every", "2", "--dist-timeout", str(timeout)]
    proc = start(args)
    wait_for(out / "checkpoints" / "step-00000002", proc)
    survivor, victim = ranks(proc)[0], ranks(proc)[1]
    frozen = time.time()
    victim.suspend()
    try:
        survivor.wait(timeout=timeout + 30)  # psutil.TimeoutExpired: a hang
        assert time.time() - frozen < timeout + 20
    finally:
        victim.kill()
    finish(proc, timeout=40)
    assert proc.returncode != 0

    complete = sorted(p for p in (out / "checkpoints").iterdir() if (p / "progress.json").is_file())
    newest = complete[-1]
    step = json.loads((newest / "progress.json").read_text())["step"]
    assert newest.name == f"step-{step:08d}"
    assert load_file(newest / "model.safetensors")  # intact
    p = launch(["dist_train/run.py", *args, "--resume", "auto"], timeout=120)
    assert f"resumed from {newest}" in p.stdout
    s = summary(out)
    assert s["finished"] is True and s["steps_per_rank"] == [2 * STEPS_PER_EPOCH] * 2
    assert_same_weights_as_uninterrupted(out, uninterrupted)


# ----------------------------------------------------------------------------- bad data and numbers
def _corrupt_shards(src: Path, dst: Path) -> None:
    """A copy of the shard set with one train shard truncated and one image's bytes garbage."""
    shutil.copytree(src, dst)
    names = json.loads((dst / "_info.json").read_text())["splits"]["train"]["filenames"]
    truncated = dst / names[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 5])
    shard = dst / names[4]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    image = next(i for i, (m, _) in enumerate(members) if m.name.endswith((".jpg", ".png")))
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == image:
                data = b"not an image" * 10
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


@pytest.mark.ranks
def test_corrupt_shards_are_counted_and_ranks_stay_in_step(mask_shards, tmp_path):
    bad = tmp_path / "shards"
    _corrupt_shards(mask_shards, bad)
    out = tmp_path / "run"
    p = launch(["dist_train/run.py", "--data", str(bad), "--output", str(out), *BASE, "--epochs", "1", "--workers", "0",
                "--max-bad-fraction", "0.5"], timeout=120)
    assert "skipping bad sample" in p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_samples"] >= 2  # the truncated tar and the undecodable image
    s = summary(out)
    assert s["finished"] is True and s["steps_per_rank"] == [STEPS_PER_EPOCH] * 2
    assert s["batches_per_rank"] == [STEPS_PER_EPOCH] * 2

    p = run_py(["--data", str(bad), "--output", str(tmp_path / "strict"), *BASE, "--epochs", "1", "--workers", "0",
                "--max-bad-fraction", "0"])
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "undecodable samples" in error_line(p.stderr, "--max-bad-fraction 0")


def test_non_finite_losses_skip_steps_then_stop(mask_shards, tmp_path):
    out = tmp_path / "run"
    p = run_py(["--data", str(mask_shards), "--output", str(out), *BASE, "--lr", "1e30", "--epochs", "1",
                "--workers", "0", "--checkpoint-every", "1", "--max-bad-steps", "3"])
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "non-finite losses in a row" in error_line(p.stderr, "--max-bad-steps 3")
    skipped = re.findall(r"non-finite loss at step (\d+): step skipped", p.stdout + p.stderr)
    assert len(skipped) == 3
    # Skipped steps change nothing, BatchNorm statistics included (their forward pass does move them):
    # the checkpoints written during the streak hold the weights from before it.
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 3
    weights = [load_file(c / "model.safetensors") for c in ckpts]
    for c, w in zip(ckpts[1:], weights[1:]):
        changed = [k for k, t in w.items() if t.is_floating_point() and not t.equal(weights[0][k])]
        assert not changed, f"{c.name}: {changed[:4]} changed in a skipped step"
    assert all(json.loads((c / "progress.json").read_text())["updates"] == 1 for c in ckpts)


@pytest.mark.ranks
def test_non_finite_loss_on_one_rank_is_skipped_on_every_rank(mask_shards, tmp_path):
    """Rank 1 alone sees non-finite losses from step 3: both ranks skip steps 3, 4, 5 (the
    decision is all-reduced), both stop themselves at step 5 with exit 1 and one error line from
    the main process, and the checkpoints written during the streak hold the pre-streak weights."""
    out = tmp_path / "run"
    p = launch(["tests/scripts/nonfinite_on_one_rank.py", "--data", str(mask_shards), "--output", str(out), *BASE,
                "--epochs", "1", "--workers", "0", "--checkpoint-every", "1", "--max-bad-steps", "3",
                "--keep-checkpoints", "10"], env={"NAN_RANK": "1", "NAN_FROM": "3"}, check=False, timeout=120)
    assert p.returncode == 1, p.stderr[-3000:]
    assert not rank_errors(p.stderr), "a rank failed:\n" + "\n".join(rank_errors(p.stderr))
    assert "Traceback" not in p.stderr.split("torch/distributed/elastic")[0]  # the ranks' part, before the launcher's
    assert "non-finite losses in a row" in error_line(p.stderr, "--max-bad-steps 3")
    assert re.findall(r"non-finite loss at step (\d+): step skipped", p.stdout) == ["3", "4", "5"]
    stops = [json.loads((out / f"stopped-rank{r}.json").read_text()) for r in (0, 1)]
    assert stops == [{"rank": 0, "step": 5}, {"rank": 1, "step": 5}]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == [f"step-{s:08d}" for s in range(1, 6)]
    pre = load_file(ckpts[2] / "model.safetensors")  # after step 3, the last good one
    assert any(not t.equal(load_file(ckpts[1] / "model.safetensors")[k]) for k, t in pre.items())
    for c in ckpts[3:]:
        w = load_file(c / "model.safetensors")
        changed = [k for k, t in w.items() if not t.equal(pre[k])]
        assert not changed, f"{c.name}: {changed[:4]} changed in a skipped step"


# ----------------------------------------------------------------------------- remote shards
@pytest.fixture
def http_shards(mask_shards):
    """`mask_shards` served by a local HTTP server: the URL of the folder."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(mask_shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.ranks
def test_http_shards_train_ddp_secure(http_shards, mask_shards, tmp_path):
    """Both ranks stream train and validation shards over HTTP, in webdataset's secure mode."""
    info = json.loads((mask_shards / "_info.json").read_text())
    out = tmp_path / "run"
    launch(["dist_train/run.py", "--data", http_shards, "--output", str(out), *BASE, "--val-split", "validation",
            "--epochs", "1", "--workers", "1", "--secure"], timeout=120)
    s = summary(out)
    assert s["finished"] is True and s["world_size"] == 2 and s["steps_per_rank"] == [STEPS_PER_EPOCH] * 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_samples"] == info["splits"]["validation"]["num_samples"]  # each sample once
    assert rows[-1]["bad_samples"] == 0


# ----------------------------------------------------------------------------- bad input matrix
# Refused before any process group exists: checked in-process through run.py's main (the same
# cli_main wrapper), which saves ~4 s of imports per case. (case, flags after `--data
# MASK_SHARDS` ({tmp}: the test's folder, {shards}: MASK_SHARDS), text of the error line)
EARLY_BAD_INPUT = [
    ("no _info.json", ["--data", "{tmp}/no_info"], "no_info: no _info.json"),
    ("unknown val split", ["--val-split", "nope"], "split 'nope' is not in the shard set (available: train, "
     "validation): pass --val-split NAME to validate on another split, or --val-split none to train without validation"),
    ("yaml is a folder", ["--config", "{tmp}/conf.yaml"], "conf.yaml: cannot read"),
    ("yaml missing", ["--config", "{tmp}/missing.yaml"], "missing.yaml: cannot read"),
    ("bad fraction > 1", ["--max-bad-fraction", "2"], "--max-bad-fraction 2"),
    ("dist timeout 0", ["--dist-timeout", "0"], "--dist-timeout 0"),
    ("max bad steps 0", ["--max-bad-steps", "0"], "--max-bad-steps 0"),
    ("secure pipe:", ["--data", "pipe:cat {shards}/{{}}", "--secure"], "refused with --secure"),
    # a pipe: root is read like a folder (here its _info.json, up to the bad split)
    ("pipe: root, bad split", ["--data", "pipe:cat {shards}/{{}}", "--train-split", "nope"],
     "split 'nope' is not in the shard set (available: train, validation)"),
]


def _assert_one_line_exit_2(code: int, stderr: str, message: str) -> None:
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and message in stderr, stderr


@pytest.mark.parametrize("args, message", [c[1:] for c in EARLY_BAD_INPUT], ids=[c[0] for c in EARLY_BAD_INPUT])
def test_bad_input_one_line_exit_2(mask_shards, tmp_path, capsys, monkeypatch, args, message):
    import webdataset

    from dist_train.run import main

    # train() may switch webdataset's secure mode on for this process: undo it after the test.
    monkeypatch.setattr(webdataset.utils, "enforce_security", webdataset.utils.enforce_security)
    monkeypatch.delenv("WDS_SECURE", raising=False)
    (tmp_path / "no_info" / "x").mkdir(parents=True)
    (tmp_path / "conf.yaml").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(mask_shards), "--output", str(tmp_path / "o"), *BASE, "--epochs", "1", "--workers", "0",
              *(a.format(tmp=tmp_path, shards=mask_shards) for a in args)])
    _assert_one_line_exit_2(exit_.value.code, capsys.readouterr().err, message)


def test_global_batch_larger_than_split(mask_shards, tmp_path):
    """Counts processes and accumulation too: 60 x 1 x 3 = 180 > 168 although 60 < 168."""
    p = run_py(["--data", str(mask_shards), "--output", str(tmp_path / "o"), *BASE, "--epochs", "1",
                "--workers", "0", "--batch-size", "60", "--grad-accum-steps", "3"])
    _assert_one_line_exit_2(p.returncode, p.stderr, "global batch 180")


def test_resume_from_other_class_count_refused(mask_shards, folder_shards, tmp_path):
    out = tmp_path / "run"
    common = [*BASE, "--epochs", "1", "--workers", "0", "--output", str(out)]
    p = run_py(["--data", str(folder_shards), *common, "--max-steps", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_py(["--data", str(mask_shards), *common, "--resume", "auto"])
    _assert_one_line_exit_2(p.returncode, p.stderr, "with 3 classes")
    assert "18" in p.stderr


def test_resume_on_other_classes_image_size_or_ema_refused(folder_shards, tmp_path):
    """Same model and class count, but another label set (another --data) or another --img-size:
    one line naming both and what to pass, nothing loaded or written. Both used to train on
    silently (output i then meant another class), or, for a ViT's size, fail with a cut
    `Error(s) in loading state_dict` line."""
    from PIL import Image

    from dist_train.shardset.writer import write_shards

    src = tmp_path / "fruit"
    for c, name in enumerate(["apple", "banana", "cherry"]):
        (src / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (80 * c, 8 * i, 40)).save(src / name / f"{i}.png")
    fruit = tmp_path / "fruit-shards"
    write_shards(src, fruit, layout="folder", samples_per_shard=10, workers=1, progress=False)
    out = tmp_path / "run"
    common = [*BASE, "--epochs", "1", "--workers", "0", "--output", str(out), "--batch-size", "4"]
    p = run_py(["--data", str(folder_shards), *common, "--max-steps", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    files = sorted(out.rglob("*"))
    p = run_py(["--data", str(fruit), *common, "--resume", "auto"])
    _assert_one_line_exit_2(p.returncode, p.stderr, "classes are class0, class1, class2, --data's are apple, banana")
    p = run_py(["--data", str(folder_shards), *[a if a != "32" else "48" for a in common], "--resume", "auto"])
    _assert_one_line_exit_2(p.returncode, p.stderr, "trained at --img-size 32, this run asks for 48: pass --img-size 32")
    p = run_py(["--data", str(folder_shards), *common, "--resume", "auto", "--model-ema"])  # was a cut Accelerate line
    _assert_one_line_exit_2(p.returncode, p.stderr, "saved without --model-ema, this run asks for it: resume without")
    p = run_py(["--data", str(folder_shards), *common, "--resume", "auto", "--opt", "sgd"])  # was a KeyError at the step
    _assert_one_line_exit_2(p.returncode, p.stderr, "optimizer is not this run's SGD (its settings have no momentum")
    assert sorted(out.rglob("*")) == files
    # a changed --weight-decay is this run's (torch took the checkpoint's and ignored the flag); moments stay
    p = run_py(["--data", str(folder_shards), *common, "--resume", "auto", "--max-steps", "2", "--weight-decay", "0.3",
                "--layer-decay", "0.5"])
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    groups = torch.load(out / "checkpoints" / "step-00000002" / "optimizer.bin", weights_only=True)["param_groups"]
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.3]
    assert sorted({g["lr_scale"] for g in groups})[-2:] == [0.5, 1.0]  # the head at 1, the group below at 0.5


def test_pretrained_path_of_another_model_refused(mask_shards, tmp_path):
    import timm

    weights = tmp_path / "effnet.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=18).state_dict(), weights)
    p = run_py(["--data", str(mask_shards), "--output", str(tmp_path / "o"), *BASE, "--epochs", "1",
                "--workers", "0", "--pretrained-path", str(weights)])
    _assert_one_line_exit_2(p.returncode, p.stderr, f"--pretrained-path {weights}: weights do not fit test_resnet")


# ----------------------------------------------------------------------------- kill -9 at any moment
def kill9(proc: subprocess.Popen) -> str:
    """SIGKILL the launcher and every rank at once (no handler runs); returns its stdout."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(9)
    return proc.communicate(timeout=30)[0]


def wait_until(ready, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.time() < end, f"no {what} after {timeout}s"
        time.sleep(0.005)


def kill_moments(root: Path) -> list[tuple[str, str, object, int, bool]]:
    """Per killed launch: (description, SLOW_SAVE, ready(), the newest complete checkpoint it
    leaves at least, whether that is exact: the write of the next one was held open)."""
    tmp = lambda s: root / f".tmp-step-{s:08d}"  # noqa: E731

    seen: list[float] = []

    def between_checkpoints() -> bool:  # mid-epoch 1: a step after step-14 was written, no write under way
        if not seen and (root / "step-00000014").is_dir():
            seen.append(time.time())
        return bool(seen) and time.time() - seen[0] > 0.1 and not any(root.glob(".*-step-*"))

    return [
        ("state half-written: model.safetensors, no optimizer.bin yet", "0.5",
         lambda: (tmp(4) / "model.safetensors").is_file() and not (tmp(4) / "optimizer.bin").exists(), 2, True),
        ("progress.json written, folder not yet renamed", "0.5", lambda: (tmp(6) / "progress.json").is_file(), 4, True),
        ("right after a rename", "", lambda: (root / "step-00000008").is_dir(), 8, False),
        ("mid-epoch, between checkpoints", "", between_checkpoints, 14, False),
    ]


@pytest.mark.ranks
def test_kill_9_at_any_moment_resumes_from_a_good_checkpoint(start, mask_shards, uninterrupted, tmp_path):
    """The whole launch SIGKILLed at 4 moments of its checkpoint cycle (tests/scripts/
    faulty_checkpoints.py slows the main process's writes so that the first two can be hit):
    each time every complete checkpoint verifies, the next --resume auto starts from the newest,
    and the run ends at the uninterrupted run's step with its exact weights."""
    from dist_train.train.checkpoint import Checkpointer
    from dist_train.train.integrity import verify

    out = tmp_path / "run"
    argv = ["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "2", "--workers", "0",
            "--checkpoint-every", "2", "--resume", "auto"]
    newest = None
    for what, slow, ready, least, exact in kill_moments(out / "checkpoints"):
        proc = start(argv, script="tests/scripts/faulty_checkpoints.py", env={"SLOW_SAVE": slow})
        wait_until(ready, proc, what)
        stdout = kill9(proc)
        if newest is not None:
            assert f"resumed from {newest}" in stdout, stdout[-2000:]
        done = Checkpointer(out, keep=1).complete()
        assert done and all(verify(c).good for c in done), f"after a kill ({what}): {[verify(c).line() for c in done]}"
        newest = done[-1]
        assert newest.name == f"step-{least:08d}" if exact else newest.name >= f"step-{least:08d}", (what, newest)
        if exact:  # the kill hit the write: its partial folder is still there, never taken for complete
            assert (out / "checkpoints" / f".tmp-step-{least + 2:08d}").is_dir(), (what, newest)
    p = launch(["dist_train/run.py", *argv], timeout=120)
    assert f"resumed from {newest}" in p.stdout
    s = summary(out)
    assert s["finished"] is True and s["steps_per_rank"] == [2 * STEPS_PER_EPOCH] * 2
    assert_same_weights_as_uninterrupted(out, uninterrupted)


@pytest.mark.ranks
def test_time_limit_stops_every_rank_at_the_same_step_and_resumes(mask_shards, tmp_path):
    """2 ranks, a real 6 s budget for 1000 epochs (more than any machine runs in 6 s): they agree on the stop (like a signal), write a
    checkpoint, and the run is not finished; --resume auto continues from that checkpoint."""
    out = tmp_path / "run"
    args = ["dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1000",
            "--workers", "0"]
    p = launch([*args, "--time-limit", "6s"], timeout=120)
    s = summary(out)
    assert s["stopped_by"] == "time-limit" and s["finished"] is False, s
    step = s["step"]
    assert s["steps_per_rank"] == [step, step] and 0 < step < 1000 * STEPS_PER_EPOCH
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    assert ckpt.is_dir() and len(re.findall(r"to stay within --time-limit 6s", p.stdout)) == 1
    p = launch([*args, "--resume", "auto", "--max-steps", str(step + 2)], timeout=120)
    assert f"resumed from {ckpt}" in p.stdout
    s = summary(out)
    assert s["finished"] is True and s["stopped_by"] is None and s["steps_per_rank"] == [step + 2] * 2
