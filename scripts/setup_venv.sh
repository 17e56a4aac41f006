#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned dependencies, ROS 2 Jazzy from PyPI included, and install geodiff_ros.
# Usage: scripts/setup_venv.sh [--dev]      (--dev adds the test tools)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then
    echo "geodiff_ros needs Python 3.10-3.12 (found $("$python" --version 2>&1)); set PYTHON=python3.11 or similar" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
reqs=(requirements.txt)
[ "${1:-}" = "--dev" ] && reqs+=(requirements-dev.txt)
stamp=".venv/.geodiff-requirements-$(cat "${reqs[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "installing pinned dependencies into .venv (first run: a few minutes)"
    .venv/bin/python -m pip install -q $(printf -- '-r %s ' "${reqs[@]}")
    touch "$stamp"
    rm -f .venv/.geodiff-ros-wheels-*  # reinstall lark last again (below)
fi
# The real ROS 2 launch stack and `ros2` CLI (launch, launch_ros, launch_testing, ros2 launch/topic/param/...):
# not on PyPI, so test runs take them from ../shared/ros/wheels when that folder is beside the checkout (or
# $GEODIFF_ROS_WHEELS; default: ros/wheels next to $GEODIFF_SHARED_DATA's folder). Without it the launch tests skip
# and say why.
shared_data="${GEODIFF_SHARED_DATA:-$repo/../shared/data}"
ros_wheels="${GEODIFF_ROS_WHEELS:-$(dirname "$shared_data")/ros/wheels}"
if [ "${1:-}" = "--dev" ] && compgen -G "$ros_wheels/*.whl" >/dev/null; then
    wheels_stamp=".venv/.geodiff-ros-wheels-$( (cd "$ros_wheels" && ls ./*.whl; cat "$repo/requirements-ros-launch.txt") \
        | sha1sum | cut -c1-12)"
    if [ ! -f "$wheels_stamp" ]; then
        echo "installing the ROS 2 launch stack and ros2 CLI from $ros_wheels"
        .venv/bin/python -m pip install -q --no-deps "$ros_wheels"/*.whl
        # (pip then says "launch-ros requires ament_index_python": the ROS wheels ship it as ros-jazzy-ament-index-python)
        .venv/bin/python -m pip install -q $(grep -v -e '^#' -e '^lark' requirements-ros-launch.txt) 2>&1 \
            | grep -v -e 'requires ament_index_python' -e "dependency resolver does not currently" >&2 || true
        # last: lark-parser (from ros-rosidl-parser) shares lark 1.x's folder (README of the wheels folder)
        .venv/bin/python -m pip install -q --no-deps --force-reinstall "$(grep '^lark==' requirements-ros-launch.txt)"
        touch "$wheels_stamp"
    fi
elif [ "${1:-}" = "--dev" ]; then
    echo "note: no ROS 2 launch wheels at $ros_wheels: the launch tests will skip (ROS 2 launch is not on PyPI)"
fi
# tf2 / tf2_ros / tf2_msgs / message_filters / sensor_msgs_py of Jazzy (the node takes a LiDAR's extrinsic from TF,
# geodiff_bag process reads /tf and /tf_static of a bag): not on PyPI either, so they come from ../shared/ros/tf2
# (or $GEODIFF_ROS_TF2) when that folder is beside the checkout, the binary wheels matching the venv's Python. A ROS
# user with apt has them (ros-jazzy-tf2-ros, ...). Without them the node still runs; a cloud that needs TF then says
# how to install them, and sparse_points.frame_id / sparse_points.transform still work.
ros_tf2="${GEODIFF_ROS_TF2:-$(dirname "$shared_data")/ros/tf2}"
pytag=$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
tf2_wheels=()
if compgen -G "$ros_tf2/*.whl" >/dev/null; then
    for w in "$ros_tf2"/*-py3-none-any.whl "$ros_tf2"/*-"$pytag"-"$pytag"-*.whl; do [ -f "$w" ] && tf2_wheels+=("$w"); done
fi
if [ "${#tf2_wheels[@]}" -gt 0 ]; then
    tf2_stamp=".venv/.geodiff-ros-tf2-$(printf '%s\n' "${tf2_wheels[@]##*/}" | sha1sum | cut -c1-12)"
    if [ ! -f "$tf2_stamp" ]; then
        echo "installing tf2, tf2_ros, message_filters and sensor_msgs_py from $ros_tf2"
        .venv/bin/python -m pip install -q --no-deps --force-reinstall "${tf2_wheels[@]}"
        touch "$tf2_stamp"
    fi
else
    echo "note: no tf2 wheels for $pytag at $ros_tf2: the node takes LiDAR extrinsics from parameters only (no TF)"
fi
# The package itself (data files go to .venv/share/geodiff_ros, as colcon puts them in install/share).
.venv/bin/python -m pip install -q --no-deps --no-build-isolation --force-reinstall . >/dev/null
rm -rf build ./*.egg-info
# launch_ros looks for executables in <prefix>/lib/<package>/ (colcon's layout); pip puts them in bin/.
mkdir -p .venv/lib/geodiff_ros
for exe in .venv/bin/geodiff_*; do ln -sf "../../bin/$(basename "$exe")" ".venv/lib/geodiff_ros/$(basename "$exe")"; done
