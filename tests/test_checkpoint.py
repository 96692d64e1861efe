"""Checkpoints that survive damage: verified before loading (falling back past a damaged one),
`python -m dist_train.checkpoint --verify`, writes that fail (a full disk, on one rank or all)
leaving every earlier checkpoint intact, nothing in a checkpoint able to run code, and kill -9
of the whole launch at several moments of a checkpoint write (in test_robust, which holds the
uninterrupted 2-rank run it compares with).

In-process runs go through run.py's main (conftest.run_main); DDP runs are 2 gloo ranks.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import dist_train.train.checkpoint as checkpoint
from conftest import launch, run_main
from dist_train.checkpoint import main as verify_main
from dist_train.train.checkpoint import read_progress
from dist_train.train.integrity import digest, manifest, verify
from test_robust import BASE, summary

STEP_FIELDS = {"epoch", "step", "updates", "best_f1", "stage", "stage_start"}  # Progress's, at the top level


def args(shards: Path, out: Path, *more: str) -> list[str]:
    return ["--data", str(shards), "--output", str(out), *BASE, "--epochs", "1", "--workers", "0",
            "--checkpoint-every", "1", "--keep-checkpoints", "10", *more]


def one_error_line(p: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The run ended with `code` and exactly one line starting `error: `, holding `words`."""
    assert p.returncode == code, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), p.stderr[-3000:]
    return errors[0]


def warnings_of(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in p.stderr.replace("\r", "\n").splitlines() if line.startswith("warning: ")]


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def four_steps(mask_shards, tmp_path_factory) -> Path:
    """A one-process run with a checkpoint after each of its 4 steps (copy it before changing it)."""
    out = tmp_path_factory.mktemp("four") / "run"
    p = run_main(args(mask_shards, out, "--max-steps", "4"))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture
def run4(four_steps, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    return out


# ----------------------------------------------------------------------------- 1. verified resume
def test_progress_json_lists_every_file_and_keeps_its_fields(run4):
    """Progress stays at the top level (older readers), `files` holds each file's size and sha256."""
    c = ckpt(run4, 4)
    state = json.loads((c / "progress.json").read_text())
    assert STEP_FIELDS <= set(state) and state["step"] == 4
    names = sorted(p.name for p in c.iterdir() if p.name != "progress.json")
    assert sorted(state["files"]) == names and {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(names)
    assert all(state["files"][n] == digest(c / n) for n in names)
    assert read_progress(c).step == 4 and not hasattr(read_progress(c), "files")
    assert all(verify(ckpt(run4, s)).good for s in range(1, 5))


def damage(run: Path) -> dict[int, str]:
    """Steps 4, 3, 2 damaged three ways; what the warning must say about each."""
    opt = ckpt(run, 4) / "optimizer.bin"
    size = opt.stat().st_size
    with open(opt, "r+b") as f:
        f.truncate(1000)
    model = ckpt(run, 3) / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    (ckpt(run, 2) / "random_states_0.pkl").unlink()
    return {4: f"optimizer.bin truncated (1,000 of {size:,} bytes)", 3: "model.safetensors altered",
            2: "random_states_0.pkl missing"}


def test_resume_auto_falls_back_past_damaged_checkpoints(mask_shards, run4):
    said = damage(run4)
    p = run_main(args(mask_shards, run4, "--max-steps", "5", "--resume", "auto"))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = warnings_of(p)
    assert len(lines) == 3, p.stderr[-3000:]
    for line, step in zip(lines, (4, 3, 2)):
        assert f"checkpoint {ckpt(run4, step)} is damaged: {said[step]}" in line and "falling back" in line
    assert f"resumed from {ckpt(run4, 1)}" in p.stdout
    assert summary(run4)["steps_per_rank"] == [5]
    assert all(verify(ckpt(run4, s)).good for s in range(1, 6))  # the resumed run wrote over the damaged ones


def test_no_good_checkpoint_is_refused_and_a_damaged_path_too(mask_shards, run4):
    damage(run4)
    (ckpt(run4, 1) / "optimizer.bin").write_bytes(b"")
    p = run_main(args(mask_shards, run4, "--max-steps", "5", "--resume", "auto"))
    one_error_line(p, 2, "--resume auto: no good checkpoint", "4 damaged")
    assert len(warnings_of(p)) == 4 and not (run4 / "checkpoints" / "step-00000005").exists()
    p = run_main(args(mask_shards, run4, "--max-steps", "5", "--resume", str(ckpt(run4, 3))))
    one_error_line(p, 2, f"--resume {ckpt(run4, 3)}: damaged checkpoint: model.safetensors altered")


def test_checkpoints_without_a_file_list_are_accepted_with_a_warning(mask_shards, run4):
    """Written before checksums: loaded as they are, saying so in one line."""
    for s in range(1, 5):
        state = json.loads((ckpt(run4, s) / "progress.json").read_text())
        del state["files"]
        (ckpt(run4, s) / "progress.json").write_text(json.dumps(state))
    assert verify(ckpt(run4, 4)).good and not verify(ckpt(run4, 4)).listed
    p = run_main(args(mask_shards, run4, "--max-steps", "5", "--resume", "auto"))
    assert p.returncode == 0 and f"resumed from {ckpt(run4, 4)}" in p.stdout, p.stderr[-3000:]
    (line,) = warnings_of(p)
    assert f"{ckpt(run4, 4)} was written before checksums" in line and "unverified" in line


def test_verify_command(run4, tmp_path, capsys):
    assert verify_main(["--verify", str(run4)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"step-0000000{s}: good" for s in range(1, 5)] + ["4 of 4 good; --resume auto continues from step-00000004"]
    said = damage(run4)
    (ckpt(run4, 1) / "planted.pkl").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        verify_main(["--verify", str(run4 / "checkpoints")])
    assert e.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "step-00000001: damaged: unexpected file planted.pkl (not written with this checkpoint)"
    assert [line.split(": damaged: ")[1] for line in out[1:4]] == [said[2], said[3] + " (sha256 differs from progress.json)", said[4]]
    assert out[4] == "0 of 4 good; --resume auto continues from none (it would refuse)"
    for bad, message in [(tmp_path / "nope", "no such folder"), (tmp_path, "no checkpoints in it")]:
        with pytest.raises(SystemExit) as e:
            verify_main(["--verify", str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: --verify") and message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- 3. failed writes
def fail_nth(real, n: int, path_arg: int):
    calls = {"n": 0}

    def wrapper(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(a[path_arg]))
        return real(*a, **kw)

    return wrapper


def assert_failed_cleanly(p: subprocess.CompletedProcess, out: Path, what: str, *words: str) -> str:
    """Exit 1, one line (what failed, where, free space, the last good checkpoint), no partial
    folder, step 1 intact."""
    line = one_error_line(p, 1, f"cannot write checkpoint step-00000002 in {out / 'checkpoints'} ({what}",
                          "MiB free there", f"last good checkpoint: {ckpt(out, 1)}", *words)
    assert sorted(q.name for q in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert verify(ckpt(out, 1)).good
    return line


@pytest.mark.parametrize("part", ["state", "progress"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_cleanly(mask_shards, tmp_path, monkeypatch, part):
    out = tmp_path / "run"
    if part == "state":
        monkeypatch.setattr(Accelerator, "save_state", fail_nth(Accelerator.save_state, 2, path_arg=1))
    else:
        monkeypatch.setattr(checkpoint, "atomic_write_json", fail_nth(checkpoint.atomic_write_json, 2, path_arg=0))
    p = run_main(args(mask_shards, out, "--max-steps", "3"))
    line = assert_failed_cleanly(p, out, "writing the model" if part == "state" else "writing progress.json",
                                 f"No space left on device (injected) ({out / 'checkpoints' / '.tmp-step-00000002'}")
    assert ("the partial folder held model.safetensors, optimizer.bin" in line) == (part == "progress")
    if part == "progress":
        monkeypatch.undo()
        p = run_main(args(mask_shards, out, "--max-steps", "3", "--resume", "auto"))
        assert p.returncode == 0 and f"resumed from {ckpt(out, 1)}" in p.stdout, p.stderr[-3000:]


def test_low_free_space_warns_once(mask_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "free_space", lambda path: 3 << 20)  # 3 MiB: a checkpoint is about 4.5
    p = run_main(args(mask_shards, tmp_path / "run", "--max-steps", "4"))
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = warnings_of(p)
    assert "3.0 MiB free in" in line and "less than twice the last checkpoint (step-00000001" in line


@contextlib.contextmanager
def tiny_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder` (needs root and mount(8))."""
    folder.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()[:200]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_really_full_disk(mask_shards, tmp_path):
    """A 7 MiB disk: the first checkpoint (about 4.5 MiB) fits, the second does not."""
    with tiny_disk(tmp_path / "disk", "7m") as disk:
        out = disk / "run"
        p = run_main(args(mask_shards, out, "--max-steps", "3"))
        line = assert_failed_cleanly(p, out, "writing the model", "the partial folder held model.safetensors")
        assert float(line.split(" MiB free there")[0].rsplit(" ", 1)[1]) < 1.0  # measured before the clean-up
        (line,) = warnings_of(p)
        assert "less than twice the last checkpoint (step-00000001" in line
        shutil.copytree(out, tmp_path / "copy")
    p = run_main(args(mask_shards, tmp_path / "copy", "--max-steps", "3", "--resume", "auto"))
    assert p.returncode == 0 and f"resumed from {ckpt(tmp_path / 'copy', 1)}" in p.stdout, p.stderr[-3000:]


def launch_faulty(script_args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return launch(["tests/scripts/faulty_checkpoints.py", *script_args], env=env, check=False, timeout=timeout)


@pytest.mark.ranks
@pytest.mark.parametrize("rank, part", [(0, "progress"), (1, "state")], ids=["main-progress.json", "rank1-state"])
def test_one_rank_failing_its_part_stops_every_rank(mask_shards, tmp_path, rank, part):
    """Only one rank fails (the main its progress.json, or rank 1 its RNG state): the failure
    is agreed at the next barrier, so every rank stops at once with one line, long before
    --dist-timeout, and the partial folder is gone."""
    out = tmp_path / "run"
    started = time.time()
    p = launch_faulty(args(mask_shards, out, "--max-steps", "3", "--dist-timeout", "60"),
                      {"FAIL_PART": part, "FAIL_RANK": str(rank), "FAIL_AT": "2"})
    assert time.time() - started < 50, "a rank waited for the one that failed"
    ranks_part = p.stderr.split("torch/distributed/elastic")[0]  # before the launcher's own report
    one_error_line(subprocess.CompletedProcess(p.args, p.returncode, p.stdout, ranks_part), 1,
                   "cannot write checkpoint step-00000002", f"last good checkpoint: {ckpt(out, 1)}",
                   "rank 1: No space left" if rank == 1 else "No space left")
    assert sorted(q.name for q in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert verify(ckpt(out, 1)).good


# ----------------------------------------------------------------------------- 4. nothing runs code
class Payload:
    """Unpickled by a plain unpickler, this writes `marker`: the test that it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def plant(c: Path, name: str, marker: Path) -> None:
    """`name` replaced by (or added as) a malicious pickle, with the file list forged to match,
    so only the load-time check stands between it and the unpickler."""
    torch.save({"state": Payload(marker)}, c / name)
    if name == "pytorch_model.bin":  # Accelerate falls back to it when model.safetensors is absent
        (c / "model.safetensors").unlink()
    progress = json.loads((c / "progress.json").read_text())
    progress["files"] = manifest(c)
    (c / "progress.json").write_text(json.dumps(progress))


def test_the_planted_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    torch.save(Payload(marker), tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)  # what an unsafe load would do
    assert marker.read_text() == "ran"


# Every pickle-format file Accelerate 1.x's load_state may read: optimizer (weights_only), RNG
# (weights_only, but a failure is swallowed silently), scaler and scheduler (only when there is
# one), the model fallback, and custom states (loaded with weights_only=False).
PLANTED = ["optimizer.bin", "random_states_0.pkl", "scaler.pt", "scheduler.bin", "pytorch_model.bin",
           "custom_checkpoint_0.pkl"]


@pytest.mark.parametrize("resume", ["path", "auto"])
@pytest.mark.parametrize("name", PLANTED)
def test_a_planted_pickle_never_runs(mask_shards, run4, tmp_path, name, resume):
    marker = tmp_path / "ran"
    plant(ckpt(run4, 4), name, marker)
    assert verify(ckpt(run4, 4)).good  # the forged list passes: the load check must refuse it
    p = run_main(args(mask_shards, run4, "--max-steps", "5", "--resume",
                      str(ckpt(run4, 4)) if resume == "path" else "auto"))
    one_error_line(p, 2, f"--resume {ckpt(run4, 4)}: {name} refused: it would run code when loaded",
                   "GLOBAL exec")
    assert not marker.exists() and not ckpt(run4, 5).exists()


def test_a_planted_pickle_is_caught_by_verification_first(mask_shards, run4, tmp_path):
    """Planted without forging the list: --resume auto skips that checkpoint for the one before."""
    marker = tmp_path / "ran"
    torch.save(Payload(marker), ckpt(run4, 4) / "random_states_0.pkl")
    p = run_main(args(mask_shards, run4, "--max-steps", "5", "--resume", "auto"))
    assert p.returncode == 0 and f"resumed from {ckpt(run4, 3)}" in p.stdout, p.stderr[-3000:]
    (line,) = warnings_of(p)
    assert "random_states_0.pkl" in line and "step-00000004 is damaged" in line
    assert not marker.exists()


def test_an_optimizer_state_with_other_parameter_groups_says_why(tmp_path):
    """torch names only the symptom ("a parameter group that doesn't match"); the line says why
    a checkpoint's optimizer may not fit this run's, and what to do instead."""
    def parts(groups: int) -> tuple[Accelerator, torch.optim.Optimizer]:
        acc = Accelerator(cpu=True)
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        params = [{"params": list(m.parameters())} for m in model] if groups == 2 else list(model.parameters())
        _, optimizer = acc.prepare(model, torch.optim.SGD(params, lr=0.1))
        return acc, optimizer
    parts(1)[0].save_state(str(tmp_path / "ckpt"), safe_serialization=True)
    acc, optimizer = parts(2)
    with pytest.raises(checkpoint.UserError, match=r"--resume .*ckpt: .*parameter group.*other parameter groups "
                                                    r"than this run's.*--pretrained-path"):
        checkpoint.Checkpointer.load(None, acc, tmp_path / "ckpt", optimizer)
