#!/usr/bin/env bash
# Set up the venv with the test tools, then lint and run the whole test suite (CPU, tiny checkpoints, real DDS).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/setup_venv.sh" --dev
# shellcheck source=scripts/env.sh
source "$repo/scripts/env.sh"
cd "$repo"
ruff check .
python -m pytest -q -p no:cacheprovider "$@" test
