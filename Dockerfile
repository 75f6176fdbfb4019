# syntax=docker/dockerfile:1
# The reward service as an image: `reward serve` on 0.0.0.0:8000 with the default model baked in.
#
#   docker build -t reward-service .                                  # CPU (default)
#   docker build -t reward-service:cuda --build-arg DEVICE=cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run -p 8000:8000 reward-service [more `reward serve` flags]
#
# Two stages: the first builds a virtual environment (torch pinned first, from the index of the
# chosen variant, then the exact versions of requirements.lock, then the project's own wheel
# with --no-deps so nothing is re-resolved); the second copies only that environment and the
# model into a slim Python image and runs it as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# CPU wheels by default (no multi-GB CUDA libraries); a CUDA index gives the CUDA build, whose
# wheels bring their own CUDA libraries (the host needs only the driver and the NVIDIA runtime).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
# The lock pins the CPU build (torch==X+cpu); torch comes from the variant's index instead.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && grep -v '^torch==' requirements.lock > /tmp/requirements-no-torch.txt \
    && pip install -r /tmp/requirements-no-torch.txt
COPY pyproject.toml README.md ./
COPY client ./client
COPY reward_core ./reward_core
COPY reward_cli.py ./
COPY service ./service
COPY trainer ./trainer
RUN pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-deps /tmp/wheels/*.whl

FROM ${PYTHON_IMAGE} AS runtime
ARG DEVICE=cpu
LABEL org.opencontainers.image.title="reward-service" \
      org.opencontainers.image.description="Reward-model scoring service (reward serve)"
RUN groupadd --system --gid 10001 reward \
    && useradd --system --uid 10001 --gid reward --home-dir /app --shell /usr/sbin/nologin reward
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=reward:reward models/default-rm /app/models/default-rm
# Settings are REWARD_* variables (service/settings.py); flags given to `docker run` override them.
# Binding 0.0.0.0 needs API keys (REWARD_API_KEYS / --api-key) or an explicit REWARD_INSECURE=true.
# (DL3064 mistakes TOKENIZERS_PARALLELISM for a secret because of "TOKEN".)
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    REWARD_MODELS='["default=/app/models/default-rm"]' \
    REWARD_PORT=8000 \
    REWARD_DEVICE=${DEVICE}
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz); orchestrators should gate traffic on /readyz (models warm).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REWARD_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["reward", "serve", "--host", "0.0.0.0"]
CMD []
