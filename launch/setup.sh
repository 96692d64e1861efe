# Sourced by the launch scripts: make .venv (python3 only needed) and install the project once.
# Reinstalls when pyproject.toml changes; exports PATH so `python`/`accelerate` are the venv's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=".venv/.dist_train-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dist_train and its dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install --quiet -e '.[test]'
  echo "$want" > "$stamp"
fi
# Byte-compile the project's own modules: pip compiled the dependencies at install, but an
# editable install leaves dist_train as sources, and where PYTHONDONTWRITEBYTECODE is set every
# process compiled them again (~0.4 s per process: each rank, each CLI). Up-to-date files are skipped.
.venv/bin/python -m compileall -q dist_train >/dev/null
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1
