# syntax=docker/dockerfile:1
#
# cbmir: one image for every component (`cbmir scp|worker|query|serve|...`).
#
#   docker build -t cbmir:latest .                                   # CPU: onnxruntime
#   docker build -t cbmir:gpu --build-arg VARIANT=gpu .              # GPU: onnxruntime-gpu (CUDA 12, cuDNN 9)
#
# Both variants start from the same Debian Python image and install only pinned, hashed wheels:
# requirements/image-<variant>.txt, written by scripts/lock-image from pyproject.toml. They differ
# only in onnxruntime vs onnxruntime-gpu (never both in one environment). The GPU variant gets the
# CUDA 12 runtime and cuDNN 9 as NVIDIA's wheels, so it needs no CUDA base image, only the host's
# NVIDIA driver, the NVIDIA container toolkit and `--gpus all` (compose:
# deploy.resources.reservations.devices; Kubernetes: nvidia.com/gpu limits).
#
# Data (spool, archive, quarantine, embedded broker/index) lives in CBMIR_DATA_DIR=/data, a volume
# that the listener, the workers and the query service must share.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with cbmir and its pinned requirements ---------------------------
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
# The compiler and Debian's dcmtk for the listener's native SCP (CBMIR_DICOM_RECEIVER=dcmtk). Not
# pinned: Debian's security updates replace these versions, and the image is rebuilt for them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make libdcmtk-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first (cached while only the code changes), every one pinned with its hash.
COPY requirements/image-${VARIANT}.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: --requirement /tmp/requirements.txt
COPY . .
# The project itself, built with the pinned setuptools and nothing fetched. pyproject.toml names
# README.md as the long description; never let its absence break the image.
RUN test -f README.md || echo "# cbmir" > README.md \
 && pip install --no-cache-dir --no-deps --no-build-isolation /src \
 && make -s dcmtk-scp DCMTK_SCP=/opt/venv/bin/cbmir-dcmtk-scp
WORKDIR /
# Every entry point imports (the gateway's FastAPI and uvicorn too); the model and the panel are in the package.
RUN python -c "import services.ops.cli, services.gateway.server, workers.app; from models.runtime import default_model_path as p, model_files; assert '/opt/venv/' in str(p()) and len(model_files()) >= 3, p()" \
 && python -c "from services.gateway.app import STATIC; assert '/opt/venv/' in str(STATIC) and (STATIC / 'index.html').is_file(), STATIC"

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="cbmir" \
      org.opencontainers.image.description="Content-based medical image retrieval next to the PACS (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
# dcmtk's shared libraries for the native SCP (same note on pinning as above).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libdcmtk17 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# The native SCP loads its libraries (without arguments it exits 2 after its usage line).
RUN /opt/venv/bin/cbmir-dcmtk-scp 2>/dev/null; test $? -eq 2 \
 && groupadd --system --gid 10001 cbmir \
 && useradd --system --uid 10001 --gid cbmir --home-dir /home/cbmir --create-home --shell /usr/sbin/nologin cbmir \
 && mkdir -p /data \
 && chown cbmir:cbmir /data
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CBMIR_DATA_DIR=/data \
    CBMIR_DICOM_HOST=0.0.0.0 \
    CBMIR_DICOM_RECEIVER=dcmtk \
    CBMIR_GRPC_HOST=0.0.0.0 \
    CBMIR_DEVICE=auto
USER 10001:10001
WORKDIR /home/cbmir
VOLUME ["/data"]
# 11112: DICOM C-STORE listener; 50051: gRPC query service; 8080: HTTP gateway (`cbmir gateway`, or
# `serve --http-port 8080`; CBMIR_HTTP_PORT). The embedded index writer is a Unix socket in /data,
# never a port. The query service binds 0.0.0.0 here, so it needs API tokens (CBMIR_API_TOKENS_FILE or
# CBMIR_API_TOKENS) or, knowingly, CBMIR_ALLOW_ANONYMOUS=1: it refuses to start otherwise. The gateway
# on a non-loopback address needs HTTPS (CBMIR_HTTP_TLS_CERT and _KEY) or CBMIR_HTTP_ALLOW_PLAINTEXT=1.
EXPOSE 11112 50051 8080
ENTRYPOINT ["cbmir"]
# Single-container default: listener + worker + query over the embedded broker and index.
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data"]
