#!/usr/bin/env bash
# Usage: launch/shard.sh --src RAW --out shards/NAME [python -m dist_train.shard flags...]
# Shards a raw image set once (set-up included); all cores decode/resize by default.
source "$(dirname "$0")/setup.sh"
exec python -m dist_train.shard "$@"
