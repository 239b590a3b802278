#!/usr/bin/env bash
# The paper's multi-node LLaMA 7B pre-training: 8 nodes x 4 A100 = 32 processes, 8-bit
# GradNormLoRP (rank 1024, T 500, alpha 0.25, lr 0.005, clip 1.0), bf16, DeepSpeed ZeRO-2, C4,
# global batch 512 x 256 tokens. Run it on ONE node (normally node01); the `deepspeed` launcher
# ssh-es (pdsh) into every host of HOSTFILE and starts GPUS_PER_NODE processes on each.
#
# Why ZeRO-2: GradNormLoRP's low-rank moments are already small (rank 1024 of 4096, 8-bit), so
# what dominates per GPU besides the bf16 weights are the fp32 master weights (4 bytes/param) and
# the gradients. ZeRO-2 shards both over the 32 ranks; ZeRO-3 would also shard the 13.5 GB of
# bf16 weights at the price of an all-gather of every layer in every forward and backward.
#
# Needs: the repository and the virtual environment at the SAME path on every node (shared
# file system), passwordless ssh from this node to every host, `pdsh` on this node, and the
# network settings below. See launch/README.md ("Multi-node") for .deepspeed_env and NCCL.
#
#   cp launch/hostfile.example launch/hostfile   # then edit the host names
#   NCCL_SOCKET_IFNAME=<iface> MASTER_ADDR=<node01's address> TOKENIZER=/path/to/llama-tokenizer \
#     bash launch/deepspeed_multinode.sh
#   NUM_NODES=2 bash launch/deepspeed_multinode.sh --eval-every 1000   # extra args: gnlorp-train
#   # no ssh (a scheduler starts this script on every node): NO_SSH=1 NODE_RANK=<0..7>
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"   # pdsh runs `cd <this directory>` on every node; .deepspeed_env is read from here

HOSTFILE=${HOSTFILE:-launch/hostfile}   # "<host> slots=<gpus>" lines (launch/hostfile.example)
NUM_NODES=${NUM_NODES:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
WORLD_SIZE=$((NUM_NODES * GPUS_PER_NODE))
MASTER_ADDR=${MASTER_ADDR-}         # node01's address on the training network; empty: DeepSpeed
                                    # takes the first address of `ssh <first host> hostname -I`
MASTER_PORT=${MASTER_PORT:-29500}
NO_SSH=${NO_SSH:-0}                 # 1: start only this node's processes, as node NODE_RANK
NODE_RANK=${NODE_RANK:-0}           #    (run the script on every node; MASTER_ADDR required)
CONFIG=${CONFIG:-zero2_bf16.json}   # a file in ds_configs/, or a path
MODEL=${MODEL:-llama_7b}
PROJ_RANK=${PROJ_RANK:-1024}        # projection rank (not RANK: launchers set RANK per process)
UPDATE_PROJ_GAP=${UPDATE_PROJ_GAP:-500}
SCALE=${SCALE:-0.25}
LR=${LR:-0.005}
GRAD_CLIP=${GRAD_CLIP:-1.0}         # global norm, computed by DeepSpeed over all shards
BITS=${BITS:-8}
DTYPE=${DTYPE:-bf16}                # must agree with the config's bf16.enabled
BATCH_SIZE=${BATCH_SIZE:-16}        # sequences per micro-batch per GPU
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
GRAD_ACCUM=${GRAD_ACCUM:-$((GLOBAL_BATCH / (BATCH_SIZE * WORLD_SIZE)))}
SEQ_LEN=${SEQ_LEN:-256}
MAX_STEPS=${MAX_STEPS:-80000}       # the paper's Table 3 (7B, 8-bit): 80K steps
WARMUP_STEPS=${WARMUP_STEPS:-8000}  # 10%
ACTIVATION_CHECKPOINTING=${ACTIVATION_CHECKPOINTING:-1}  # 16 x 256 tokens of 7B activations
DATA=${DATA:-allenai/c4}
DATA_CONFIG=${DATA_CONFIG:-en}
TOKENIZER=${TOKENIZER-}             # a LLaMA tokenizer folder (same path on every node)
OUTPUT_DIR=${OUTPUT_DIR:-runs/llama_7b-gradnormlorp-8bit-zero2}   # shared: checkpoints, resume
SAVE_EVERY=${SAVE_EVERY:-1000}

# NCCL (https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html). The launcher copies
# every NCCL_* variable of THIS shell to all nodes. Interface and HCA names differ per cluster:
# nothing is guessed here; unset means NCCL picks by itself.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}   # WARN: NCCL explains an error before returning it
# export NCCL_SOCKET_IFNAME=<iface>     # IP interface(s) for bootstrap and socket traffic
# export NCCL_IB_HCA=<hca>[:<port>]     # which InfiniBand/RoCE adapters (and ports) to use
# export NCCL_IB_DISABLE=1              # only if there is no working IB/RoCE: use IP sockets
# export NCCL_NET_GDR_LEVEL=<LOC|PIX|PXB|PHB|SYS>   # GPU Direct RDMA up to this GPU-NIC distance

if [[ ! -f "$HOSTFILE" ]]; then
    echo "no hostfile $HOSTFILE: cp launch/hostfile.example $HOSTFILE and edit the hosts" >&2
    exit 1
fi
if [[ "$NO_SSH" == "1" && -z "$MASTER_ADDR" ]]; then
    echo "NO_SSH=1 needs MASTER_ADDR (node 0's address): it cannot be asked over ssh" >&2
    exit 1
fi
if [[ -f "$CONFIG" ]]; then DS_CONFIG=$CONFIG; else DS_CONFIG=$REPO/ds_configs/$CONFIG; fi
if [[ ! -f "$DS_CONFIG" ]]; then
    echo "no DeepSpeed config $DS_CONFIG; pick one of: $(ls "$REPO/ds_configs" | grep json)" >&2
    exit 1
fi
if (( GRAD_ACCUM < 1 || BATCH_SIZE * GRAD_ACCUM * WORLD_SIZE != GLOBAL_BATCH )); then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not BATCH_SIZE=$BATCH_SIZE x $WORLD_SIZE processes x" \
        "GRAD_ACCUM=$GRAD_ACCUM; change one of them" >&2
    exit 1
fi
if [[ -z "${NCCL_SOCKET_IFNAME-}" ]]; then
    echo "note: NCCL_SOCKET_IFNAME is not set; NCCL picks an interface itself (set it if the" \
        "nodes have several networks)" >&2
fi
if [[ ! -f .deepspeed_env && ! -f "$HOME/.deepspeed_env" ]]; then
    echo "note: no .deepspeed_env here or in ~: only NCCL_*, PYTHON*, UCX*, MV2*, MLFLOW* reach" \
        "the other nodes (put OMP_NUM_THREADS, HF_HOME, ... there as KEY=VALUE lines)" >&2
fi

TRAIN_ARGS=(--deepspeed "$DS_CONFIG" --world-size "$WORLD_SIZE"
    --model "$MODEL" --optimizer gradnormlorp --bits "$BITS" --dtype "$DTYPE"
    --rank "$PROJ_RANK" --update-proj-gap "$UPDATE_PROJ_GAP" --scale "$SCALE" --lr "$LR"
    --grad-clip "$GRAD_CLIP" --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM"
    --seq-len "$SEQ_LEN" --max-steps "$MAX_STEPS" --warmup-steps "$WARMUP_STEPS"
    --data "$DATA" --output-dir "$OUTPUT_DIR" --save-every "$SAVE_EVERY")
if [[ "$ACTIVATION_CHECKPOINTING" == "1" ]]; then
    TRAIN_ARGS+=(--activation-checkpointing)
fi
if [[ "$DATA" == */* ]]; then
    TRAIN_ARGS+=(--data-config "$DATA_CONFIG")
fi
if [[ -n "$TOKENIZER" ]]; then
    TRAIN_ARGS+=(--tokenizer "$TOKENIZER")
fi

LAUNCH=(deepspeed --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE"
    --master_port "$MASTER_PORT" --no_local_rank)
if [[ -n "$MASTER_ADDR" ]]; then
    LAUNCH+=(--master_addr "$MASTER_ADDR")
fi
if [[ "$NO_SSH" == "1" ]]; then
    LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
fi
LAUNCH+=(--hostfile "$HOSTFILE" --module gnlorp_dist.train)
echo "== ${LAUNCH[*]} ${TRAIN_ARGS[*]} $* =="
exec "${LAUNCH[@]}" "${TRAIN_ARGS[@]}" "$@"
