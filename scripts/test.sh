#!/usr/bin/env bash
# Set up landlens and run the whole test suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
