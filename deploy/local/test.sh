#!/usr/bin/env bash
# Command 2 of the README: sets everything up, then runs lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
