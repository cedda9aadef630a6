# The project's image: the base image of every KFP component, and what a cluster runs.
#   docker build -t grace:cpu .
#   docker build --build-arg VARIANT=cuda -t grace:cuda .
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    build-essential git && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3 /usr/local/bin/python
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM base-${VARIANT}
RUN (command -v git || (apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*)) >/dev/null
ENV VIRTUAL_ENV=/opt/grace PATH=/opt/grace/bin:$PATH \
    DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/opt/grace/torch_extensions PYTHONUNBUFFERED=1
RUN python -m venv /opt/grace && pip install --no-cache-dir -U 'pip>=26'
# torch first, from the variant's index: an unpinned torch would pull whatever build PyPI has.
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY grace ./grace
COPY components ./components
COPY pipelines ./pipelines
COPY configs ./configs
RUN pip install --no-cache-dir '.[pipelines,deepspeed]' && mkdir -p /opt/grace/torch_extensions
RUN useradd --create-home --uid 1000 grace && chown -R grace /opt/grace/torch_extensions
USER grace
ENTRYPOINT ["grace"]
CMD ["--help"]
