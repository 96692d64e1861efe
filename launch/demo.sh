#!/usr/bin/env bash
# The whole pipeline on a built-in synthetic dataset: generate -> shard -> inspect -> train
# (DDP over all GPUs, or 2 gloo processes on a CPU-only machine) -> val macro F1.
source "$(dirname "$0")/setup.sh"
DEMO="${DEMO_DIR:-demo}"
python -m dist_train.synth --out "$DEMO/raw" --persons "${DEMO_PERSONS:-240}" --size 48 --overwrite
python -m dist_train.shard --src "$DEMO/raw/train" --out "$DEMO/shards" --samples-per-shard 64 --overwrite
python -m dist_train.shard --inspect "$DEMO/shards"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC="$(nvidia-smi -L | wc -l)"; CFG=launch/multi_gpu.yaml
else
  NPROC=2; CFG=launch/cpu_ddp.yaml
fi
rm -rf "$DEMO/run"
accelerate launch --config_file "$CFG" --num_processes "$NPROC" dist_train/run.py \
  --config launch/configs/demo.yaml --data "$DEMO/shards" --output "$DEMO/run" "$@"
echo "demo: run folder $DEMO/run (metrics.jsonl, best/, checkpoints/, tb/)"
