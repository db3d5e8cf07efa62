#!/usr/bin/env bash
# The GPU checks, as one call on a lent device machine (its own torch/triton/transformers;
# this checkout on PYTHONPATH, the tiny LM carried in .cache/rledit):
#   bash bench/device_check.sh             CUDA kernel tests -> tile sweep of the small-rank
#                                          "outer" mode -> kernel grid with the library defaults
#                                          -> edit turn vs forward+backward on the GPU
#   bash bench/device_check.sh small-ranks CUDA kernel tests -> kernel grid at ranks 1-8, both
#                                          shapes (after a change of the small-rank rule/tiles)
#   bash bench/device_check.sh final       CUDA kernel tests -> wider tile sweep (outer and ieee,
#                                          ranks 8 and 16) -> edit turn on the GPU
#   bash bench/device_check.sh edit-turn   prefix-reuse tests (the device's transformers) -> edit turn
#                                          on the GPU, with and without prefix reuse
#   bash bench/device_check.sh memory      edit-memory tests (the device's torch/transformers) -> edit
#                                          turn on the GPU at the default (edit memory on)
# Writes under $OUT (the device tool's folder), else bench/results/device.
# Each step has its own time limit, so one failing step still leaves the others' numbers.
set -u
MODE=${1:-full}
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT/sweep"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 RLEDIT_CACHE=$PWD/.cache/rledit
exec > >(tee "$OUT/device_log_$MODE.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
step() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; local t0=$SECONDS
         timeout "$limit" "$@"; echo "== rc $? after $((SECONDS - t0)) s"; }
if [ "$MODE" = memory ]; then     # the edit memory on the device's torch/transformers, GPU edit turn
    step 200 python3 -m pytest -q -p no:cacheprovider tests/test_memory.py tests/test_core.py \
        -k "memory or meta_gradient or round_trip or rollback"
    step 240 python3 bench/bench_edit_turn.py --device cuda --threads 1 --whitening on --repeats 15 \
        --repeats-embedded 31 --warmup 3 --out-dir "$OUT" --name edit_turn_cuda_memory
    exit 0
fi
if [ "$MODE" = edit-turn ]; then
    step 150 python3 -m pytest -q -p no:cacheprovider tests/test_prefix.py tests/test_whitening.py \
        tests/test_memory.py
    step 240 python3 bench/bench_edit_turn.py --device cuda --threads 1 --whitening on --repeats 15 \
        --repeats-embedded 31 --warmup 3 --out-dir "$OUT" --name "${NAME:-edit_turn_cuda_prefix}"
    exit 0
fi
step 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda or default_modes"
if [ "$MODE" = final ]; then   # end of a session: wider tile sweep at ranks 8-16, GPU edit turn
    step 100 python3 bench/bench_kernels.py --device cuda --sweep --sweep-modes outer,ieee --sweep-ranks 8,16 \
        --sweep-tiles 64x128x4x3,128x64x4x4,256x32x4x4,32x256x4x4,128x128x4x4,64x256x4x3,256x64x4x4,128x64x8x4,64x64x2x4,128x32x4x4,32x128x4x4 \
        --sweep-budget-s 80 --skip-grid --survival-updates 0 --out-dir "$OUT/sweep"
    step 130 python3 bench/bench_edit_turn.py --device cuda --threads 1 --whitening on --repeats 15 \
        --repeats-embedded 31 --warmup 3 --out-dir "$OUT" --name edit_turn_cuda_2rounds
    exit 0
fi
if [ "$MODE" = small-ranks ]; then
    step 150 python3 bench/bench_kernels.py --device cuda --shapes 4096x14336,14336x4096 --dtypes bf16,fp32 \
        --ranks 1,2,4,8 --budget-s 100 --survival-updates 0 --out-dir "$OUT"
    exit 0
fi
step 60 python3 bench/bench_kernels.py --device cuda --sweep --sweep-modes outer --sweep-budget-s 40 \
    --skip-grid --survival-updates 0 --out-dir "$OUT/sweep"
step 170 python3 bench/bench_kernels.py --device cuda --shapes 4096x14336 --dtypes bf16,fp32 \
    --ranks 1,4,8,16,64,256,1024 --budget-s 110 --survival-updates 500 --out-dir "$OUT"
step 130 python3 bench/bench_edit_turn.py --device cuda --threads 1 --whitening on --repeats 15 \
    --repeats-embedded 31 --warmup 3 --out-dir "$OUT" --name edit_turn_cuda_2rounds
