# syntax=docker/dockerfile:1
# The gateway: `loraloop serve` with backends.mode remote (k8s StatefulSet loraloop-gateway), also
# used by the model-init Job. No vLLM in it: the gateway only speaks HTTP to the vLLM servers, and
# `serving.app` imports neither vllm nor torch. Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t registry.example.com/loraloop/gateway:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/loraloop
ENV PATH=/opt/loraloop/bin:$PATH
# torch is a dependency of the package (model preparation and training share it); the CPU build
# keeps the image about 2 GB smaller than PyPI's default CUDA build.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY core /src/core
COPY feedback /src/feedback
COPY serving /src/serving
COPY retrain /src/retrain
COPY deploy /src/deploy
RUN pip install /src

FROM python:3.11-slim
RUN groupadd --gid 10001 loraloop \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin loraloop
COPY --from=build /opt/loraloop /opt/loraloop
ENV PATH=/opt/loraloop/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["loraloop"]
CMD ["--config", "/etc/loraloop/config.yaml", "serve"]
