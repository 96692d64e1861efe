#!/usr/bin/env bash
# Throughput check on one CUDA GPU (about 6-8 minutes on an H100): resnet50, bf16, 224 px,
# channels-last, batch 256; prints a table and keeps the JSON lines.
#
#   launch/gpu_check.sh            # results in $GPU_CHECK_DIR (default: a new $TMPDIR/gpu_check.*, /tmp without TMPDIR)
#
# 1. data: synthetic mask photos at 384x512 ($SYNTH_JOBS synth jobs in parallel), repeated through
#    hard links into a class-folder set of IMAGES (default 60000: ~20 s of loading at 3000 img/s),
#    sharded with --resize 256;
# 2. loader alone: training pipeline (CPU decode), its decode-only limit, --gpu-decode;
# 3. trainer: bare PyTorch loop vs the trainer on one cached batch (synthetic input), then the
#    trainer end to end from the shards, CPU decode and --gpu-decode; compile off, then on.
# Loader workers = all usable cores. Targets (issue 6): end to end from shards >= 3000 img/s and
# >= 0.95x the synthetic-input figure; trainer >= 0.95x the bare loop.
#
# Settings (environment): IMAGES, PERSONS (per synth job), SYNTH_JOBS (16), STEPS (30),
# SECONDS_PER_LOADER (10), MODEL (resnet50), IMG_SIZE (224), BATCH (256), COMPILE_MODES
# ("eager compile"). GPU_CHECK_CPU=1 runs it without CUDA: the figures mean nothing, but every
# step of the script runs (tests/test_bench.py does that with a tiny model).
#
# Python: .venv/bin/python if it sees CUDA, else python3 if it does; only when neither exists
# does it run launch/setup.sh (which needs internet). A GPU machine without internet must have
# the dependencies installed already (torch with CUDA, torchvision, timm, accelerate, pandas,
# pyyaml, safetensors, tensorboard, matplotlib, webdataset); missing ones are installed from
# wheels in ./.whl when that folder exists (pip --no-index). The lent H100/H200 image lacks only
# webdataset: `pip download --no-deps -d .whl webdataset braceexpand` here, then run
# `bash launch/gpu_check.sh` there with `.whl` carried along.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGES="${IMAGES:-60000}"
PERSONS="${PERSONS:-30}"  # per synth job; 16 jobs
SYNTH_JOBS="${SYNTH_JOBS:-16}"
STEPS="${STEPS:-30}"
SECONDS_PER_LOADER="${SECONDS_PER_LOADER:-10}"
MODEL="${MODEL:-resnet50}"
IMG_SIZE="${IMG_SIZE:-224}"
BATCH="${BATCH:-256}"
COMPILE_MODES="${COMPILE_MODES:-eager compile}"

sees_cuda() { [ -x "$(command -v "$1" 2>/dev/null)" ] && "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=""
for candidate in .venv/bin/python python3; do
  if sees_cuda "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ] && [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  PY="$(for c in .venv/bin/python python3; do [ -x "$(command -v "$c" 2>/dev/null)" ] && echo "$c" && break; done)"
  echo "gpu_check: GPU_CHECK_CPU=1, running on the CPU (a check of the script; the figures mean nothing)"
fi
if [ -z "$PY" ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here (nvidia-smi finds none); run this on a machine with an NVIDIA GPU" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    source launch/setup.sh
  fi
  if ! sees_cuda .venv/bin/python; then
    echo "gpu_check: no Python with CUDA-enabled torch (tried .venv/bin/python, python3); install torch for this GPU" >&2
    exit 1
  fi
  PY=.venv/bin/python
fi
missing="$("$PY" - <<'EOF'
import importlib.util
mods = ["torchvision", "timm", "accelerate", "webdataset", "pandas", "yaml", "safetensors", "tensorboard", "matplotlib", "tqdm"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)"
if [ -n "$missing" ] && [ -d .whl ]; then
  echo "gpu_check: installing $missing from ./.whl"
  "$PY" -m pip install -q --no-index --find-links .whl $(echo "$missing" | sed 's/\byaml\b/pyyaml/')
  missing=""
fi
if [ -n "$missing" ]; then
  echo "gpu_check: $PY lacks: $missing (no internet here? put their wheels in ./.whl)" >&2
  exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK="${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$WORK"
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
CORES="$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')"
echo "gpu_check: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "| torch", torch.__version__)') | $CORES cores | $PY | work $WORK"

step() { echo "[$(date +%T)] $*"; }

# ---------------------------------------------------------------- data
if [ ! -f "$WORK/shards/_info.json" ]; then
  step "synthetic 384x512 photos: $SYNTH_JOBS jobs x $PERSONS persons x 7"
  pids=()
  for i in $(seq 0 $((SYNTH_JOBS - 1))); do
    "$PY" -m dist_train.synth --out "$WORK/raw/$i" --persons "$PERSONS" --size 384 --seed "$i" --eval-persons 1 >/dev/null &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  step "class folders of $IMAGES images (hard links, repeated: shard follows no link out of its --src)"
  "$PY" - "$WORK" "$IMAGES" <<'EOF'
import os, shutil, sys
from pathlib import Path
work, total = Path(sys.argv[1]), int(sys.argv[2])
cls = {"incorrect_mask": "incorrect", "normal": "not_wear"}
files = sorted(p for p in (work / "raw").glob("*/train/images/*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
               and not any(part.startswith(".") for part in p.parts[-2:]))
for k in range(total):
    src = files[k % len(files)]
    dst = work / "folder" / cls.get(src.stem, "wear") / f"{k:06d}{src.suffix.lower()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)
print(f"{len(files)} distinct images, {total} files")
EOF
  step "sharding with --resize 256"
  "$PY" -m dist_train.shard --src "$WORK/folder" --out "$WORK/shards" --resize 256 --val-fraction 0 --quiet | tail -1
fi
SHARDS="$WORK/shards"

# ---------------------------------------------------------------- benchmarks
bench() {
  step "bench $*"
  "$PY" -m dist_train.bench "$@" 2>"$WORK/last.err" | tee -a "$RESULTS" || { tail -20 "$WORK/last.err" >&2; exit 1; }
}
LOADER=(--data "$SHARDS" --img-size "$IMG_SIZE" --batch-size "$BATCH" --workers "$CORES" --seconds "$SECONDS_PER_LOADER")
bench loader "${LOADER[@]}"
bench loader "${LOADER[@]}" --decode-only
bench loader "${LOADER[@]}" --gpu-decode
TRAIN=(--model "$MODEL" --img-size "$IMG_SIZE" --batch-size "$BATCH" --mixed-precision bf16 --channels-last --steps "$STEPS" --warmup 5)
for mode in $COMPILE_MODES; do
  compile=""
  [ "$mode" = compile ] && compile="--compile"
  bench train "${TRAIN[@]}" $compile --synthetic
  bench train "${TRAIN[@]}" $compile --data "$SHARDS" --workers "$CORES" --no-bare
  bench train "${TRAIN[@]}" $compile --data "$SHARDS" --workers "$CORES" --no-bare --gpu-decode
done

# ---------------------------------------------------------------- table
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"\n{'what':<58} {'images/s':>10}  note")
for r in rows:
    if r["bench"] == "loader":
        print(f"{'loader ' + r['mode'] + ' (' + str(r['workers']) + ' workers)':<58} {r['images_per_s']:>10.0f}")
synthetic = {}
for r in rows:
    if r["bench"] != "train":
        continue
    tag = "compile" if r["compile"] else "eager"
    if r["input"] == "synthetic":
        synthetic[tag] = r["trainer_images_per_s"]
        print(f"{'bare loop, ' + tag:<58} {r['bare_images_per_s']:>10.0f}")
        print(f"{'trainer, synthetic input, ' + tag:<58} {r['trainer_images_per_s']:>10.0f}  "
              f"{r['ratio']:.3f}x bare (target >= 0.95)")
    else:
        what = f"trainer from shards, {'gpu' if r['gpu_decode'] else 'cpu'} decode, {tag}"
        vs = r["trainer_images_per_s"] / synthetic[tag] if tag in synthetic else float("nan")
        print(f"{what:<58} {r['trainer_images_per_s']:>10.0f}  {vs:.3f}x synthetic (target >= 0.95), "
              f"waits {100 * r['data_wait_fraction']:.0f}% (target >= 3000 img/s)")
EOF
echo "gpu_check: JSON lines in $RESULTS"
