#!/bin/bash
# Start-up and camera-rate figures of the node on one GPU machine (python3 there holds torch; no ROS, no diffusers):
# serve while compiling, restarts on the compile cache and on AOT packages, several cameras. Each phase is one
# bench_multicam.py invocation writing JSON to $OUT after every row, so a run cut off at its limit keeps what it
# measured. Two device calls of < 10 minutes (the cache lives in this machine's /tmp: a call's first start is cold):
#   PHASES="rng startup node" LIMIT=570 bash benchmarks/run_gpu_node_multicam.sh   # call 1
#   PHASES="multicam" LIMIT=570 bash benchmarks/run_gpu_node_multicam.sh           # call 2
#   TINY=--tiny PHASES="rng startup node multicam" bash benchmarks/run_gpu_node_multicam.sh   # CPU rehearsal
# Wheels: bash benchmarks/gpu_wheels.sh .whl/gpu (then WHL=.whl/gpu and carry .whl/gpu).
# Phases:
#   rng       the CUDA noise of the legacy multi-step path (benchmarks/cuda_rng_check.py)
#   startup   1 camera, depth: cold start (empty cache), a restart on the cache it left, then geodiff_compile and a
#             restart on its AOT packages: seconds to the first published frame (eager while compiling) and to the
#             first frame of the optimised path (/diagnostics "optimised"), the engine's load breakdown, build steps
#   node      1 camera at 30 Hz, depth + cloud subscriber, 30 s window on the optimised path (the 1-camera targets)
#   multicam  4 and 2 cameras, one node vs N nodes, then 1 camera (one node): per-camera Hz, p95, GPU memory;
#             4-camera first frame / full speed from a cold cache in the first row
# env: WHL (wheels folder), DOM (first ROS domain), BASEPY, OPT (node optimize, default auto), TINY=--tiny, N_NODE/N_MULTI (extra args).
# --foreground: only the benchmark gets SIGINT at the limit and stops its nodes once.
# ROS wheels + diffusers go into /tmp/venv, which sees python3's own packages through a .pth (gpu_venv.sh).
set -u
T0=$(date +%s); LIMIT=${LIMIT:-570}; WHL=${WHL:-.whl}; BASEPY=${BASEPY:-python3}; OUTD=${OUT:-/tmp/out}
TINY=${TINY:-}; OPT=${OPT:-auto}; PHASES=${PHASES:-"rng startup node multicam"}
DOM=${DOM:-61}  # ROS_DOMAIN_ID of the first run of each phase (the benchmark counts up per run)
N_NODE=${N_NODE:-"--seconds 30 --warmup 3 --startup-timeout 240"}
N_MULTI=${N_MULTI:-"--seconds 15 --warmup 2 --startup-timeout 240"}
MC_CAMS=${MC_CAMS:-"4 2"}; MC_ONE=${MC_ONE:-1}  # multicam: camera counts (one node vs N), then 1 camera (0: skip)
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
# A node, not only imports: message type support loads here (a missing rosidl_generator_py wheel failed only now)
$PY -c "import rclpy; rclpy.init(); n = rclpy.create_node('probe'); print('rclpy node ok'); n.destroy_node(); rclpy.shutdown()" || exit 1
# Does this torch build's AOT runtime keep its own handle to user-managed weights? (engine/aot.py)
$PY -c "from geodiff_ros.engine.aot import user_managed_weights_safe as s; print('AOT user-managed weights safe:', s())"
echo "setup done at $(el) s"
B="$PY benchmarks/bench_multicam.py $TINY --optimize $OPT --cache-dir $CACHE"
for phase in $PHASES; do
  R=$(left); [ "$R" -gt 40 ] || { echo "skip $phase: $R s left"; continue; }
  case $phase in
    rng)
      if [ -n "$TINY" ]; then D=cpu; else D=cuda; fi
      timeout 60 $PY benchmarks/cuda_rng_check.py --device $D --out "$OUTD/rng.json" ;;
    startup)  # cold start, a warm restart on the cache it left, then geodiff_compile + a start on its packages
      timeout --foreground -s INT $R $B --startup 1 --aot --cameras 1 --modes separate --startup-timeout 240 \
        --domain $DOM --out "$OUTD/startup.json" ;;
    node)  # the 1-camera targets: 30 Hz, p95 <= 40 ms depth + cloud, on the optimised path
      timeout --foreground -s INT $R $B --cameras 1 --modes separate --cloud $N_NODE --domain $DOM \
        --out "$OUTD/node_depth.json" ;;
    multicam)  # one node vs N nodes; the first row (multi, 4 cameras) starts on an empty cache
      timeout --foreground -s INT $R $B --cameras $MC_CAMS --modes multi separate $N_MULTI --domain $DOM \
        --out "$OUTD/multicam.json"
      R=$(left); [ "$MC_ONE" = 1 ] && [ "$R" -gt 40 ] && timeout --foreground -s INT $R $B --cameras 1 --modes multi $N_MULTI \
        --domain $DOM --out "$OUTD/multicam_1.json" ;;
  esac
  echo "$phase done at $(el) s"
done
tar czf "$OUTD/node_logs.tgz" -C /tmp $(cd /tmp && ls -d bench_multicam_* 2>/dev/null | grep -v -e ckpt -e inductor) roslog 2>/dev/null
ls -la "$OUTD"
