#!/usr/bin/env bash
# LLaMA 7B pre-training on ONE 24 GB GPU (RTX 4090 / A5000 / L4-class): 8-bit GradNormLoRP with
# per-layer updates, rank 1024, bf16 weights, INT8 projection bases (--proj-bits 8: the closest
# to the paper's bf16 bases that fits 18 GiB; they keep 0.999 of the gradient energy), activation
# checkpointing, 16 x 256 tokens per step. Estimated peak 19.61 GiB (19.17 GiB with INT4 bases,
# PROJ_BITS=4; 20.46 GiB with bf16 bases, PROJ_BITS=16); at 256 tokens per GPU the same settings
# estimate 17.55 GiB.
#
# Before training it asks the estimator (gnlorp-memory, same settings) for the peak and refuses
# to start when that exceeds BUDGET_GIB (FORCE=1 starts anyway). See launch/README.md.
#
# Disk: gnlorp-train refuses to start unless OUTPUT_DIR has room for what it writes: one
# checkpoint (about 18.3 GB: bf16 weights, 8-bit states, INT8 bases; --keep-checkpoints prunes
# older ones) and the bf16 merged model at the end (13.5 GB): about 35 GB with the margin.
#
#   bash launch/single_gpu_7b.sh                                  # C4 (streamed), LLaMA tokenizer
#   DATA=shakespeare TOKENIZER= MAX_STEPS=10 bash launch/single_gpu_7b.sh   # offline smoke run
#   BATCH_SIZE=8 bash launch/single_gpu_7b.sh --eval-every 1000   # extra args go to gnlorp-train
set -euo pipefail

MODEL=${MODEL:-llama_7b}
RANK=${RANK:-1024}                  # GaLore/GradNormLoRP 7B recipe: r=1024, T=500, alpha=0.25
UPDATE_PROJ_GAP=${UPDATE_PROJ_GAP:-500}
PROJ_BITS=${PROJ_BITS:-8}           # projection bases: 8 (INT8), 4 (INT4) or 16 (bf16, GaLore's)
SCALE=${SCALE:-0.25}
LR=${LR:-0.005}
GRAD_CLIP=${GRAD_CLIP:-1.0}         # per parameter with --per-layer (no global norm in backward)
BATCH_SIZE=${BATCH_SIZE:-16}        # sequences per micro-batch
SEQ_LEN=${SEQ_LEN:-256}
GRAD_ACCUM=${GRAD_ACCUM:-1}         # >1 adds 3.2 GB of low-rank sums + 0.5 GB of dense grads
MAX_STEPS=${MAX_STEPS:-150000}
WARMUP_STEPS=${WARMUP_STEPS:-15000}
DATA=${DATA:-allenai/c4}
DATA_CONFIG=${DATA_CONFIG:-en}
TOKENIZER=${TOKENIZER-}             # a LLaMA tokenizer folder; empty: the package default
OUTPUT_DIR=${OUTPUT_DIR:-runs/llama_7b-gradnormlorp-8bit}
DEVICE=${DEVICE:-cuda}              # this process's GPU (cuda:N picks another); refused without CUDA
BUDGET_GIB=${BUDGET_GIB:-22.5}      # 24 GiB card minus CUDA context, cuBLAS/cuSOLVER workspace

TOKENS=$((BATCH_SIZE * SEQ_LEN))
if command -v gnlorp-memory >/dev/null 2>&1; then
    MEMORY=(gnlorp-memory)
else
    MEMORY=(python -m gnlorp_dist.memory.cli)
fi
ESTIMATE_ARGS=(--model "$MODEL" --optimizer gradnormlorp --bits 8 --per-layer --rank "$RANK"
    --tokens "$TOKENS" --seq-len "$SEQ_LEN" --accumulation-steps "$GRAD_ACCUM" --dtype bf16
    --proj-bits "$PROJ_BITS" --activation-checkpointing)

echo "== estimated peak memory per GPU =="
"${MEMORY[@]}" "${ESTIMATE_ARGS[@]}"
TOTAL_BYTES=$("${MEMORY[@]}" "${ESTIMATE_ARGS[@]}" --json \
    | python -c 'import json, sys; print(json.load(sys.stdin)["total_bytes"])')
if ! python -c "import sys; sys.exit(0 if $TOTAL_BYTES <= $BUDGET_GIB * 2**30 else 1)"; then
    echo "estimated peak $TOTAL_BYTES bytes exceeds BUDGET_GIB=$BUDGET_GIB GiB;" \
        "lower BATCH_SIZE or GRAD_ACCUM, or set FORCE=1" >&2
    if [[ "${FORCE:-0}" != "1" ]]; then
        exit 1
    fi
fi

TRAIN_ARGS=(--model "$MODEL" --optimizer gradnormlorp --bits 8 --per-layer
    --rank "$RANK" --update-proj-gap "$UPDATE_PROJ_GAP" --scale "$SCALE" --proj-bits "$PROJ_BITS"
    --lr "$LR" --grad-clip "$GRAD_CLIP" --dtype bf16 --activation-checkpointing
    --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM" --seq-len "$SEQ_LEN"
    --max-steps "$MAX_STEPS" --warmup-steps "$WARMUP_STEPS"
    --data "$DATA" --output-dir "$OUTPUT_DIR" --device "$DEVICE")
if [[ "$DATA" == */* ]]; then
    TRAIN_ARGS+=(--data-config "$DATA_CONFIG")
fi
if [[ -n "$TOKENIZER" ]]; then
    TRAIN_ARGS+=(--tokenizer "$TOKENIZER")
fi

echo "== gnlorp-train ${TRAIN_ARGS[*]} $* =="
exec gnlorp-train "${TRAIN_ARGS[@]}" "$@"
