#!/bin/bash
# Issue 14 node figures (and issue 7's multicam table) on one GPU machine (python3 there holds torch; no ROS, no
# diffusers). Try 1 (H100, 2026-11-25): benchmarks/results/node_multicam_h100_try1.json. Usage on the device
# machine, with the ROS Jazzy cp312 wheels, diffusers 0.42.1 and importlib_metadata 8.7.0 in .whl/ (carried):
#   PHASES="startup node" LIMIT=580 bash benchmarks/run_gpu_node_multicam.sh     # one device call
#   PHASES="aot multicam" LIMIT=580 bash benchmarks/run_gpu_node_multicam.sh     # a second one
# Phases (each one bench_multicam.py invocation, JSON in $OUT; all share one compile cache under $OUT's machine
# /tmp, so only the first compiled start of a call is cold):
#   startup   1 camera, depth: cold start (empty cache) + 1 warm restart, seconds to the first published frame
#   aot       geodiff_compile (AOT packages for 640x480, fp16, batch 1), then a start that loads them
#   node      1 camera at 30 Hz, 60 s, depth + cloud; then depth+normals + cloud (issue 14 targets 1 and 2)
#   multicam  4, 2, 1 cameras, one node vs N nodes, compiled (optimize auto), 20 s windows
# env: WHL, BASEPY, OPT (node optimize, default auto), TINY=--tiny (CPU rehearsal), N_NODE/N_MULTI (extra args).
# --foreground: only the benchmark gets SIGINT at the limit and stops its nodes once (try 1 signalled the group).
# ROS wheels + diffusers go into /tmp/venv, which sees python3's own packages through a .pth (gpu_venv.sh, shared
# with run_gpu_multi.sh; it says why not `venv --system-site-packages`).
set -u
T0=$(date +%s); LIMIT=${LIMIT:-580}; WHL=${WHL:-.whl}; BASEPY=${BASEPY:-python3}; OUTD=${OUT:-/tmp/out}
TINY=${TINY:-}; OPT=${OPT:-auto}; PHASES=${PHASES:-"startup node aot multicam"}
N_NODE=${N_NODE:-"--seconds 60 --warmup 5 --startup-timeout 300"}
N_MULTI=${N_MULTI:-"--seconds 20 --warmup 3 --startup-timeout 200"}
CACHE=/tmp/geodiff_inductor_cache
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(el) - 12 )); }
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 HOME=/tmp ROS_LOG_DIR=/tmp/roslog ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_LOCALHOST_ONLY=1 \
  FASTDDS_DEFAULT_PROFILES_FILE=$PWD/config/fastdds_localhost.xml HF_HUB_OFFLINE=1
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
if [ -n "$TINY" ]; then
  PY=${PY:-python}  # CPU rehearsal: the checkout's venv (source scripts/env.sh first)
else
  . "$(dirname "$0")/gpu_venv.sh"
  gpu_venv || exit 1
fi
$PY -c "import rclpy, torch, diffusers, sensor_msgs.msg; print('imports ok: torch', torch.__version__, 'diffusers', diffusers.__version__, rclpy.__file__)" || exit 1
echo "setup done at $(el) s"
B="$PY benchmarks/bench_multicam.py $TINY --optimize $OPT --cache-dir $CACHE"
for phase in $PHASES; do
  R=$(left); [ "$R" -gt 60 ] || { echo "skip $phase: $R s left"; continue; }
  case $phase in
    startup)  # cold start, then a warm restart on the cache it left
      timeout --foreground -s INT $R $B --startup 1 --cameras 1 --modes separate --startup-timeout 300 \
        --domain 61 --out "$OUTD/startup.json" ;;
    aot)  # restart on geodiff_compile's packages (no dynamo, no inductor at start)
      timeout --foreground -s INT $R $B --aot --cameras 1 --modes separate --startup-timeout 300 \
        --domain 62 --out "$OUTD/startup_aot.json" ;;
    node)  # issue 14 targets 1 and 2: 1 camera at 30 Hz, 60 s, + cloud; depth, then depth+normals
      timeout --foreground -s INT $R $B --cameras 1 --modes separate --cloud $N_NODE --domain 63 \
        --out "$OUTD/node_depth.json"
      R=$(left); [ "$R" -gt 60 ] && timeout --foreground -s INT $R $B --cameras 1 --modes separate --cloud \
        --tasks depth,normals $N_NODE --domain 65 --out "$OUTD/node_depth_normals.json" ;;
    multicam)  # 4, 2, 1 cameras: one node vs N nodes, compiled
      timeout --foreground -s INT $R $B --cameras 4 2 1 --modes multi separate $N_MULTI --domain 70 \
        --out "$OUTD/multicam.json" ;;
  esac
  echo "$phase done at $(el) s"
done
tar czf "$OUTD/node_logs.tgz" -C /tmp $(cd /tmp && ls -d bench_multicam_* 2>/dev/null | grep -v -e ckpt -e inductor) roslog 2>/dev/null
ls -la "$OUTD"
