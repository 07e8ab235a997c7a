#!/usr/bin/env bash
# Every GPU benchmark of the project, on one CUDA GPU, in about 6 minutes (docs/gpu.md is the
# procedure; src/slidetrain/bench/gpu.py the sections). The GPU machine has PyTorch but neither
# Snakemake nor OpenSlide: wheels carried in .whl/ (if any) are installed to /tmp/site first.
#   bash bench/gpu.sh OUT_DIR                          # on the GPU machine
#   bash bench/gpu.sh OUT_DIR --only distributed_equivalence   # one section again (same cap as in the full run)
#   bash bench/gpu.sh OUT_DIR --tiny                   # CPU rehearsal at toy sizes (tests/test_gpu_script.py)
# OUT_DIR gets summary.json, one CSV per section and log.txt (this output): at most 8 files.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu.sh OUT_DIR [--tiny] [--only SECTION...] [--budget-s S]}"
shift

# The sections' caps add up to the budget (gpu.py's defaults: 300 s, --tiny 1800 s). The outer
# limit adds the preflight's cap (30 s), imports and each section's unwinding: it only fires if a
# section hangs inside one C call, where its own cap cannot reach it.
budget_s=300
prev=""
for arg in "$@"; do
    case "$arg" in
        --tiny) budget_s=1800 ;;
    esac
done
for arg in "$@"; do
    if [[ "$prev" == "--budget-s" ]]; then budget_s="$arg"; fi
    case "$arg" in --budget-s=*) budget_s="${arg#*=}" ;; esac
    prev="$arg"
done
limit_s=$(( ${budget_s%.*} + 90 ))

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
set -o pipefail
timeout --kill-after=10 "$limit_s" python3 -m slidetrain.bench.gpu --out "$out" --budget-s "$budget_s" "$@" 2>&1 \
    | tee "$out/log.txt"
