#!/usr/bin/env bash
# The GPU checks of views made on the accelerator, ready for the lent H200 machine (JAX, 16 cores, no TensorFlow).
# Here, first:
#   ../shared/tools/device-wheels                                  # .whl/: keras, keras-hub and this project
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >> .git/info/exclude
# On the device (carry .whl and .data), one group per call, each well inside one call's 10 minutes:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax && bash bench/gpu_fit.sh fit
# Groups:
#   fit      fit images/s at the goal configuration (ResNet-50, 2x224 + 6x96, K 65536, batch 256, bf16): views made
#            in the step, JPEGs decoded by Pillow in 16 threads, beside the input alone, the step with the views
#            in it and the plain step (goal: fit >= 0.9 x plain step). `fit --processes`: worker processes.
#   fashion  Fashion-MNIST, ResNet-18, views on the device, 100 epochs (goal: k-NN >= 90 %), with its wall time.
#   tables   the remaining GPU rows of docs/benchmarks.md (bench/gpu_tables.sh, group 6: float32, float16,
#            batches 64 and 128, Keras' PyTorch backend).
# Records go to ${RESULTS:-bench/results}/<benchmark>.jsonl and the printed output to ${OUT:-bench-results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$OUT" "$RESULTS"
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
case "${1:-fit}" in
  fit)
    GOAL="--backbone resnet50 --global-size 224 --local-size 96 --local-crops 6 --k 65536 --batch 256"
    GOAL="$GOAL --precision bfloat16 --steps 20 --warmup 3 --num-images 6144 --jpeg-dir /tmp/jpegs"
    timeout 540 python3 -m bench.fit_pipeline --augment device --loader pillow --workers 16 ${2:-} $GOAL \
      --results-dir "$RESULTS" 2>&1 | grep -v '^[WI]0' | tee -a "$OUT/fit.txt"
    ;;
  fashion)
    start=$(date +%s)
    python3 -m training.pretrain --preset fashion_mnist_resnet18 --augment device --epochs 100 --knn-every 0 \
      --data-dir .data/fashion-mnist --export false --output-dir /tmp/fashion 2>&1 | grep -v '━' \
      | tee "$OUT/fashion.txt"
    echo "wall time: $(($(date +%s) - start)) s" | tee -a "$OUT/fashion.txt"
    cp /tmp/fashion/summary.json /tmp/fashion/training_log.csv "$OUT/" 2>/dev/null
    ;;
  tables)
    python3 -m bench.train_step --suite gpu --backends jax,torch --batches 64,128 --results-dir "$RESULTS" \
      --out "$OUT/step.jsonl" 2>&1 | tee "$OUT/step4.txt"
    python3 -m bench.train_step --suite gpu --backends jax --batches 256 --implementations reference,jax \
      --local-crops-list 6 --precisions float32,float16 --steps 50 --warmup 5 --timeout 300 --results-dir "$RESULTS" \
      --out "$OUT/step.jsonl" 2>&1 | tee "$OUT/step3.txt"
    ;;
  *) echo "usage: bash bench/gpu_fit.sh fit|fashion|tables" >&2; exit 2 ;;
esac
