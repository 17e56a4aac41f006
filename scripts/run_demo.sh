#!/usr/bin/env bash
# Main job: set up the venv, then run the node on a recorded bag (geodiff_demo --help for options).
# Released weights by default; add --tiny to run the same path on generated tiny checkpoints (CPU).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/setup_venv.sh"
# shellcheck source=scripts/env.sh
source "$repo/scripts/env.sh"
exec geodiff_demo "$@"
