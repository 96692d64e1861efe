#!/usr/bin/env bash
# Create .venv if missing, install, run the test suite (CPU only; DDP tests use gloo).
# Two pytest-xdist workers (PYTEST_WORKERS to change): the DDP launches (tests marked `ranks`)
# run one after another on one worker while the other runs the in-process tests; each module's
# other tests stay together on one worker (tests/conftest.py).
source "$(dirname "$0")/setup.sh"
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadscope --durations=25 "$@"
