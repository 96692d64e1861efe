"""launch/: the accelerate configs start the ranks they promise, the shell launchers run, and the
SLURM script wires SLURM's variables into `accelerate launch` and requeues only a preempted run.

The shell scripts run from a scratch copy of the project root (symlinks to launch/, dist_train/
and the venv) so they neither write into the repository (the SLURM script makes logs/) nor see
a pyproject.toml edited since the venv was installed (setup.sh would try to reinstall offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port
from dist_train import launcher

RUN = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
       "--workers", "0", "--val-split", "none", "--mixed-precision", "no"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_two_ranks(out: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2 (MULTI_CPU)" in proc.stdout  # gloo, not two single-process runs
    s = summary(out)
    assert s["world_size"] == 2 and s["finished"] is True
    assert len(s["steps_per_rank"]) == 2 and len(s["batches_per_rank"]) == 2
    assert s["steps_per_rank"] == [2, 2] and len(set(s["param_hash_per_rank"])) == 1


@pytest.fixture
def project(tmp_path) -> Path:
    """A scratch project root: launch/ and dist_train/ linked, a venv view whose install stamp
    matches (setup.sh then installs nothing)."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("launch", "dist_train", "pyproject.toml"):
        (root / name).symlink_to(ROOT / name)
    venv = root / ".venv"
    venv.mkdir()
    for name in ("bin", "lib", "pyvenv.cfg"):
        (venv / name).symlink_to(ROOT / ".venv" / name)
    (venv / ".dist_train-installed").write_text(hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() + "\n")
    return root


# ----------------------------------------------------------------------------- accelerate configs
EXPECTED = {  # file -> (distributed_type, num_processes, num_machines)
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1),
    "multi_node.yaml": ("MULTI_GPU", 16, 2),
    "cpu_ddp.yaml": ("MULTI_GPU", 2, 1),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in (ROOT / "launch").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_as_accelerate_config(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "launch" / name
    raw = yaml.safe_load(path.read_text())
    kind, procs, machines = EXPECTED[name]
    assert (raw["distributed_type"], raw["num_processes"], raw["num_machines"]) == (kind, procs, machines)
    cfg = load_config_from_file(str(path))  # accelerate's own loader: unknown keys raise
    assert cfg.distributed_type.value == kind and cfg.num_processes == procs
    if name == "multi_node.yaml":
        assert raw["rdzv_backend"] == "c10d" and {"machine_rank", "main_process_ip", "main_process_port"} <= set(raw)


def test_cpu_ddp_config_picks_a_free_port():
    """Port 29500 (the default) is taken by any other local run or a parallel CI job; 0 = a free one."""
    port = yaml.safe_load((ROOT / "launch" / "cpu_ddp.yaml").read_text()).get("main_process_port")
    assert port == 0, f"cpu_ddp.yaml main_process_port: {port}"


@pytest.mark.ranks
def test_accelerate_launch_cpu_ddp_gives_two_gloo_ranks(mask_shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "launch" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
                           "dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *RUN],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert_two_ranks(out, proc)


# ----------------------------------------------------------------------------- dist-train (python -m dist_train)
def dist_train_cmd(*args: str, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_train", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.ranks
def test_dist_train_train_two_processes(mask_shards, tmp_path):
    out = tmp_path / "run"
    proc = dist_train_cmd("train", "--processes", "2", "--data", str(mask_shards), "--output", str(out), *RUN,
                          cwd=tmp_path)
    assert_two_ranks(out, proc)


@pytest.mark.ranks
def test_dist_train_bad_input_is_one_line_and_exit_2(mask_shards, tmp_path):
    """Every rank reaches the same refusal (a global batch larger than the split, found after the
    process group formed): the main process prints it, no launcher text, the rank's exit 2."""
    out = tmp_path / "run"
    proc = dist_train_cmd("train", "--processes", "2", "--data", str(mask_shards), "--output", str(out), *RUN,
                          "--batch-size", "999", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "global batch 1998" in errors[0], lines
    assert len(lines) - len(errors) == 0, lines
    assert not out.exists()


@pytest.mark.ranks
def test_accelerate_launch_bad_input_prints_the_line_once(tmp_path):
    """Plain `accelerate launch`: the line once (main process), the root cause is the rank's exit 2;
    the launcher's own traceback follows (it cannot be avoided from the ranks) and it exits 1."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "launch" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
                           "dist_train/run.py", "--data", str(tmp_path / "missing"), "--output", str(out), *RUN],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and str(tmp_path / "missing") in errors[0], lines
    assert "exitcode  : 2" in proc.stderr  # the root cause is the main rank's bad-input exit
    assert 10 < len(lines) - 1 < 80  # the launcher's ChildFailedError report, nothing per rank
    assert not out.exists()


def test_dist_train_usage_errors_are_one_line(capsys):
    from dist_train.launcher import main

    for argv, words in ((["nosuch"], "nosuch: not a command; expected one of train, predict"),
                        (["train", "--processes", "0"], "--processes 0: expected an integer >= 1"),
                        (["train", "--processes"], "--processes: expected a value")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("command", sorted(launcher.COMMANDS))
def test_every_launched_script_runs_as_a_script(command, monkeypatch, capsys):
    """`dist-train COMMAND --processes N` and `accelerate launch dist_train/SCRIPT` run the file as a
    script, not as a module of the package: a relative import there (evaluate.py had them) is an
    ImportError traceback on every rank."""
    import runpy

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script's own sys.path[0] fix stays here
    monkeypatch.setattr(sys, "argv", [launcher.COMMANDS[command], "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "dist_train" / launcher.COMMANDS[command]), run_name="__main__")
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- shell launchers
@pytest.mark.ranks
def test_train_sh_cpu_ddp(project, mask_shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(project / "launch" / "train.sh"), "launch/cpu_ddp.yaml", "--data",
                           str(mask_shards), "--output", str(out), *RUN],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert_two_ranks(out, proc)
    assert "setup: installing" not in proc.stdout


def test_train_sh_missing_config(project, tmp_path):
    proc = subprocess.run(["bash", str(project / "launch" / "train.sh"), "launch/nope.yaml"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "launch/nope.yaml not found" in proc.stderr


def test_shard_sh_help(project, tmp_path):
    proc = subprocess.run(["bash", str(project / "launch" / "shard.sh"), "--help"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--src" in proc.stdout and "--out" in proc.stdout


# ----------------------------------------------------------------------------- SLURM
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"


def test_sbatch_syntax_and_slurm_wiring():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, timeout=30).returncode == 0
    text = SBATCH.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives
    assert any(d.startswith("#SBATCH --signal=") and "USR1" in d for d in directives)
    assert any("--ntasks-per-node=1" in d for d in directives)
    for var in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"):
        assert var in text, var
    assert "--resume auto" in text and "launch/multi_node.yaml" in text


FAKE_SRUN = """#!/usr/bin/env bash
# One node: drop srun's options, run the task command here. Instead, FAKE_STOPPED=FILE: act as a
# run stopped by a signal (summary.json written unfinished, ranks exit 0); FAKE_EXIT=N: as one
# that failed before writing anything (bad input, a crash).
if [ -n "${FAKE_STOPPED:-}" ]; then echo '{"finished": false}' > "$FAKE_STOPPED"; exit 0; fi
if [ -n "${FAKE_EXIT:-}" ]; then exit "$FAKE_EXIT"; fi
while [ $# -gt 0 ]; do
  case "$1" in
    --output|--error|--ntasks|--nodes) shift 2 ;;
    --*) shift ;;
    *) break ;;
  esac
done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi
"""


def run_sbatch(project: Path, tmp_path: Path, args: list[str], **env_extra: str) -> tuple[subprocess.CompletedProcess, str]:
    """train.sbatch as SLURM would run it on a 1-node allocation with 2 "GPUs" (CPU ranks here)."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    log.touch()
    env = {**ENV, "PATH": f"{fake}:{ENV['PATH']}", "FAKE_SLURM_LOG": str(log), "SLURM_SUBMIT_DIR": str(project),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dist_train", "SLURM_JOB_NODELIST": "node[1]",
           "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2", "MASTER_PORT": str(free_port()), **env_extra}
    proc = subprocess.run(["bash", str(project / "launch" / "slurm" / "train.sbatch"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    return proc, log.read_text()


@pytest.mark.ranks
def test_sbatch_runs_accelerate_with_slurm_values(project, mask_shards, tmp_path):
    out = tmp_path / "run"
    proc, calls = run_sbatch(project, tmp_path, ["--data", str(mask_shards), "--output", str(out), *RUN])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "on 1 nodes x 2 GPUs, rendezvous 127.0.0.1:" in proc.stdout
    s = summary(out)
    assert s["world_size"] == 2 and s["finished"] is True
    assert "requeue" not in calls  # finished: nothing to requeue


def test_sbatch_requeues_a_run_stopped_by_signal(project, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc, calls = run_sbatch(project, tmp_path, ["--data", "x", "--output", str(out)],
                             FAKE_STOPPED=str(out / "summary.json"))
    assert proc.returncode == 0, proc.stderr
    assert "scontrol requeue 4242" in calls


def test_sbatch_does_not_requeue_a_failing_run(project, tmp_path):
    """Bad input fails the same way after every requeue: requeueing it would loop forever. The
    unfinished summary.json of an earlier, preempted job must not count as this job's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"finished": false}')
    os.utime(out / "summary.json", (1, 1))
    proc, calls = run_sbatch(project, tmp_path, ["--data", "x", "--output", str(out)], FAKE_EXIT="2")
    assert proc.returncode == 2
    assert "requeue" not in calls, proc.stdout


# ----------------------------------------------------------------------------- GPU check
def test_gpu_check_script_runs_every_step_on_cpu(project, tmp_path):
    """GPU_CHECK_CPU=1 with a tiny model and data: every step of the script (data, sharding, the
    three loader and three trainer benchmarks, the table) runs, so a GPU lease is not spent on a
    broken script."""
    work = tmp_path / "gc"
    env = {**ENV, "GPU_CHECK_CPU": "1", "GPU_CHECK_DIR": str(work), "IMAGES": "200", "PERSONS": "3",
           "SYNTH_JOBS": "2", "STEPS": "2", "SECONDS_PER_LOADER": "0.5", "MODEL": "test_resnet",
           "IMG_SIZE": "32", "BATCH": "8", "COMPILE_MODES": "eager"}
    proc = subprocess.run(["bash", str(project / "launch" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert [r.get("mode", r.get("input")) for r in rows] == ["pipeline", "decode_only", "gpu_decode",
                                                            "synthetic", "shards", "shards"]
    assert [r.get("gpu_decode") for r in rows[3:]] == [False, False, True]
    assert all(r["images_per_s" if r["bench"] == "loader" else "trainer_images_per_s"] > 0 for r in rows)
    assert "trainer from shards, gpu decode, eager" in proc.stdout and "x bare (target >= 0.95)" in proc.stdout
    # without CUDA and without the override it refuses at once
    proc = subprocess.run(["bash", str(project / "launch" / "gpu_check.sh")], cwd=tmp_path,
                          env={**ENV, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no CUDA GPU here" in proc.stderr


@pytest.mark.ranks
def test_kfold_sbatch_trains_its_array_tasks_fold_and_requeues_it(project, fold_shards, tmp_path):
    """Array task 1 trains fold 1 into CV/fold-1 on the node's 2 "GPUs" (CPU ranks here); a fold
    stopped early (--time-limit) is requeued as that array task alone."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "scontrol").write_text(FAKE_SCONTROL)
    (fake / "scontrol").chmod(0o755)
    log = tmp_path / "slurm.log"
    log.touch()
    env = {**ENV, "PATH": f"{fake}:{ENV['PATH']}", "FAKE_SLURM_LOG": str(log), "SLURM_SUBMIT_DIR": str(project),
           "SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_GPUS_ON_NODE": "2", "ACCEL_CONFIG": "launch/cpu_ddp.yaml"}
    cv = tmp_path / "cv"
    args = ["--data", str(fold_shards), "--output", str(cv), *RUN[:6], "--workers", "0", "--epochs", "1000",
            "--time-limit", "1s"]
    proc = subprocess.run(["bash", str(project / "launch" / "slurm" / "kfold.sbatch"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2 (MULTI_CPU)" in proc.stdout and "validation: split train[fold=1]" in proc.stdout
    s = summary(cv / "fold-1")
    assert s["world_size"] == 2 and s["finished"] is False and s["stopped_by"] == "time-limit"
    assert "fold: '1'" in (cv / "fold-1" / "config.yaml").read_text()
    assert "scontrol requeue 4242_1" in log.read_text()
    proc = subprocess.run(["bash", str(project / "launch" / "slurm" / "kfold.sbatch"), *args, "--fold", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "pass no --fold" in proc.stderr

