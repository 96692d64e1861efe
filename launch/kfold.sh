#!/usr/bin/env bash
# Usage: launch/kfold.sh ACCELERATE_CONFIG.yaml --data SHARDS --output CV [run.py flags...]
#   bash launch/kfold.sh launch/multi_gpu.yaml --data shards/mask5 --output runs/cv --config launch/configs/mask_competition.yaml
# Trains every fold of a `python -m dist_train.shard --folds K` set, fold k into CV/fold-k/
# (each through `accelerate launch --config_file ACCELERATE_CONFIG.yaml`, resumed if it was
# interrupted, skipped if finished), then writes CV/oof.csv, oof.probs.npz, oof.json.
source "$(dirname "$0")/setup.sh"
CFG="${1:?usage: launch/kfold.sh ACCELERATE_CONFIG.yaml --data SHARDS --output CV [run.py flags]}"; shift
[ -f "$CFG" ] || { echo "error: accelerate config $CFG not found (see launch/*.yaml)" >&2; exit 2; }
DATA="" CV="" TRAIN_SPLIT=train
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --output) CV="${2:?--output needs a folder}"; shift 2 ;;
    --output=*) CV="${1#--output=}"; shift ;;
    --fold|--fold=*) echo "error: launch/kfold.sh runs every fold itself; pass no --fold" >&2; exit 2 ;;
    --data) DATA="${2:?--data needs a shard set}"; ARGS+=("$1" "$2"); shift 2 ;;
    --data=*) DATA="${1#--data=}"; ARGS+=("$1"); shift ;;
    --train-split) TRAIN_SPLIT="$2"; ARGS+=("$1" "$2"); shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[ -n "$DATA" ] && [ -n "$CV" ] || { echo "error: pass --data SHARDS and --output CV" >&2; exit 2; }
K="$(python - "$DATA" "$TRAIN_SPLIT" <<'PY'
import sys
from dist_train.errors import UserError
from dist_train.shardset.format import load_info, split_info
try:
    k = split_info(load_info(sys.argv[1]), sys.argv[2]).folds
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
if not k:
    print(f"error: --data {sys.argv[1]}: split {sys.argv[2]!r} has no folds (shard it with python -m dist_train.shard "
          "--folds K)", file=sys.stderr)
    sys.exit(2)
print(k)
PY
)" || exit 2
EXTRA=()
if [ "$(basename "$CFG")" = multi_gpu.yaml ] && command -v nvidia-smi >/dev/null 2>&1; then
  EXTRA=(--num_processes "$(nvidia-smi -L | wc -l)")
fi
for ((k = 0; k < K; k++)); do
  if python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('finished') else 1)" \
      "$CV/fold-$k/summary.json" 2>/dev/null; then
    echo "kfold: fold $k of $K already finished ($CV/fold-$k)"
    continue
  fi
  echo "kfold: fold $k of $K -> $CV/fold-$k"
  accelerate launch --config_file "$CFG" "${EXTRA[@]}" dist_train/run.py "${ARGS[@]}" \
    --fold "$k" --output "$CV/fold-$k" --resume auto
done
# The address as typed here: oof refuses a pipe: command read back from fold-0/config.yaml.
exec python -m dist_train.oof "$CV" --data "$DATA"
