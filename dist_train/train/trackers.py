"""Experiment trackers through Accelerate: `--log-with`, `--experiment`, `--run-name`.

Accelerate quietly leaves out a tracker whose package is missing (a debug message only), so a
run asked to log to W&B would train for hours logging nowhere: the names are checked here
before anything starts. What the trackers get, from the main process only (Accelerate's
`init_trackers` and `log` run there): the resolved config as hyperparameters, every
`metrics.jsonl` field at its step (lists and mappings flattened to `key/0`, `key/sub`), and
`confusion.png` at each evaluation where Accelerate's tracker takes images (MLflow: as an
artifact `confusion/step-XXXXXXXX/confusion.png`).

MLflow without MLFLOW_TRACKING_URI logs into the run folder, `RUN/mlruns` (a file store: the
`trackers` extra installs mlflow-skinny, which cannot open MLflow 3's default SQLite store in the
current folder; `MLFLOW_ALLOW_FILE_STORE` is set for it). An http(s) tracking server is asked
first, within $DIST_TRAIN_HTTP_TIMEOUT seconds (default 30), and MLflow's own requests are bounded
the same way (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES 2, unless set). A
tracker that does not start leaves nothing: the started ones are closed (an MLflow run marked
FAILED and deleted) and the run folder is put back as it was (dist_train/train/runfolder.py).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from PIL import Image

from dist_train.config import Config
from dist_train.errors import UserError
from dist_train.shardset.remote import http_timeout

from .checkpoint import agree, attempt

EXTRA = "pip install -e '.[trackers]'"
IN_EXTRA = {"mlflow": "mlflow-skinny", "wandb": "wandb"}  # what the `trackers` extra installs
# The keyword each tracker's start takes for the run's name (the experiment is Accelerate's project_name).
RUN_NAME_KW = {"mlflow": "run_name", "wandb": "name", "clearml": "task_name", "swanlab": "experiment_name",
               "trackio": "name"}


def tracker_names(spec: str | Sequence[str]) -> list[str]:
    """`--log-with` as tracker names ([] for none); an unknown or uninstalled one is one line."""
    names = [n.strip().lower() for n in (str(spec).split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names in ([], ["none"]):
        return []
    known = list(LOGGER_TYPE_TO_CLASS)
    for name in names:
        if name not in known:
            raise UserError(f"--log-with {name}: not one of Accelerate's trackers; expected a comma list of "
                            f"{', '.join(known)}, or none")
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in installed:
            how = f"{EXTRA} (or pip install {IN_EXTRA[name]})" if name in IN_EXTRA else f"pip install {name}"
            raise UserError(f"--log-with {name}: the {name} package is not installed; {how}")
    return list(dict.fromkeys(names))


def hparams(cfg: Config) -> dict[str, Any]:
    """The resolved config as hyperparameters: scalars as they are, lists and mappings as JSON
    text (trackers take scalars only)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in cfg.flat().items()}


def _ask_mlflow_server(uri: str) -> None:
    """An http(s) tracking server answers (any HTTP status) within http_timeout(), else one line.
    A server that is slow to answer gets a line saying what is awaited, and for how long."""
    limit, url = http_timeout(), uri.rstrip("/") + "/health"
    waits = [min(2.0, limit)] + ([limit - 2.0] if limit > 2.0 else [])
    for i, wait in enumerate(waits):
        if i == 1:
            print(f"mlflow: waiting up to {limit:g} s for the tracking server at {uri} (DIST_TRAIN_HTTP_TIMEOUT)",
                  flush=True)
        try:
            urllib.request.urlopen(url, timeout=wait).close()
            return
        except urllib.error.HTTPError:
            return  # it answered: authentication and paths are MLflow's to report
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if not isinstance(reason, (socket.timeout, TimeoutError)) or i == len(waits) - 1:
                why = (f"no answer within {limit:g} s, DIST_TRAIN_HTTP_TIMEOUT"
                       if isinstance(reason, (socket.timeout, TimeoutError)) else str(reason))
                raise UserError(f"--log-with mlflow: no MLflow tracking server at MLFLOW_TRACKING_URI={uri} "
                                f"({why}); start it, or unset MLFLOW_TRACKING_URI to log into RUN/mlruns") from None


def prepare_mlflow(out: Path) -> None:
    """Where MLflow logs (see the module doc); the server asked before anything is written."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        os.environ["MLFLOW_TRACKING_URI"] = (out / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    elif uri.startswith(("http://", "https://")):
        _ask_mlflow_server(uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(http_timeout()))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


def check_trackers(acc: Accelerator, cfg: Config) -> None:
    """What can be checked before the run folder is written: the MLflow store or server (main
    process; every rank learns the answer)."""
    names = tracker_names(cfg.runtime.log_with)
    problem = None
    if "mlflow" in names and acc.is_main_process:
        try:
            prepare_mlflow(Path(cfg.checkpoint.output))
        except UserError as e:
            problem = str(e)
    problem = agree(acc, problem)
    if problem is not None:
        raise UserError(problem, all_ranks=acc.num_processes > 1)


def stop_trackers(acc: Accelerator, failed: bool, delete: bool = False) -> None:
    """Close the started trackers. After a failure an MLflow run is marked FAILED, not FINISHED,
    and with `delete` (a run that never started: it holds nothing) deleted. Best effort: the
    tracker may be what failed."""
    for tracker in list(acc.trackers):
        try:
            if tracker.name == "mlflow" and failed:
                import mlflow

                run = mlflow.active_run()
                if run is not None:
                    mlflow.end_run(status="FAILED")
                    if delete:
                        mlflow.delete_run(run.info.run_id)
            else:
                tracker.finish()
        except Exception:  # noqa: BLE001 - the line the user sees is the tracker's first failure
            pass
    acc.trackers = []


def start_trackers(acc: Accelerator, cfg: Config) -> None:
    """Start the trackers on the main process; local files (W&B offline runs, DVCLive) go to the
    run folder. A tracker that cannot start (no server, no credentials) stops every rank with
    one line rather than leaving the others waiting for --dist-timeout."""
    r, out = cfg.runtime, Path(cfg.checkpoint.output)
    name = r.run_name or out.resolve().name
    kwargs: dict[str, dict] = {t: {kw: name} for t, kw in RUN_NAME_KW.items()}
    if not os.environ.get("WANDB_DIR"):
        kwargs["wandb"]["dir"] = str(out)
    kwargs["dvclive"] = {"dir": str(out / "dvclive")}
    problem = attempt(lambda: acc.init_trackers(r.experiment, config=hparams(cfg), init_kwargs=kwargs))
    problem = agree(acc, problem)
    if problem is not None:
        stop_trackers(acc, failed=True, delete=True)
        raise UserError(f"--log-with {r.log_with}: a tracker did not start: {problem}", all_ranks=acc.num_processes > 1)


def flat_metrics(m: dict, prefix: str = "") -> dict[str, int | float]:
    """A metrics.jsonl line as tracker scalars: `key/0`, `key/sub` for lists and mappings
    (indices, not class names: MLflow refuses most punctuation in metric names)."""
    out: dict[str, int | float] = {}
    for k, v in m.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, (list, tuple)):
            out.update(flat_metrics({str(i): x for i, x in enumerate(v)}, f"{key}/"))
        elif isinstance(v, dict):
            out.update(flat_metrics(v, f"{key}/"))
    return out


def log_confusion(acc: Accelerator, png: Path, step: int) -> None:
    """The evaluation's confusion.png, to each tracker that takes images through Accelerate
    (comet_ml, dvclive and trackio's Accelerate trackers do not)."""
    if not acc.trackers:  # not the main process, or no trackers
        return
    with Image.open(png) as im:
        image = np.asarray(im.convert("RGB"))
    for tracker in acc.trackers:
        if tracker.name == "mlflow":
            tracker.log_artifact(str(png), artifact_path=f"confusion/step-{step:08d}")
        elif tracker.name == "tensorboard":
            tracker.log_images({"confusion": image[None]}, step=step, dataformats="NHWC")
        elif tracker.name in ("wandb", "swanlab"):
            tracker.log_images({"confusion": [image]}, step=step)
        elif tracker.name in ("aim", "clearml"):
            tracker.log_images({"confusion": image}, step=step)
