#!/usr/bin/env bash
# Reference runs: train five short llama_nano runs on the CPU and print the md5 of each merged
# model (<output-dir>/final/model.safetensors), one "name md5" line per run. The table these
# lines fill is in benchmarks/README.md ("Reference runs (md5 of the merged model)").
#
#   benchmarks/reference_runs.sh [OUT_DIR]     # default OUT_DIR: a fresh mktemp -d folder
#
# Environment: BIN (the venv's bin folder, default .venv/bin), OMP_NUM_THREADS (default 1: the
# md5 depends on the thread count), PORT (torchrun's master port, default a free one).
# Every run gets a fresh output folder, so nothing resumes. It takes about 7 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-$(mktemp -d /tmp/gnlorp-reference.XXXXXX)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's gnlorp_dist
PORT=${PORT:-$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$OUT"

run() {  # run NAME COMMAND...: train into $OUT/NAME, then print NAME and the merged model's md5
  local name=$1
  shift
  rm -rf "${OUT:?}/$name"
  "$@" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; exit 1; }
  echo "$name $(md5sum < "$OUT/$name/final/model.safetensors" | cut -d' ' -f1)"
}

run default  "$BIN/python" -m gnlorp_dist.train --max-steps 30
run galore8  "$BIN/python" -m gnlorp_dist.train --max-steps 30 --optimizer galore --bits 8 --per-layer
run bf16     "$BIN/python" -m gnlorp_dist.train --max-steps 30 --dtype bf16
run torchrun2 "$BIN/torchrun" --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$PORT" \
  -m gnlorp_dist.train --world-size 2 --max-steps 30
run zero2    "$BIN/deepspeed" --num_gpus 2 --master_addr 127.0.0.1 --master_port "$PORT" \
  --no_local_rank --module gnlorp_dist.train --deepspeed ds_configs/zero2.json --world-size 2 \
  --max-steps 30
