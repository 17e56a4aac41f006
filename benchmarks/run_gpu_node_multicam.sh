#!/bin/bash
# Issue 5 node figure + issue 7 multicam table on one GPU machine (python3 there holds torch; no ROS, no diffusers).
# Try 1 (H100, 2026-11-25): see benchmarks/results/node_multicam_h100_try1.json. Usage on the device machine, with
# the ROS Jazzy cp312 wheels, diffusers 0.42.1 and importlib_metadata 8.7.0 in .whl/ (carried):
#   LIMIT=420 bash benchmarks/run_gpu_node_multicam.sh   (env: WHL, BASEPY, OPT1, N1, N2, TINY=--tiny for a CPU rehearsal)
# --foreground: only the benchmark gets SIGINT at the limit and stops its nodes once (try 1 signalled the group).
# ROS wheels + diffusers go into /tmp/venv, which sees python3's own packages through a .pth (site.addsitedir):
# a `venv --system-site-packages` made from python3 (itself a venv) would see the base interpreter's, not torch.
set -u
T0=$(date +%s); LIMIT=${LIMIT:-445}; WHL=${WHL:-.whl}; BASEPY=${BASEPY:-python3}; OUTD=${OUT:-/tmp/out}
TINY=${TINY:-}; N1=${N1:-"--dtype fp16 --seconds 60 --warmup 5 --startup-timeout 260"}
N2=${N2:-"--dtype fp16 --seconds 8 --warmup 2 --startup-timeout 90"}
el() { echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 HOME=/tmp ROS_LOG_DIR=/tmp/roslog ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_LOCALHOST_ONLY=1 \
  FASTDDS_DEFAULT_PROFILES_FILE=$PWD/config/fastdds_localhost.xml TORCHINDUCTOR_CACHE_DIR=/tmp/inductor HF_HUB_OFFLINE=1
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
PYV=$($BASEPY -c 'import sys;print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
BASE=$($BASEPY -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
rm -rf /tmp/venv
if $BASEPY -m venv --without-pip /tmp/venv; then
  echo "import site; site.addsitedir('$BASE')" > /tmp/venv/lib/$PYV/site-packages/zz_base.pth
  $BASEPY -m pip install -q --no-index --no-deps --no-compile --ignore-installed --prefix /tmp/venv $WHL/*.whl || exit 1
  PY=/tmp/venv/bin/python
else  # no venv module: into python3's own (venv) prefix, where the bootstrapper's .pth also finds the libs
  $BASEPY -m pip install -q --no-index --no-deps --no-compile $WHL/*.whl || exit 1
  PY=$BASEPY
fi
$PY -c "import rclpy, torch, diffusers, sensor_msgs.msg; print('imports ok: torch', torch.__version__, 'diffusers', diffusers.__version__, rclpy.__file__)" || exit 1
echo "setup done at $(el) s"
# (1) issue 5: one single-camera node, 640x480 @ 30 Hz, depth only + cloud subscriber, compile+graph, 60 s window
timeout --foreground -s INT 280 $PY benchmarks/bench_multicam.py $TINY --cameras 1 --modes separate --optimize ${OPT1:-compile+graph} --cloud \
  $N1 --domain 61 --out "$OUTD/node.json"
echo "node run done at $(el) s"
# (2) issue 7: 4, 2, 1 cameras, one multi-camera node vs N single-camera nodes, eager fp16, short windows
REM=$(( LIMIT - $(el) - 12 ))
if [ $REM -gt 40 ]; then
  timeout --foreground -s INT $REM $PY benchmarks/bench_multicam.py $TINY --cameras 4 2 1 --modes multi separate --optimize none \
    $N2 --domain 70 --out "$OUTD/multicam.json"
fi
echo "multicam done at $(el) s"
tar czf "$OUTD/node_logs.tgz" -C /tmp $(cd /tmp && ls -d bench_multicam_* 2>/dev/null | grep -v ckpt) roslog 2>/dev/null
ls -la "$OUTD"
