#!/usr/bin/env bash
# Usage: launch/train.sh ACCELERATE_CONFIG.yaml [dist_train/run.py flags...]
#   launch/train.sh launch/multi_gpu.yaml --config launch/configs/efficientnet_b0_staged.yaml --data shards/mask --output runs/b0
# For multi_gpu.yaml the process count is this machine's GPU count.
source "$(dirname "$0")/setup.sh"
CFG="${1:?usage: launch/train.sh ACCELERATE_CONFIG.yaml [run.py flags]}"; shift
[ -f "$CFG" ] || { echo "error: accelerate config $CFG not found (see launch/*.yaml)" >&2; exit 2; }
EXTRA=()
if [ "$(basename "$CFG")" = multi_gpu.yaml ] && command -v nvidia-smi >/dev/null 2>&1; then
  EXTRA=(--num_processes "$(nvidia-smi -L | wc -l)")
fi
exec accelerate launch --config_file "$CFG" "${EXTRA[@]}" dist_train/run.py "$@"
