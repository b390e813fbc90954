#!/usr/bin/env bash
# The GPU checks, as one short run on a machine with a CUDA GPU and CuPy (nothing is
# installed: the tree runs from source). GPU-marked tests, then the engine benchmark on
# CuPy with the copy baseline of the same run; JSON goes to $OUT (or /tmp).
#     bash deploy/benchmarks/gpu_check.sh
# Such a machine may carry an older grpcio than the generated stubs pin: the codecs do
# not use gRPC, so `run` lets the stubs import anyway (this script only), and the tests
# run without tests/conftest.py (it needs redis-py, for the service tests).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=client:cache_server:inference_worker
out="${OUT:-/tmp}"
run() {
  python - "$@" <<'PY'
import runpy, sys
import grpc
grpc.__version__ = max(grpc.__version__, "1.85.1", key=lambda v: tuple(map(int, v.split(".")[:3])))
sys.argv = sys.argv[1:]
if sys.argv[0] == "pytest":
    import pytest
    raise SystemExit(pytest.main(sys.argv[1:]))
sys.path.insert(0, sys.argv[0].rpartition("/")[0])
runpy.run_path(sys.argv[0], run_name="__main__")
PY
}
status=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || status=1
run pytest -m gpu -q -p no:cacheprovider --noconftest \
  tests/unit/test_codecs_gpu.py tests/unit/test_tensors.py || status=1
run deploy/benchmarks/compression_throughput.py --device cuda --json "$out/compression_cuda.json" \
  || status=1
exit "$status"
