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
fi
# The package itself (data files go to .venv/share/geodiff_ros, as colcon puts them in install/share).
.venv/bin/python -m pip install -q --no-deps --no-build-isolation --force-reinstall . >/dev/null
rm -rf build ./*.egg-info
# launch_ros looks for executables in <prefix>/lib/<package>/ (colcon's layout); pip puts them in bin/.
mkdir -p .venv/lib/geodiff_ros
for exe in .venv/bin/geodiff_*; do ln -sf "../../bin/$(basename "$exe")" ".venv/lib/geodiff_ros/$(basename "$exe")"; done
