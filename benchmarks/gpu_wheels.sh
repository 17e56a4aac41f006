#!/bin/bash
# The wheels a GPU benchmark run carries (the GPU machine has torch, but no ROS, no diffusers and no registry):
# the cp312 wheels of benchmarks/gpu_wheels.txt (ROS 2 Jazzy from PyPI, diffusers and what they import there,
# downloaded here) and the tf2 / tf2_ros / sensor_msgs_py cp312 and py3 wheels of ../shared/ros/tf2 (not on PyPI).
# Usage: bash benchmarks/gpu_wheels.sh [FOLDER]   (default .whl/gpu; then run(..., carry=[FOLDER]) with WHL=FOLDER)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/.whl/gpu}"
tf2="${GEODIFF_ROS_TF2:-$repo/../shared/ros/tf2}"
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$out" -r "$repo/benchmarks/gpu_wheels.txt"
if compgen -G "$tf2/*cp312*.whl" >/dev/null; then
    cp "$tf2"/*-cp312-cp312-*.whl "$tf2"/*-py3-none-any.whl "$out"/
else
    echo "note: no tf2 wheels at $tf2: the node on the GPU machine runs without TF (static extrinsics only)" >&2
fi
ls "$out" | wc -l
