#!/usr/bin/env bash
# One command for this project's GPU questions; writes one JSON (see bench/gpu_check.py for the items).
#
#   bash bench/gpu_check.sh [--device cuda|cpu] [--out FILE] [--budget-s S] [--items a,b,...]
#
# Default device: cuda when torch sees a GPU, else cpu (a tiny model: tests the script, not speed).
# Default output: bench/results/gpu/<device name>-<YYYYMMDD-HHMM>.json; its path is printed at the end.
# The Python script keeps to its time budget (450 s on CUDA); a hard `timeout` of budget + 30 s backs it up.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
export GPU_CHECK_COMMAND="bash $0${*:+ $*}"
device=""
budget=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --device=*) device="${1#*=}"; shift ;;
        --budget-s) budget="${2:?--budget-s needs seconds}"; args+=("$1" "$2"); shift 2 ;;
        --budget-s=*) budget="${1#*=}"; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -z "$device" ]; then
    if [ "$("$py" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" = "True" ]; then
        device=cuda
    else
        device=cpu
    fi
fi
case "$device" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac
if [ -z "$budget" ]; then
    if [ "$device" = cuda ]; then budget=450; else budget=240; fi
fi
limit=$(( ${budget%.*} + 30 ))
cmd=("$py" "$here/gpu_check.py" --device "$device" ${args[@]+"${args[@]}"})
if command -v timeout >/dev/null 2>&1; then
    exec timeout -k 10 "$limit" "${cmd[@]}"
else
    exec "${cmd[@]}"
fi
