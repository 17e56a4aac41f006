#!/bin/bash
# Several GPUs of one host (2-4): the one script a multi-GPU session runs. JSON goes under $OUT.
#
#   bash benchmarks/run_gpu_multi.sh serve   # N = 2, 4, 8 cameras over 1..G nodes (one per GPU), fp16, compile
#   bash benchmarks/run_gpu_multi.sh bag     # geodiff_bag process split over 1, 2 (, 4) GPUs; output bags compared
#   bash benchmarks/run_gpu_multi.sh train   # accelerate launch of geodiff_train: 1, 2 (, 4) processes, full size
#   bash benchmarks/run_gpu_multi.sh all     # the three in turn (longer than one 10-minute device call with 4 GPUs)
#   TINY=1 bash benchmarks/run_gpu_multi.sh all   # CPU rehearsal of the same logic (cpu,cpu devices, tiny model)
#
# One part fits one device call (about 6-9 min); with 4 GPUs split serving: SERVE_CAMS="2 4" ... serve, then
# SERVE_CAMS=8 ... serve (each writes its own file). Outputs: multigpu_serving_n<cams>.json, bag_split.json,
# train_multi.json and the node logs (node_logs.tgz). G is the number of GPUs nvidia-smi lists (GPUS=N overrides).
#
# The GPU machine's python3 holds torch, accelerate and tqdm but no ROS and no diffusers: carry the ROS Jazzy cp312
# wheels, diffusers 0.42.1, importlib_metadata 8.7.0 and rosbags 0.11.9 (+ lz4, ruamel_yaml, zstd backports) in
# .whl/ (carry: [".whl"]); they go into /tmp/venv, which sees python3's own packages through a .pth (gpu_venv.sh,
# shared with run_gpu_node_multicam.sh). The venv is made once per warm machine. Shared RGB-D frames for the
# training part: shared/data/manifest.json in the checkout if present, else a synthetic set (train_multi.py).
# NVLink multicast stays off (KINDS.md): NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1.
set -u
PART=${1:-all}
TINY=${TINY:-}
T0=$(date +%s); LIMIT=${LIMIT:-$([ -n "$TINY" ] && echo 1500 || echo 570)}; WHL=${WHL:-.whl}; BASEPY=${BASEPY:-python3}; OUTD=${OUT:-/tmp/out}
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(el) - 15 )); }
enough() { [ "$(left)" -gt 60 ] || { echo "skipping $1: $(left) s left of LIMIT=$LIMIT"; return 1; }; }
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_LOCALHOST_ONLY=1 \
  FASTDDS_DEFAULT_PROFILES_FILE=$PWD/config/fastdds_localhost.xml FASTRTPS_DEFAULT_PROFILES_FILE=$PWD/config/fastdds_localhost.xml \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export ROS_LOG_DIR=${ROS_LOG_DIR:-/tmp/roslog} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}

if [ -n "$TINY" ]; then  # CPU rehearsal in this checkout's venv (scripts/setup_venv.sh)
  PY=${PY:-.venv/bin/python}; GPUS=2; GLIST="1 2"; DOM=${ROS_DOMAIN_ID:-27}
else
  export HOME=/tmp
  unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  if [ "$GPUS" -lt 2 ]; then echo "only $GPUS GPU(s) visible: this needs a machine with 2-4 GPUs"; exit 2; fi
  GLIST="1 2"; [ "$GPUS" -ge 4 ] && GLIST="1 2 4"
  DOM=80
  PY=/tmp/venv/bin/python
  if ! $PY -c "import rclpy, torch, diffusers, rosbags, accelerate, tqdm" 2>/dev/null; then
    . "$(dirname "$0")/gpu_venv.sh"
    gpu_venv || exit 1
  fi
  $PY -c "import rclpy, torch, diffusers, rosbags, accelerate, tqdm, sensor_msgs.msg; print('imports ok: torch', torch.__version__, 'cuda devices', torch.cuda.device_count(), 'accelerate', accelerate.__version__)" \
    || { echo "missing a package: carry its wheel in $WHL (see the header of this script)"; exit 1; }
fi
echo "setup done at $(el) s; GPUs: $GPUS; G list: $GLIST"
DEVSETS=""; for g in $GLIST; do DEVSETS="$DEVSETS $(seq -s, -f 'cuda:%g' 0 $((g - 1)))"; done
[ -n "$TINY" ] && DEVSETS="cpu cpu,cpu"

run_serve() {  # N cameras over G = 1 (reference), 2 (, 4) nodes; fp16, compiled; per-camera Hz, p95, GPU memory per card
  local cams=${SERVE_CAMS:-$([ -n "$TINY" ] && echo 2 || echo "2 4 8")} args
  enough serving || return
  args="--gpus $GLIST --cameras $cams --dtype fp16 --optimize ${SERVE_OPT:-compile} --seconds ${SERVE_SECONDS:-12} --warmup 4 --startup-timeout 300 --domain $DOM"
  [ -n "$TINY" ] && args="--tiny --gpus $GLIST --cameras $cams --domain $DOM --domain-step 0"
  timeout --foreground -s INT "$(left)" $PY benchmarks/bench_multigpu.py $args --out "$OUTD/multigpu_serving_n${cams// /_}.json"
  echo "serving done at $(el) s (exit $?)"
}

run_bag() {  # one bag over 1, 2 (, 4) GPUs, fp16 compile: frames/s, output bags against the one-GPU bag
  local args="--device-sets $DEVSETS --dtype fp16 --optimize ${BAG_OPT:-compile} --frames ${BAG_FRAMES:-192}"
  enough 'bag split' || return
  [ -n "$TINY" ] && args="--tiny"
  timeout --foreground -s INT "$(left)" $PY benchmarks/bench_bag_split.py $args --out "$OUTD/bag_split.json"
  echo "bag split done at $(el) s (exit $?)"
}

run_train() {  # geodiff_train under accelerate launch: 1, 2 (, 4) processes at accumulation 16/G, full size, fp32
  local manifest="" args
  enough training || return
  [ -f shared/data/manifest.json ] && manifest="--manifest shared/data/manifest.json"
  args="--processes $GLIST --steps ${TRAIN_STEPS:-3} --lr-warmup 1 --batch 2 --accumulation 16 $manifest --work-dir /tmp/train_multi --timeout 400"
  [ -n "$TINY" ] && args="--tiny --processes 1 2 --accumulation 4 --steps 4"
  timeout --foreground -s INT "$(left)" $PY benchmarks/train_multi.py $args --out "$OUTD/train_multi.json"
  echo "training done at $(el) s (exit $?)"
}

case $PART in
  serve) run_serve ;;
  bag) run_bag ;;
  train) run_train ;;
  all) run_serve; run_bag; run_train ;;
  *) echo "usage: $0 serve|bag|train|all"; exit 2 ;;
esac
[ -z "$TINY" ] && tar czf "$OUTD/node_logs.tgz" -C /tmp $(cd /tmp && ls -d bench_multigpu_* 2>/dev/null | grep -v ckpt) 2>/dev/null
ls -la "$OUTD"
