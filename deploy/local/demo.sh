#!/usr/bin/env bash
# Command 1 of the README: sets everything up, then runs the end-to-end demo on the
# bundled model (SmolLM2-135M): it starts Redis, a cache server and an inference worker
# on loopback, replays real multi-turn ShareGPT conversations with the `default`
# compression policy, prints what the cache service did (tokens, compression ratio,
# memory against the fp16 cache, bytes overflowed to Redis, time to first token resumed
# versus recomputed, agreement with full-cache generation), and stops everything.
# About 3 minutes on two CPU cores. Extra arguments go to `minicache-worker demo`
# (e.g. --conversations 5 --turns 4 --json results/demo.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
exec .venv/bin/minicache-worker demo "$@"
