#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: system packages, uv, and the locked environment.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
# git: sources; libopenblas0-pthread: the fast BLAS for mlx on Linux CPU; chromium: UI test.
need=()
for pkg in git libopenblas0-pthread chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
uv sync --frozen
