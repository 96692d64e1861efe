#!/usr/bin/env bash
# Create .venv if missing, install, run the test suite (CPU only; DDP tests use gloo).
source "$(dirname "$0")/setup.sh"
python -m pytest -q --durations=25 "$@"
