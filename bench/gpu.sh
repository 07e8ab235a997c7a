#!/usr/bin/env bash
# Every GPU benchmark of the project, on one CUDA GPU, in under 8 minutes (see
# src/slidetrain/bench/gpu.py for the sections). The GPU machine has PyTorch but neither
# Snakemake nor OpenSlide: wheels carried in .whl/ (if any) are installed to /tmp/site first.
#   bash bench/gpu.sh OUT_DIR            # on the GPU machine
#   bash bench/gpu.sh OUT_DIR --tiny     # CPU rehearsal at toy sizes (tests/test_gpu_script.py)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu.sh OUT_DIR [--tiny]}"
shift
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 470 python3 -m slidetrain.bench.gpu --out "$out" "$@"
