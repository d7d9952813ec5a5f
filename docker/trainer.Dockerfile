# syntax=docker/dockerfile:1
# The nightly job on GPUs (`loraloop cycle`, k8s CronJob loraloop-cycle in the gpu overlay): CUDA,
# torch (the CUDA build vLLM pins) and loraloop with the `gpu` extra (the official vLLM, pinned to
# the release the serving image vllm/vllm-openai runs). Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t registry.example.com/loraloop/trainer:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# python3 is 3.12 on Ubuntu 24.04 (loraloop needs >= 3.11); g++ for triton / torch.compile.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/loraloop
ENV PATH=/opt/loraloop/bin:$PATH
ARG VLLM_VERSION=0.32.0
COPY pyproject.toml README.md /src/
COPY core /src/core
COPY feedback /src/feedback
COPY serving /src/serving
COPY retrain /src/retrain
COPY deploy /src/deploy
RUN pip install "/src[gpu]" "vllm==${VLLM_VERSION}" \
 && python -c "import torch, vllm, peft, serving.app; print('torch', torch.__version__, 'vllm', vllm.__version__)"
RUN groupadd --gid 10001 loraloop \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin loraloop
ENV PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
ENTRYPOINT ["loraloop"]
CMD ["--help"]
