#!/usr/bin/env bash
# gnlorp-train with FSDP2 (torch's fully_shard, per decoder layer then the root) on ONE node:
# NPROC processes started by torchrun, each holding its rows of every weight, gradient and
# GradNormLoRPAdamW state (DTensor Shard(0)). Checkpoints are torch.distributed.checkpoint
# shards: rerun with another NPROC (same global batch) to resume on another number of processes.
# Default: LLaMA 1B (the model's GaLore recipe: rank, T, alpha, lr), fp32 masters with bf16
# autocast, C4, 8 GPUs, global batch 512 x 256 tokens. See launch/README.md and
# docs/distributed.md ("FSDP2").
#
#   bash launch/fsdp2.sh                                     # 8 GPUs, LLaMA 1B, C4
#   NPROC=4 MODEL=llama_350m bash launch/fsdp2.sh --eval-every 1000   # extra args: gnlorp-train
#   # CPU demo (2 processes, gloo), a few seconds of training:
#   NPROC=2 MODEL=llama_nano AUTOCAST=none BATCH_SIZE=2 GLOBAL_BATCH=4 DATA=shakespeare \
#     MAX_STEPS=4 OUTPUT_DIR=/tmp/fsdp2-demo bash launch/fsdp2.sh --device cpu --seq-len 64
set -euo pipefail

NPROC=${NPROC:-8}                   # processes on this node (one per GPU)
MASTER_PORT=${MASTER_PORT:-29500}   # rendezvous port on 127.0.0.1
MODEL=${MODEL:-llama_1b}
OPTIMIZER=${OPTIMIZER:-gradnormlorp} # or galore, adamw
PROJ_RANK=${PROJ_RANK-}             # empty: the model's recipe (not RANK: launchers set RANK)
UPDATE_PROJ_GAP=${UPDATE_PROJ_GAP-} # empty: the model's recipe
SCALE=${SCALE-}                     # empty: the model's recipe
LR=${LR-}                           # empty: the model's recipe
GRAD_CLIP=${GRAD_CLIP:-1.0}         # global norm over every shard (torch's clip_grad_norm_)
DTYPE=${DTYPE:-fp32}                # fp32 masters; bf16: pure bf16 weights and states
AUTOCAST=${AUTOCAST:-bf16}          # bf16 matmuls over fp32 weights; none on CPUs without bf16
BATCH_SIZE=${BATCH_SIZE:-16}        # sequences per micro-batch per process
GLOBAL_BATCH=${GLOBAL_BATCH:-512}   # sequences per optimizer step, all processes (GaLore's 512)
GRAD_ACCUM=${GRAD_ACCUM:-$((GLOBAL_BATCH / (BATCH_SIZE * NPROC)))}
SEQ_LEN=${SEQ_LEN:-256}
MAX_STEPS=${MAX_STEPS:-10000}       # the paper's Table 2 runs (60M-1B): 10K steps
WARMUP_STEPS=${WARMUP_STEPS-}       # empty: 10% of MAX_STEPS
DATA=${DATA:-allenai/c4}
DATA_CONFIG=${DATA_CONFIG:-en}
TOKENIZER=${TOKENIZER-}             # a LLaMA tokenizer folder; empty: the package default
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL}-${OPTIMIZER}-fsdp2}

if (( GRAD_ACCUM < 1 || BATCH_SIZE * GRAD_ACCUM * NPROC != GLOBAL_BATCH )); then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not BATCH_SIZE=$BATCH_SIZE x NPROC=$NPROC x" \
        "GRAD_ACCUM=$GRAD_ACCUM; change one of them" >&2
    exit 1
fi

TRAIN_ARGS=(--fsdp --world-size "$NPROC" --model "$MODEL" --optimizer "$OPTIMIZER"
    --dtype "$DTYPE" --autocast "$AUTOCAST" --grad-clip "$GRAD_CLIP"
    --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM" --seq-len "$SEQ_LEN"
    --max-steps "$MAX_STEPS" --data "$DATA" --output-dir "$OUTPUT_DIR")
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

LAUNCH=(torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$MASTER_PORT"
    -m gnlorp_dist.train)
echo "== ${LAUNCH[*]} ${TRAIN_ARGS[*]} $* =="
exec "${LAUNCH[@]}" "${TRAIN_ARGS[@]}" "$@"
