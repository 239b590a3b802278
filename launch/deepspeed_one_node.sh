#!/usr/bin/env bash
# gnlorp-train under DeepSpeed ZeRO on ONE node: NUM_GPUS processes started by the `deepspeed`
# launcher, GradNormLoRPAdamW as DeepSpeed's client optimizer, a config from ds_configs/.
# Default: LLaMA 1B (the model's GaLore recipe: rank, T, alpha, lr), bf16, ZeRO-2, C4, 8 GPUs,
# global batch 512 x 256 tokens. See launch/README.md and ds_configs/README.md.
#
#   bash launch/deepspeed_one_node.sh                              # 8 GPUs, ZeRO-2, C4
#   CONFIG=zero3_offload.json NUM_GPUS=4 bash launch/deepspeed_one_node.sh
#   BATCH_SIZE=8 bash launch/deepspeed_one_node.sh --eval-every 1000   # extra args: gnlorp-train
#   # CPU demo (2 processes, gloo), a few seconds of training:
#   DS_ACCELERATOR=cpu NUM_GPUS=2 MODEL=llama_nano DTYPE=fp32 BATCH_SIZE=2 GLOBAL_BATCH=4 \
#     DATA=shakespeare MAX_STEPS=4 OUTPUT_DIR=/tmp/ds-demo bash launch/deepspeed_one_node.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NUM_GPUS=${NUM_GPUS:-8}             # processes on this node (GPU ids 0..NUM_GPUS-1)
CONFIG=${CONFIG:-zero2.json}        # a file in ds_configs/, or a path
MASTER_PORT=${MASTER_PORT:-29500}   # rendezvous port on 127.0.0.1
MODEL=${MODEL:-llama_1b}
PROJ_RANK=${PROJ_RANK-}             # empty: the model's recipe (not RANK: launchers set RANK)
UPDATE_PROJ_GAP=${UPDATE_PROJ_GAP-} # empty: the model's recipe
SCALE=${SCALE-}                     # empty: the model's recipe
LR=${LR-}                           # empty: the model's recipe
GRAD_CLIP=${GRAD_CLIP:-1.0}         # fills the config's "gradient_clipping": "auto"
BITS=${BITS:-32}                    # 8: block-wise 8-bit low-rank moments
DTYPE=${DTYPE:-bf16}                # fills "bf16": {"enabled": "auto"}; DeepSpeed keeps fp32 masters
BATCH_SIZE=${BATCH_SIZE:-16}        # sequences per micro-batch per process
GLOBAL_BATCH=${GLOBAL_BATCH:-512}   # sequences per optimizer step, all processes (GaLore's 512)
GRAD_ACCUM=${GRAD_ACCUM:-$((GLOBAL_BATCH / (BATCH_SIZE * NUM_GPUS)))}
SEQ_LEN=${SEQ_LEN:-256}
MAX_STEPS=${MAX_STEPS:-10000}       # the paper's Table 2 runs (60M-1B): 10K steps
WARMUP_STEPS=${WARMUP_STEPS-}       # empty: 10% of MAX_STEPS
DATA=${DATA:-allenai/c4}
DATA_CONFIG=${DATA_CONFIG:-en}
TOKENIZER=${TOKENIZER-}             # a LLaMA tokenizer folder; empty: the package default
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL}-gradnormlorp-deepspeed}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # what torchrun sets; the deepspeed launcher does not

if [[ -f "$CONFIG" ]]; then DS_CONFIG=$CONFIG; else DS_CONFIG=$REPO/ds_configs/$CONFIG; fi
if [[ ! -f "$DS_CONFIG" ]]; then
    echo "no DeepSpeed config $DS_CONFIG; pick one of: $(ls "$REPO/ds_configs" | grep json)" >&2
    exit 1
fi
if (( GRAD_ACCUM < 1 || BATCH_SIZE * GRAD_ACCUM * NUM_GPUS != GLOBAL_BATCH )); then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not BATCH_SIZE=$BATCH_SIZE x NUM_GPUS=$NUM_GPUS x" \
        "GRAD_ACCUM=$GRAD_ACCUM; change one of them" >&2
    exit 1
fi

TRAIN_ARGS=(--deepspeed "$DS_CONFIG" --world-size "$NUM_GPUS"
    --model "$MODEL" --optimizer gradnormlorp --bits "$BITS" --dtype "$DTYPE"
    --grad-clip "$GRAD_CLIP" --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM"
    --seq-len "$SEQ_LEN" --max-steps "$MAX_STEPS" --data "$DATA" --output-dir "$OUTPUT_DIR")
optional() {  # optional FLAG VALUE: pass FLAG VALUE only when VALUE is set
    if [[ -n "$2" ]]; then TRAIN_ARGS+=("$1" "$2"); fi
}
optional --rank "$PROJ_RANK"
optional --update-proj-gap "$UPDATE_PROJ_GAP"
optional --scale "$SCALE"
optional --lr "$LR"
optional --warmup-steps "$WARMUP_STEPS"
optional --tokenizer "$TOKENIZER"
if [[ "$DATA" == */* ]]; then
    TRAIN_ARGS+=(--data-config "$DATA_CONFIG")
fi

# `deepspeed` has no `-m`: --module runs `python -m gnlorp_dist.train`. --no_local_rank: ranks
# come from the LOCAL_RANK/RANK/WORLD_SIZE environment, not a --local_rank=N argument.
LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --master_addr 127.0.0.1 --master_port "$MASTER_PORT"
    --no_local_rank --module gnlorp_dist.train)
echo "== ${LAUNCH[*]} ${TRAIN_ARGS[*]} $* =="
exec "${LAUNCH[@]}" "${TRAIN_ARGS[@]}" "$@"
