# syntax=docker/dockerfile:1
#
# cbmir: one image for every component (`cbmir scp|worker|query|serve|...`).
#
#   docker build -t cbmir:latest .                                   # CPU: python:3.11-slim + .[cpu]
#   docker build -t cbmir:gpu --build-arg VARIANT=gpu .              # GPU: CUDA 12 + cuDNN 9 runtime + .[gpu]
#
# The two variants differ only in the base image and in onnxruntime vs onnxruntime-gpu (never both
# in one environment). The GPU variant needs the NVIDIA container toolkit on the host and
# `--gpus all` (compose: deploy.resources.reservations.devices; Kubernetes: nvidia.com/gpu limits).
#
# Data (spool, archive, quarantine, embedded broker/index) lives in CBMIR_DATA_DIR=/data, a volume
# that the listener, the workers and the query service must share.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---- bases ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

FROM ${CUDA_IMAGE} AS base-gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's Python is 3.12 (the project needs >= 3.11); onnxruntime-gpu 1.20+ wants CUDA 12 + cuDNN 9.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---- build: a virtual environment with cbmir and its extra ---------------------------------------
FROM base-${VARIANT} AS build
ARG VARIANT
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (cached while only the code changes): install the project's requirements from
# pyproject.toml alone, then the project itself without re-resolving them.
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" "${VARIANT}" > /tmp/requirements.txt
RUN pip install --upgrade pip setuptools wheel && pip install -r /tmp/requirements.txt
COPY . .
# pyproject.toml names README.md as the long description; never let its absence break the image.
RUN test -f README.md || echo "# cbmir" > README.md \
 && pip install --no-deps ".[${VARIANT}]" \
 && cd / \
 && python -c "import services.ops.cli, workers.app; from models.runtime import default_model_path as p; assert '/opt/venv/' in str(p()) and p().is_file(), p()"

# ---- runtime ---------------------------------------------------------------------------------------
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="cbmir" \
      org.opencontainers.image.description="Content-based medical image retrieval next to the PACS (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 cbmir \
 && useradd --system --uid 10001 --gid cbmir --home-dir /home/cbmir --create-home --shell /usr/sbin/nologin cbmir \
 && mkdir -p /data \
 && chown cbmir:cbmir /data
ENV PATH=/opt/venv/bin:$PATH \
    CBMIR_DATA_DIR=/data \
    CBMIR_DICOM_HOST=0.0.0.0 \
    CBMIR_GRPC_HOST=0.0.0.0 \
    CBMIR_DEVICE=auto
USER 10001:10001
WORKDIR /home/cbmir
VOLUME ["/data"]
# 11112: DICOM C-STORE listener; 50051: gRPC query service. The embedded index writer is a Unix
# socket in /data, never a port. The query service binds 0.0.0.0 here, so it needs API tokens
# (CBMIR_API_TOKENS_FILE or CBMIR_API_TOKENS) or, knowingly, CBMIR_ALLOW_ANONYMOUS=1: it refuses to
# start otherwise.
EXPOSE 11112 50051
ENTRYPOINT ["cbmir"]
# Single-container default: listener + worker + query over the embedded broker and index.
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data"]
