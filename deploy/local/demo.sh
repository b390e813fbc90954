#!/usr/bin/env bash
# Command 1 of the README: sets everything up, then runs the main job on the bundled
# model (SmolLM2-135M): the accuracy evaluation of the calibrated `default` policy and of
# the paper's exact settings, each against the full fp16 cache measured in the same run.
# Results land in results/ (JSON and a ratio-vs-perplexity plot). About 10 minutes on
# two CPU cores. Extra arguments go to `minicache-worker eval` (e.g. --policy all).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
mkdir -p results
policies=(--policy default --policy paper)
if [[ " $* " == *" --policy"* ]]; then policies=(); fi
exec .venv/bin/minicache-worker eval --model smollm2 "${policies[@]}" \
  --json results/eval.json --plot results/eval.png "$@"
