#!/usr/bin/env bash
# The whole pipeline on a built-in synthetic dataset: generate -> shard -> inspect -> train
# (DDP over all GPUs, or 2 gloo processes on a CPU-only machine) -> val macro F1.
source "$(dirname "$0")/setup.sh"
DEMO="${DEMO_DIR:-demo}"
python -m dist_train.synth --out "$DEMO/raw" --persons "${DEMO_PERSONS:-240}" --size 48 --overwrite
python -m dist_train.shard --src "$DEMO/raw/train" --out "$DEMO/shards" --samples-per-shard 64 --overwrite
python -m dist_train.shard --inspect "$DEMO/shards"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC="$(nvidia-smi -L | wc -l)"
else
  NPROC=2
fi
rm -rf "$DEMO/run"
# dist-train (python -m dist_train): N ranks, one error line and the run's own exit status on failure
python -m dist_train train --processes "$NPROC" \
  --config launch/configs/demo.yaml --data "$DEMO/shards" --output "$DEMO/run" "$@"
echo "demo: run folder $DEMO/run (metrics.jsonl, best/, checkpoints/, tb/)"
