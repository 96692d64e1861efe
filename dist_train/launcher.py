"""`dist-train COMMAND [--processes N] [--port P] FLAGS...` (also `python -m dist_train ...`): run a
command on N processes of this machine and report like a one-process command.

`accelerate launch` and `torchrun` end a failed run with the launcher's own 30-40 lines
(`ChildFailedError`, a traceback, a failure table) and exit 1 whatever the ranks said. Here
Accelerate's launcher runs in this process: its log lines are silenced, the ranks print their
one `error:` line themselves (the main process only, `dist_train.errors.cli_main`), and the exit
status is the failing rank's own: 0 done, 1 the run failed, 2 bad input; a rank killed by a
signal: one line naming it, exit 128 + the signal number. With one process the command runs in
this process, as `python dist_train/run.py` would.

COMMAND: train (dist_train/run.py), predict, evaluate, lr-find. `--processes` defaults to the
number of CUDA GPUs (1 without any: the CPU); without CUDA, N > 1 forms a gloo group on the CPU.
Several machines, SLURM and elastic restarts: `accelerate launch` / `torchrun` as README says.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

from dist_train.errors import UserError, cli_main

HERE = Path(__file__).resolve().parent
COMMANDS = {"train": "run.py", "predict": "predict.py", "evaluate": "evaluate.py", "lr-find": "lr_find.py"}
USAGE = ("usage: dist-train {" + ",".join(COMMANDS) + "} [--processes N] [--port P] FLAGS...  "
         "(FLAGS: the command's own, see dist-train COMMAND --help)")


def _take(args: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` / `flag=VALUE` from args (the launcher's own flags); its value or None."""
    for i, a in enumerate(args):
        if a == flag:
            if i + 1 >= len(args):
                raise UserError(f"{flag}: expected a value ({USAGE})")
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if a.startswith(flag + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def _int_flag(args: list[str], flag: str, lowest: int) -> int | None:
    value = _take(args, flag)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = lowest - 1
    if number < lowest:
        raise UserError(f"{flag} {value}: expected an integer >= {lowest}")
    return number


def default_processes() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_here(script: Path, args: list[str]) -> int:
    """One process: the command's own main in this process (its cli_main prints and exits)."""
    module = importlib.import_module(f"dist_train.{script.stem}")
    try:
        module.main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run_ranks(script: Path, args: list[str], processes: int, port: int) -> int:
    """N processes through Accelerate's launcher, in this process; the first failure's exit code."""
    with warnings.catch_warnings():  # boto3 (imported by Accelerate's CLI for SageMaker) warns about pyOpenSSL
        warnings.simplefilter("ignore")
        return _launch(script, args, processes, port)


def _launch(script: Path, args: list[str], processes: int, port: int) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # "closing signal", "failed (exitcode"
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    launch_args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(port),
        "--dynamo_backend", "no", str(script), *args])
    try:
        launch_command(launch_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode  # the rank printed its own line (or its traceback)
        sig = -failure.exitcode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        print(f"error: rank {rank} was killed by {name}" + (" (out of memory?)" if sig == signal.SIGKILL else ""),
              file=sys.stderr, flush=True)
        return 128 + sig
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    command, args = args[0], args[1:]
    if command not in COMMANDS:
        raise UserError(f"{command}: not a command; expected one of {', '.join(COMMANDS)} ({USAGE})")
    processes = _int_flag(args, "--processes", 1)
    port = _int_flag(args, "--port", 1) or free_port()
    processes = processes or default_processes()
    script = HERE / COMMANDS[command]
    if processes == 1 or "-h" in args or "--help" in args:
        return run_here(script, args)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise UserError(f"{command} --processes {processes}: already under a launcher (torchrun / accelerate "
                        "launch); run the command itself there")
    return run_ranks(script, args, processes, port)


def entry() -> None:
    """The console script: the command's exit status is this process's."""
    sys.exit(main())
