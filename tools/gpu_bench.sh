#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one go, on one H100/H200 (at most ~9 minutes).
#
#     bash tools/gpu_bench.sh     # results in $OUT (or ./gpu_bench_out), log to stdout
#
# What comes back (the device returns at most 8 files from $OUT): gpu_bench.tgz (every row's
# JSON and stderr, the lowered rows in smoke mode, the data and golden checks, each profiled
# row's step HLO; rewritten after every row, so a run cut short still returns what it finished)
# and trace_<row>.json.gz, the perfetto trace of each profiled row (open in ui.perfetto.dev, or
# `python -m lgm_jax.profiling`), where it is under 15 MiB.
#
# Needs jax with CUDA, flax and optax (the device image's python3 has them; lgm_jax is used from
# this checkout through PYTHONPATH, nothing is installed). DINOv2 ViT-B/14, bfloat16, random
# weights, synthetic data already on the device, full pyramid (1..256 px), crops to 224 px.
# One process per row, so that each row's peak_bytes_in_use is its own; each row has a time
# limit so that one failure (out of memory, a hang) does not use up the budget. Rows in order of
# importance; a summary table is printed last.
#
# GOLDEN=path/to/golden/lgm_step also runs the golden check (python -m lgm_jax.golden) on the
# GPU first. The golden arrays live outside the checkout (../shared/golden, 36 MB); to take them
# to a device machine, copy them into an ignored folder of the checkout (e.g. .golden/) and carry
# that path.
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-$PWD/gpu_bench_out}"
out="${GPU_BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$out" "$dest"
pack() {  # everything but the traces into one file; each trace on its own if small enough
  tar czf "$dest/gpu_bench.tgz.part" -C "$out" --exclude=./traces . && mv "$dest/gpu_bench.tgz.part" "$dest/gpu_bench.tgz"
  local t row
  for t in "$out"/traces/*/plugins/profile/*/perfetto_trace.json.gz; do
    [ -f "$t" ] || continue
    row=${t#"$out"/traces/}; row=${row%%/*}
    if [ "$(stat -c %s "$t")" -lt $((15 * 1024 * 1024)) ]; then cp "$t" "$dest/trace_$row.json.gz"; fi
  done
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
py="${PYTHON:-python3}"
common=(--backbone dinov2_vitb --dtype bfloat16 --ipc 1 --syn-res 256 --input-res 224
  --steps 5 --warmup 1)
# GPU_BENCH_SMOKE=1: the same script on a CPU with the tiny backbone, 10x fewer classes and XLA
# attention, to check the script itself before spending device time on it; each row is also
# traced and lowered for CUDA at its full size with its own flags (lgm_jax.benchmark --lower cuda).
smoke="${GPU_BENCH_SMOKE:-0}"
full=("${common[@]}")
if [ "$smoke" = 1 ]; then
  mkdir -p "$out/lowered"
  common=(--backbone dinov2_tiny --dtype float32 --ipc 1 --syn-res 32 --input-res 28 --steps 1 --warmup 1)
fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$out/gpu.txt"
"$py" -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" \
  | tee -a "$out/gpu.txt"

if [ -n "${GOLDEN:-}" ]; then
  echo "== golden check on the GPU"
  timeout 120 "$py" -m lgm_jax.golden --golden "$GOLDEN" >"$out/golden.txt" 2>&1
  echo "golden rc $?: $(tail -n 1 "$out/golden.txt")"
fi

echo "== host data pipeline (JPEG read/decode/resize/crop), images/s by decoding threads"
timeout 60 "$py" -m lgm_jax.data_bench --threads 1 4 8 16 --images $((smoke ? 40 : 300)) \
  --batch $((smoke ? 10 : 100)) 2>&1 | tee "$out/data_bench.txt" | tail -n 5

# The device runs one command for at most 10 minutes: rows stop being started when less than
# 30 s of this budget (counted from the script's start) is left, and a row's limit never runs
# past it.
budget="${GPU_BENCH_BUDGET:-540}"
row() {  # name, time limit (s), flags... ("profile" as the first flag: trace 2 more steps)
  local name=$1 limit=$2
  shift 2
  local prof=()
  if [ "${1:-}" = profile ]; then
    prof=(--profile "$out/traces/$name")
    shift
  fi
  local left=$((budget - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "!! $name skipped: the time budget (${budget} s) is spent"
    return
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$smoke" = 1 ]; then  # fewer classes, XLA attention, no chunk or remat-policy change
    # First the row as the GPU will run it (ViT-B/14, cuDNN attention), lowered for CUDA only.
    echo "== $name lowered for cuda: $*"
    "$py" -m lgm_jax.benchmark "${full[@]}" "$@" --lower cuda --json "$out/lowered/$name.json" \
      2>"$out/lowered/$name.err" | sed -n 2,3p \
      || echo "!! $name does not lower for cuda: $(tail -n 1 "$out/lowered/$name.err")"
    local args=() prev=""
    for a in "$@"; do
      if [ "$prev" = --classes ]; then a=$((a / 10)); fi
      if [ "$a" = cudnn ]; then a=xla; fi
      args+=("$a")
      prev=$a
    done
    set -- "${args[@]}"
  fi
  echo "== $name: $*"
  local rc=0
  timeout "$limit" "$py" -m lgm_jax.benchmark "${common[@]}" "$@" "${prof[@]}" \
    --json "$out/$name.json" 2>"$out/$name.err" || rc=$?
  if [ -n "${prof[*]}" ] && [ -f "$out/traces/$name/step.hlo.txt.gz" ]; then
    cp "$out/traces/$name/step.hlo.txt.gz" "$out/$name.hlo.txt.gz"
  fi
  pack
  if [ "$rc" = 0 ]; then return; fi
  echo "!! $name failed (rc $rc): $(tail -n 1 "$out/$name.err")"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then  # the time limit; timings written before a
    return                                      # profile that ran out of time are kept
  fi
  # A failure of cuDNN's fused attention (not out of memory, not the time limit): the same row
  # with XLA's attention, so that the setting still gets a figure.
  if [[ " $* " == *" cudnn "* ]] && grep -qiE "cudnn|fmha|dot_product_attention" "$out/$name.err" \
    && ! grep -qiE "out of memory|RESOURCE_EXHAUSTED" "$out/$name.err"; then
    local args=()
    for a in "$@"; do [ "$a" = cudnn ] && a=xla; args+=("$a"); done
    if [ -n "${prof[*]}" ]; then args=(profile "${args[@]}"); fi
    row "${name}_xla_fallback" "$limit" "${args[@]}"
  fi
}

# ImageNet-100 (C = 100, K = 10: 1000 synthetic rows + 1000 real images), fused attention.
row in100_cached 110 profile --classes 100 --aug-rounds 10 --real-input features --chunk-size 200 --attention cudnn
row in100_online 120 profile --classes 100 --aug-rounds 10 --real-input images --chunk-size 200 --attention cudnn
# ImageNet-1k (C = 1000, K = 3: 3000 + 3000).
row in1k_online 160 profile --classes 1000 --aug-rounds 3 --real-input images --chunk-size 200 --attention cudnn
# One chunk: the forward pass is kept for the backward one (2 forwards per synthetic row instead
# of 3). Kept per row (lgm_jax.benchmark --lower): 36.5 MiB with remat "matmuls" (q/k/v and
# MLP-hidden projections kept; norms, attention and activations recomputed, ~2.05 forwards;
# 35.7 GiB for 1000 rows), 50.2 MiB without remat (49 GiB: above the 40 GiB target, the
# fewest FLOPs), 4.9 MiB with "block" (3 forwards).
row in100_cached_whole_matmuls 110 profile --classes 100 --aug-rounds 10 --real-input features --remat --remat-policy matmuls --attention cudnn
row in100_online_whole_matmuls 110 --classes 100 --aug-rounds 10 --real-input images --remat --remat-policy matmuls --attention cudnn
row in100_cached_whole 100 --classes 100 --aug-rounds 10 --real-input features --attention cudnn
# What the fused kernel buys.
row in100_online_xla 110 --classes 100 --aug-rounds 10 --real-input images --chunk-size 200
# The reference's smallest setting (10 classes, K = 10), one chunk: 2 forwards per synthetic row.
row c10_online 60 --classes 10 --aug-rounds 10 --real-input images --attention cudnn
row in100_cached_whole_block 100 --classes 100 --aug-rounds 10 --real-input features --remat --attention cudnn

"$py" - "$out" <<'EOF'
import glob, json, os, sys
from lgm_jax import profiling
paths = sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))
for path in paths:  # where the time went, for the profiled rows
    r = json.load(open(path))
    if r.get("profile"):
        print(f"== profile of {os.path.basename(path)[:-5]}")
        if "error" in r["profile"]:
            print(f"  failed: {r['profile']['error']}")
        else:
            profiling.print_summary(r["profile"], top=8)
print(f"{'row':28s} {'median s':>9s} {'p10':>7s} {'p90':>7s} {'TFLOP/s':>8s} {'peak':>6s} {'GiB':>7s} {'compile':>8s}")
for path in paths:
    r = json.load(open(path))
    frac = r.get("peak_fraction")
    print(f"{os.path.basename(path)[:-5]:28s} {r['step_s_median']:9.4f} {r['step_s_p10']:7.4f} "
          f"{r['step_s_p90']:7.4f} {r['tflops']:8.1f} {(frac or 0) * 100:5.1f}% "
          f"{(r['peak_mem_bytes'] or 0) / 2**30:7.2f} {r['compile_s']:7.1f}s")
EOF
pack
echo "results in $dest: gpu_bench.tgz ($(du -h "$dest/gpu_bench.tgz" | cut -f1)), $(ls "$dest" | grep -c '^trace_') traces; everything, every trace too, in $out"
