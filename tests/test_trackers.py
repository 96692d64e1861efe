"""Experiment trackers through Accelerate (--log-with, --experiment, --run-name), read back offline:
MLflow from a local file store, W&B from its offline run file, TensorBoard from its event files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from conftest import launch, run_main

BASE = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--lr", "0.01", "--seed", "0",
        "--warmup-epochs", "0", "--workers", "0"]


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (`run-ID.wandb`): a LevelDB-style log of 32 KiB
    blocks after a 7-byte header, each record a 7-byte header (crc, length, type) and a
    protobuf `Record`, split over blocks as FIRST/MIDDLE/LAST parts."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def wandb_history(records: list) -> dict[int, dict]:
    """{step: {key: value}} from the history records (one row per step)."""
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def expected_scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl line as the trackers must have it: lists as key/0, key/1, ..."""
    out = {}
    for k, v in row.items():
        if isinstance(v, list):
            out.update({f"{k}/{i}": x for i, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.ranks
def test_two_process_run_reaches_mlflow_wandb_and_tensorboard(mask_shards, tmp_path, monkeypatch):
    """Config as hyperparameters, every metrics.jsonl field at its step, the confusion matrix at
    each evaluation, from the main process only (one run per tracker)."""
    out, store = tmp_path / "run", tmp_path / "mlruns"
    env = {"MLFLOW_TRACKING_URI": f"file:{store}", "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_MODE": "offline",
           "WANDB_DIR": "", "WANDB_SILENT": "true"}
    launch(["dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1",
            "--max-steps", "4", "--eval-every", "2", "--log-with", "mlflow,wandb,tensorboard",
            "--experiment", "exp-t", "--run-name", "run-t"], env=env)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    want = {r["step"]: expected_scalars(r) for r in rows}
    assert "train_class_counts/0" in want[2] and "val_macro_f1" in want[2]

    # MLflow: one run, named, with the config as params, every metric at its step, confusion per evaluation
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{store}")
    runs = client.search_runs([client.get_experiment_by_name("exp-t").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mlflow.runName"] == "run-t"
    assert run.data.params["model"] == "test_resnet" and float(run.data.params["lr"]) == 0.01
    assert json.loads(run.data.params["scale"]) == [0.5, 1.0]  # lists as JSON text
    for key in want[2]:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert set(history) == {2, 4}, key
        assert all(same(history[s], want[s][key]) for s in (2, 4)), key
    assert [a.path for a in client.list_artifacts(run.info.run_id, "confusion")] == [
        "confusion/step-00000002", "confusion/step-00000004"]

    # W&B offline: one run in RUN/wandb, project = experiment, the config, the history rows, the image
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    started = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started and started[0].project == "exp-t" and started[0].display_name == "run-t"
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["lr"] == 0.01 and config["model"] == "test_resnet"
    history = wandb_history(records)
    for step in (2, 4):
        assert all(same(history[step][k], v) for k, v in want[step].items())
        assert history[step]["confusion/_type"] == "images/separated"

    # TensorBoard: scalars and the confusion image at each evaluation, one writer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = out / "tb" / "exp-t"
    assert len(list(tb.glob("events.out.tfevents*"))) == 1
    acc = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_macro_f1")] == [2, 4]
    assert [e.step for e in acc.Images("confusion")] == [2, 4]


@pytest.mark.parametrize("log_with, words", [
    ("wandb", ["--log-with wandb", "not installed", "pip install -e '.[trackers]'"]),
    ("tensorboard,aim", ["--log-with aim", "not installed", "pip install aim"]),
    ("nosuch", ["--log-with nosuch", "not one of Accelerate's trackers", "mlflow", "or none"]),
])
def test_a_tracker_that_is_not_installed_or_unknown_is_one_line(mask_shards, tmp_path, monkeypatch, log_with, words):
    """Accelerate would leave a missing tracker out silently; here the run refuses before it writes anything."""
    from accelerate.utils import LoggerType

    import dist_train.train.trackers as trackers

    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--log-with", log_with])
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines
    assert not out.exists()


def test_a_tracker_that_cannot_start_is_one_line(mask_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch://nowhere")
    p = run_main(["--data", str(mask_shards), "--output", str(tmp_path / "run"), *BASE, "--log-with", "mlflow",
                  "--max-steps", "1"])
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--log-with mlflow: a tracker did not start" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_no_trackers_with_none(mask_shards, tmp_path):
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--log-with", "none", "--max-steps", "1", "--eval-every", "1",
                  "--val-split", "none"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "metrics.jsonl").is_file() and not (out / "tb").exists()


# ----------------------------------------------------------------------------- refused runs leave nothing
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_HTTP_REQUEST_TIMEOUT",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES")


@pytest.fixture
def mlflow_env(monkeypatch, tmp_path):
    """No MLflow settings, run from tmp_path (where MLflow 3 would put mlflow.db); whatever the
    run sets in os.environ is undone afterwards."""
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_a_refused_run_writes_nothing(mask_shards, tmp_path):
    """Every check (here the model name, found only when the model is built) comes before the
    first write: no config.yaml, run.json or tb/."""
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--model", "no_such_model"])
    assert p.returncode == 2 and "no_such_model" in p.stderr
    assert not out.exists()


def test_mlflow_without_a_server_logs_into_the_run_folder(mask_shards, tmp_path, mlflow_env):
    """mlflow-skinny (the `trackers` extra) cannot open MLflow 3's default sqlite store: the run
    folder's file store is used, and nothing lands in the current folder."""
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--log-with", "mlflow", "--max-steps", "1",
                  "--eval-every", "1", "--val-split", "none"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]  # no mlflow.db, no mlruns/ here
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["model"] == "test_resnet"
    assert "train_loss" in runs[0].data.metrics


def test_a_tracker_failing_after_another_started_leaves_no_debris(mask_shards, tmp_path, mlflow_env):
    """MLflow starts (external store), TensorBoard then fails: the MLflow run is marked FAILED and
    deleted (not an empty FINISHED run), no tb/ event file and no run folder remain."""
    from accelerate.tracking import TensorBoardTracker

    def broken(self, values):
        raise OSError("disk on fire")

    store = tmp_path / "store"
    mlflow_env.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    mlflow_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_env.setattr(TensorBoardTracker, "store_init_configuration", broken)
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--log-with", "mlflow,tensorboard"])
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "a tracker did not start" in lines[0] and "disk on fire" in lines[0], lines
    assert not out.exists()
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)
    assert [(r.info.status, r.info.lifecycle_stage) for r in runs] == [("FAILED", "deleted")]


def test_a_refused_resume_keeps_the_run_folder_as_it_was(mask_shards, tmp_path, mlflow_env):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: earlier\n")
    (out / "notes.txt").write_text("mine")
    mlflow_env.setenv("MLFLOW_TRACKING_URI", "nosuch://nowhere")
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--log-with", "tensorboard,mlflow"])
    assert p.returncode == 2 and "a tracker did not start" in p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["config.yaml", "notes.txt"]
    assert (out / "config.yaml").read_text() == "model: earlier\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]


def test_an_unreachable_mlflow_server_is_one_line_within_the_timeout(mask_shards, tmp_path, mlflow_env):
    """A closed port: refused at once. A port that accepts and never answers: a line saying what
    is awaited, then the error after DIST_TRAIN_HTTP_TIMEOUT seconds, not MLflow's minutes of retries."""
    import socket
    import time

    from conftest import free_port

    out = tmp_path / "run"
    mlflow_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--log-with", "mlflow"])
    assert p.returncode == 2 and not out.exists()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no MLflow tracking server at MLFLOW_TRACKING_URI=http://127.0.0.1:" in lines[0], lines
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        mlflow_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        mlflow_env.setenv("DIST_TRAIN_HTTP_TIMEOUT", "3")
        started = time.monotonic()
        p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--log-with", "mlflow"])
        took = time.monotonic() - started
    assert p.returncode == 2 and not out.exists()
    assert "mlflow: waiting up to 3 s for the tracking server at http://127.0.0.1:" in p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no answer within 3 s, DIST_TRAIN_HTTP_TIMEOUT" in lines[0], lines
    assert took < 20
