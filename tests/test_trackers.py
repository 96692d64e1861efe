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
