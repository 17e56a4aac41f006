#!/bin/bash
# The fused VAE path on one GPU machine in one call: the fused-VAE kernels (bench_vae_kernels.py: correctness, GB/s per kernel,
# tile sweep, sub-pixel and attention A/B, whole encode/decode), then bench_engine.py with the diffusers baseline,
# eager, the fast-path A/B variants of compile+graph (the first one is the shipped default), the kernel profile and
# the processing_res rows. Usage on the device machine, diffusers 0.42.1 + importlib_metadata wheels in $WHL:
#   LIMIT=470 bash benchmarks/run_gpu_fused_vae.sh   (env: WHL, KLIM, KSTEPS, SWEEP, VARIANTS, EXTRA_RES, ITERS, NAME)
# Call 1 (2026-12-01) ran the defaults; call 2: KSTEPS=launches SWEEP= VARIANTS=fused EXTRA_RES=384 NAME=..._final
# Results (5 files) in $OUT; what finished before a limit is kept (both scripts write their JSON step by step).
set -u
T0=$(date +%s); LIMIT=${LIMIT:-470}; WHL=${WHL:-.whl}; OUTD=${OUT:-/tmp/out}; KLIM=${KLIM:-110}
VARIANTS=${VARIANTS:-"fused;sdpa:vae_attention=sdpa;nosubpixel:subpixel=0;nobatch:batch_decode=0;serial:batch_decode=0,concurrent_unets=0;inductor:fused_vae=0,batch_decode=0,concurrent_unets=0"}
el() { echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 HOME=/tmp TORCHINDUCTOR_CACHE_DIR=/tmp/inductor HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $WHL/diffusers-*.whl \
  $WHL/importlib_metadata-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" || exit 1
timeout "$KLIM" python3 benchmarks/bench_vae_kernels.py ${SWEEP---sweep} --config-out "$OUTD/kernel_config.json" \
  --steps "${KSTEPS:-correctness,launches,ab,whole_vae}" --out "$OUTD/vae_kernels_h200${NAME:-}.json" \
  > "$OUTD/vae_kernels.log" 2>&1
grep -v "^20..-..-.. \|kept in float32" "$OUTD/vae_kernels.log" | tail -30
echo "kernels done at $(el) s"
REM=$(( LIMIT - $(el) - 5 ))
timeout "$REM" python3 benchmarks/bench_engine.py --dtypes fp16 --modes none,compile+graph --tasks depth,depth+normals \
  --iters "${ITERS:-30}" --warmup 5 --ref-frames 2 --kernel-config "$OUTD/kernel_config.json" --fast-paths "$VARIANTS" \
  --extra-res "${EXTRA_RES:-512,384}" --real-images real/* --profile --out "$OUTD/engine_h200_fp16_fused_vae${NAME:-}.json" \
  > "$OUTD/engine.log" 2>&1
grep "bench_engine INFO\|rror" "$OUTD/engine.log" | cut -c 25-400 | tail -45
echo "engine done at $(el) s"
