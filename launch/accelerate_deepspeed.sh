#!/usr/bin/env bash
# gnlorp-train under `accelerate launch` with Accelerate's DeepSpeed integration
# (launch/accelerate_deepspeed.yaml: distributed_type DEEPSPEED, a ds_configs/ file). Accelerate
# starts NUM_PROCESSES processes and sets ACCELERATE_USE_DEEPSPEED=true and
# ACCELERATE_DEEPSPEED_CONFIG_FILE=<the config>; gnlorp-train picks the config up from there
# (no --deepspeed needed) and fills its "auto" values from its own flags. Extra arguments go to
# gnlorp-train; without any it is gnlorp-train's default run (llama_nano, Shakespeare).
#
#   bash launch/accelerate_deepspeed.sh                          # 2 processes, ZeRO-2
#   NUM_PROCESSES=8 CONFIG=zero3.json bash launch/accelerate_deepspeed.sh --model llama_1b
#   # CPU demo (2 processes, gloo):
#   DS_ACCELERATOR=cpu bash launch/accelerate_deepspeed.sh --max-steps 4 --output-dir /tmp/acc-demo
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NUM_PROCESSES=${NUM_PROCESSES:-2}   # processes on this machine (= --world-size)
CONFIG=${CONFIG:-zero2.json}        # a file in ds_configs/, or a path; replaces the YAML's
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$REPO/launch/accelerate_deepspeed.yaml}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

if [[ -f "$CONFIG" ]]; then DS_CONFIG=$CONFIG; else DS_CONFIG=$REPO/ds_configs/$CONFIG; fi
if [[ ! -f "$DS_CONFIG" ]]; then
    echo "no DeepSpeed config $DS_CONFIG; pick one of: $(ls "$REPO/ds_configs" | grep json)" >&2
    exit 1
fi
DS_CONFIG=$(cd "$(dirname "$DS_CONFIG")" && pwd)/$(basename "$DS_CONFIG")   # absolute: Accelerate
                                                 # passes it on as given, relative to the cwd

# --deepspeed_config_file and --num_processes override the YAML's values. Do not add
# --mixed_precision or --gradient_accumulation_steps: with a config file Accelerate refuses them
# (bf16 and accumulation live in the JSON, filled by gnlorp-train from --dtype / --grad-accum).
LAUNCH=(accelerate launch --config_file "$ACCELERATE_CONFIG" --deepspeed_config_file "$DS_CONFIG"
    --num_processes "$NUM_PROCESSES" --main_process_ip 127.0.0.1
    --main_process_port "$MAIN_PROCESS_PORT" -m gnlorp_dist.train)
TRAIN_ARGS=(--world-size "$NUM_PROCESSES")
echo "== ${LAUNCH[*]} ${TRAIN_ARGS[*]} $* =="
exec "${LAUNCH[@]}" "${TRAIN_ARGS[@]}" "$@"
