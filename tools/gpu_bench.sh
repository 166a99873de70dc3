#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one go, on one H100/H200 (~8 minutes; jax with CUDA installed).
#
#     bash tools/gpu_bench.sh            # JSON to $OUT/gpu_bench (or ./gpu_bench_out), log to stdout
#
# DINOv2 ViT-B/14, bfloat16, random weights, synthetic data already on the device, full
# pyramid (1..256 px), crops to 224 px. One process per row, so that each row's
# peak_bytes_in_use is its own; each row has a time limit so that one failure (out of memory,
# a hang) does not use up the budget. Rows in order of importance.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_bench_out}/gpu_bench"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
py="${PYTHON:-python}"
common=(--backbone dinov2_vitb --dtype bfloat16 --ipc 1 --syn-res 256 --image-res 224
  --steps 5 --warmup 1)

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$out/gpu.txt"
"$py" -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"

row() {  # name, time limit (s), flags...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$py" tools/benchmark.py "${common[@]}" "$@" --json "$out/$name.json" \
    2>"$out/$name.err" || echo "!! $name failed (rc $?): $(tail -n 1 "$out/$name.err")"
}

row in100_online 120 --classes 100 --aug-rounds 10 --real images --chunk 200
row in1k_online 150 --classes 1000 --aug-rounds 3 --real images --chunk 200
row in100_cached 100 --classes 100 --aug-rounds 10 --real features --chunk 200
row in1k_cached 120 --classes 1000 --aug-rounds 3 --real features --chunk 200
row c10_online 60 --classes 10 --aug-rounds 10 --real images --chunk 100
echo "JSON in $out"
