#!/usr/bin/env bash
# The local multi-node MiniCache cluster: Redis, cache servers and inference workers as
# processes on their own loopback addresses, TLS and tokens everywhere.
#
#   bash deploy/local/cluster.sh up [--servers 3] [--workers 2] [--device-budget 64MiB]
#   bash deploy/local/cluster.sh status
#   bash deploy/local/cluster.sh down
#
# A thin wrapper over deploy/local/cluster.py with the project's venv (deploy/local/setup.sh
# builds it); `--help` after a command lists its options.
set -euo pipefail
repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
python="$repo_root/.venv/bin/python"
if [ ! -x "$python" ]; then
  echo "cluster.sh: $python is missing: run bash deploy/local/setup.sh first" >&2
  exit 1
fi
exec "$python" "$repo_root/deploy/local/cluster.py" "$@"
