#!/usr/bin/env bash
# The GPU checks, as one short run on a machine with a CUDA GPU and CuPy (nothing is
# installed: the tree runs from source). GPU-marked tests, then the engine benchmark on
# CuPy with the copy baseline of the same run; JSON goes to $OUT (or /tmp).
#     bash deploy/benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=client:cache_server:inference_worker
out="${OUT:-/tmp}"
status=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || status=1
python -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_codecs_gpu.py tests/unit/test_tensors.py \
  2>&1 | tail -15 || status=1
python deploy/benchmarks/compression_throughput.py --device cuda --json "$out/compression_cuda.json" \
  || status=1
exit "$status"
