# syntax=docker/dockerfile:1.7
# EAT images. Targets (deploy/README.md):
#   serve      (default) FastAPI + onnxruntime-gpu 1.31.1 (CUDA 13 / cuDNN 9), no torch, demo model baked in
#   serve-cpu  the same service on onnxruntime (CPU) for hosts without an NVIDIA GPU
#   train      CUDA PyTorch 2.13.0 for `eat pretrain|finetune|export` and multi-node `torchrun`
#
# Where CUDA comes from: pip wheels, not an nvidia/cuda base image. onnxruntime-gpu 1.31.1 declares its
# CUDA 13 / cuDNN 9 libraries as the extras `[cuda,cudnn]` (nvidia-cuda-runtime, -nvrtc, -cufft, -curand,
# nvidia-cudnn-cu13 -> nvidia-cublas), and torch 2.13.0 from PyPI depends on the same CUDA 13.0 wheels. One
# slim Python base then serves both images, the library versions are exactly the ones these two projects test
# against, and deploy/docker/constraints-cuda13.txt pins them. The host only needs the NVIDIA driver (>= 580
# for CUDA 13) and the NVIDIA Container Toolkit, which mounts libcuda.so.1 into the container.

ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# base: a virtual environment at /opt/venv with a pinned pip; every later stage installs into it.
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install pip==26.3

# Only what `pip install .` needs: sources and metadata (README.md is the package's readme).
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY eat/ eat/
COPY model/ model/
COPY training/ training/
COPY service/ service/

# ---------------------------------------------------------------------------------------------------------
# model: builds the default model with `eat demo` (tiny EAT trained on synthetic scenes, exported to ONNX) on
# CPU torch, so the serving image starts with something to serve. Replace it by mounting your own model and
# pointing EAT_MODEL_PATH at it (deploy/README.md).
FROM source AS model
# DL3013: ".[...]" is this project, whose own pins (torch==2.13.0, onnxruntime==...) live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install ".[serve,train]"
# The exporter writes files 0600 (mkstemp); the service runs as uid 10001, so make the model world-readable.
RUN eat demo --out /build/models/default \
    && test -s /build/models/default/model.onnx \
    && chmod -R a+rX /build/models

# ---------------------------------------------------------------------------------------------------------
# The service's two virtual environments. Non-editable installs: the sources stay behind in this stage.
FROM source AS venv-gpu
COPY deploy/docker/constraints-cuda13.txt /tmp/constraints-cuda13.txt
RUN pip install --constraint /tmp/constraints-cuda13.txt ".[gpu]" "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
    && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"

FROM source AS venv-cpu
# hadolint ignore=DL3013
RUN pip install ".[serve,openvino]"

# ---------------------------------------------------------------------------------------------------------
# serve-common: what both serving images share: a non-root user, the baked model, health check, command.
FROM ${PYTHON_IMAGE} AS serve-common
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    EAT_MODEL_PATH=/opt/eat/models/default/model.onnx
RUN groupadd --system --gid 10001 eat \
    && useradd --system --uid 10001 --gid eat --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin eat
COPY --from=model /build/models/default/ /opt/eat/models/default/
WORKDIR /opt/eat
USER 10001:10001
EXPOSE 8000
# Liveness only (readiness is the orchestrator's probe); Python's urllib, since the image has no curl. The port
# is CMD's: whoever serves on another port overrides both.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4); sys.exit(0 if r.status == 200 else 1)"]
# Exec form: `eat` is PID 1 and gets SIGTERM itself, so the service drains (EAT_DRAIN_TIMEOUT_S) before exiting.
ENTRYPOINT ["eat"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

FROM serve-common AS serve-cpu
ENV EAT_PROVIDER=cpu
COPY --from=venv-cpu /opt/venv /opt/venv

# ---------------------------------------------------------------------------------------------------------
# train: CUDA PyTorch from PyPI (torch 2.13.0's Linux wheel is built for CUDA 13.0 and pulls its CUDA, cuDNN and
# NCCL wheels) plus CPU onnxruntime, which `eat export` uses to verify the exported file against PyTorch.
FROM source AS train
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 \
    && pip install ".[serve,train]"
RUN groupadd --system --gid 10001 eat \
    && useradd --system --uid 10001 --gid eat --create-home --home-dir /home/eat eat \
    && mkdir -p /workspace && chown eat:eat /workspace
WORKDIR /workspace
USER 10001:10001
# The k8s Job (deploy/k8s/train/) runs `torchrun ... -m training.cli pretrain ...`; alone, the image lists commands.
CMD ["eat", "--help"]

# ---------------------------------------------------------------------------------------------------------
# serve (last stage, so the default target): the GPU service. onnxruntime's CUDA provider links libcublas,
# libcudart, libcurand (and dlopens cuDNN, cuFFT, NVRTC) by soname without an RPATH, so the wheels' library
# folders go on LD_LIBRARY_PATH; the service then works whether or not it calls onnxruntime.preload_dlls().
FROM serve-common AS serve
ENV EAT_PROVIDER=cuda \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.12/site-packages/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=venv-gpu /opt/venv /opt/venv
