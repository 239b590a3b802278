#!/usr/bin/env bash
# The ONE command for the lent GPU machine (no network there), from the repository root, with the
# wheels of `make gpu-bundle` carried:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=...)
#   bash benchmarks/gpu_check.sh [--dry-run] [OUTDIR] [-- extra args for gpu_check.py]
#
# It installs .whl/*.whl into SITE with `pip install --no-index --no-deps --target` (the image's
# torch, transformers, ... are used as they are; gpu_bundle.py resolved the wheels against them),
# checks the installed wheels' requirements, puts SITE and the repository on PYTHONPATH (no
# editable install there) and runs `python -m benchmarks.gpu_check --out-dir DIR`. DIR is $OUT when set
# (what comes back from the device tool), else OUTDIR, else benchmarks/results/gpu_check. The
# install log and the check's output are also written to DIR/gpu_check.log.
#
# Environment: PYTHON (default python3), SITE (default /tmp/gnlorp-site), GPU_CHECK_SECONDS
# (default 480: the whole command; the sections get `--budget` = what the install left of it).
# Exit status: gpu_check.py's; 2 for bad arguments or a missing bundle.
set -uo pipefail

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/gnlorp-site}"
GPU_CHECK_SECONDS="${GPU_CHECK_SECONDS:-480}"
SECONDS=0
DRY=()
OUTDIR=""
EXTRA=()
while (($#)); do
    case "$1" in
        --dry-run) DRY=(--dry-run) ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) echo "gpu_check.sh: unknown option '$1' (options of gpu_check.py go after --)" >&2
            exit 2 ;;
        *) if [[ -n "$OUTDIR" ]]; then
               echo "gpu_check.sh: two output folders given: '$OUTDIR' and '$1'" >&2
               exit 2
           fi
           OUTDIR="$1" ;;
    esac
    shift
done
DIR="${OUT:-${OUTDIR:-benchmarks/results/gpu_check}}"
mkdir -p "$DIR" || { echo "gpu_check.sh: cannot create the output folder '$DIR'" >&2; exit 2; }
LOG="$DIR/gpu_check.log"

main() {
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "gpu_check.sh: error: no wheels in $REPO/.whl: this machine has no network, so" \
            "deepspeed, bitsandbytes, datasets, galore-torch ... travel as wheels. Run" \
            "\`make gpu-bundle\` on the development machine and carry the folder:" \
            "run(command=\"bash benchmarks/gpu_check.sh\", carry=[\".whl\"])" >&2
        return 2
    fi
    echo "gpu_check.sh: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"); ${#wheels[@]}" \
        "wheels -> $SITE; output -> $DIR"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" || {
        echo "gpu_check.sh: error: pip could not install .whl/*.whl into $SITE (see above);" \
            "rebuild the bundle with \`make gpu-bundle\` (one version of each wheel)" >&2
        return 2
    }
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
    export PYTHONUNBUFFERED=1
    # A requirement the image does not meet is reported now, not as a section's import error.
    "$PYTHON" -m benchmarks.gpu_bundle --verify-site "$SITE" ||
        echo "gpu_check.sh: warning: the image misses what the wheels above need; going on"
    # The sections get what is left of GPU_CHECK_SECONDS after the install, unless the extra
    # arguments set --budget themselves.
    local budget=() left=$((GPU_CHECK_SECONDS - SECONDS))
    if [[ " ${EXTRA[*]-} " != *" --budget"* ]]; then
        if ((left < 60)); then
            echo "gpu_check.sh: error: ${left} s of GPU_CHECK_SECONDS=$GPU_CHECK_SECONDS left" \
                "after the install; raise GPU_CHECK_SECONDS (the device runs a command 600 s)" >&2
            return 2
        fi
        budget=(--budget "$left")
    fi
    "$PYTHON" -m benchmarks.gpu_check --out-dir "$DIR" ${budget[@]+"${budget[@]}"} \
        ${DRY[@]+"${DRY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
