#!/usr/bin/env bash
# The GPU tables of docs/benchmarks.md, in the order they were measured (most important first), each benchmark in
# fresh processes. Needs one NVIDIA GPU with JAX (CUDA) and PyTorch (+ torchvision) installed, and keras, keras-hub
# and this project (pip install -e ".[bench]" with CUDA builds of jax and torch, or wheels on PYTHONPATH).
# Every benchmark appends its records to ${RESULTS:-bench/results}/<benchmark>.jsonl (python -m bench.report turns
# them into docs/benchmarks.md); the printed tables and raw rows go to ${OUT:-bench-results}/. Each group stops
# starting new runs after its deadline (seconds from the start of this script), so a shorter budget still returns
# the first rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$OUT" "$RESULTS"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
T0=$(date +%s)
left() { echo $(($1 - $(date +%s) + T0)); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
R="--results-dir $RESULTS"
B="python3 -m bench.train_step --suite gpu --backends jax,torch --batches 256 --steps 50 --warmup 5 $R"
B="$B --out $OUT/step.jsonl"
# 1. The goal configuration: ResNet-50, 2x224 + 6x96, K 65536, batch 256, bf16.
$B --implementations reference,jax,reference+compile,torch --local-crops-list 6 --precisions bfloat16 \
  --deadline "$(left 330)" --timeout 240 2>&1 | tee "$OUT/step1.txt"
# 2. Global crops only.
$B --implementations reference,jax,reference+compile --local-crops-list 0 --precisions bfloat16 \
  --deadline "$(left 600)" --timeout 240 2>&1 | tee "$OUT/step2.txt"
# 3. Where the JAX step's time goes (kernels by category, forward / backward split) and the one-pass batch-norm
#    statistics against Keras' two-pass ones, in one process.
timeout 300 python3 -m bench.profile_step --variants library,keras_moments --breakdown $R --out "$OUT/profile.jsonl" \
  2>&1 | grep -v '^[WI]0' | tee "$OUT/profile.txt"
# 4. The loss alone: the library's per-crop formulation against the fused one that was tried.
for crops in 8 2; do
  python3 -m bench.loss_formulations --batch 256 --crops $crops --k 65536 --dtype bfloat16 --steps 20 $R
done 2>&1 | grep -v '^[WI]0' | tee "$OUT/loss.txt"
# 5. How the partition + loss grows with K, N_B, local crops and batch.
python3 -m bench.cost_growth --suite gpu --loss-only $R 2>&1 | grep -v '^[WI]0' | tee "$OUT/cost.txt"
# 6. float32 (TF32 tensor cores), then the rest of the grid (batch 64/128, float16).
$B --implementations reference,jax --local-crops-list 6 --precisions float32 --timeout 300 2>&1 | tee "$OUT/step3.txt"
python3 -m bench.train_step --suite gpu --backends jax,torch --batches 64,128 $R --out "$OUT/step.jsonl" 2>&1 \
  | tee "$OUT/step4.txt"
