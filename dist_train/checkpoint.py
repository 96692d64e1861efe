"""Check a run's checkpoints without loading them: `python -m dist_train.checkpoint --verify RUN`.

One line per checkpoint (good, or damaged and why: a file missing, truncated, altered or not
written with it), then which one `--resume auto` would continue from. Exit 0 if all are good, 1
if any is damaged, 2 for bad input. RUN is a run folder, its `checkpoints/` folder, or one
checkpoint folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dist_train.errors import ArgParser, UserError, cli_main  # noqa: E402
from dist_train.train.checkpoint import CKPT_PREFIX  # noqa: E402
from dist_train.train.integrity import PROGRESS_NAME, verify  # noqa: E402


def checkpoint_folders(path: Path) -> list[Path]:
    """The checkpoint folders RUN names: every `step-*` folder, complete or not."""
    if not path.is_dir():
        raise UserError(f"--verify {path}: no such folder (expected a run folder written by dist_train/run.py)")
    if (path / PROGRESS_NAME).exists() or path.name.startswith(CKPT_PREFIX):
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
    if not found:
        raise UserError(f"--verify {path}: no checkpoints in it (expected {root}/{CKPT_PREFIX}XXXXXXXX/)")
    return found


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="python -m dist_train.checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--verify", metavar="RUN", required=True, help="run folder, its checkpoints/ or one checkpoint")
    args = p.parse_args(argv)
    verdicts = [verify(f) for f in checkpoint_folders(Path(args.verify))]
    for v in verdicts:
        print(v.line())
    good = [v for v in verdicts if v.good]
    newest = good[-1].path.name if good else "none (it would refuse)"
    print(f"{len(good)} of {len(verdicts)} good; --resume auto continues from {newest}")
    if len(good) < len(verdicts):
        sys.exit(1)  # a finding, not an error: the lines above say what is wrong
    return 0


if __name__ == "__main__":
    main()
