# The reward service as an image: `reward serve` on 0.0.0.0:8000 with the default model baked in.
#
#   docker build -t reward-service .                                  # CPU (default)
#   docker build -t reward-service:cuda --build-arg DEVICE=cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run -p 8000:8000 reward-service [more `reward serve` flags]
#
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 on Docker 20.10) for the
# optional CA secret below. No `# syntax=` line: the builder's own Dockerfile frontend is used,
# so nothing is pulled besides the base image.
#
# Air-gapped or behind a TLS-intercepting proxy (scripts/docker/build-local.sh does all of it):
#   --build-arg PYTHON_IMAGE=<a local base with python3.11, python -m venv, useradd>
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt   # the CA bundle pip must trust
#   --build-arg TORCH_INDEX_URL=<an index or mirror pip can reach>
#   --build-arg PIP_INDEX_URL=... / PIP_EXTRA_INDEX_URL=... / PIP_FIND_LINKS=<a wheelhouse URL>
#   (e.g. the CPU torch wheel served from a local directory; a wheelhouse that lacks torch's
#   dependencies is fine: they come from the index).
# The secret is mounted for the pip commands only; it is in no layer of the image.
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
# pip's own settings, unset unless given: pip reads them from the environment of each RUN.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
# The lock pins the CPU build (torch==X+cpu); torch comes from the variant's index instead.
# With the `ca` secret, pip trusts that bundle (a proxy's CA) instead of its own.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && grep -v '^torch==' requirements.lock > /tmp/requirements-no-torch.txt \
    && pip install -r /tmp/requirements-no-torch.txt
COPY pyproject.toml README.md ./
COPY client ./client
COPY reward_core ./reward_core
COPY reward_cli.py ./
COPY service ./service
COPY trainer ./trainer
# (pip fetches the build backend, setuptools, from the index: the CA secret again.)
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip wheel --no-deps --wheel-dir /tmp/wheels . \
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
# Liveness only (/healthz); orchestrators should gate traffic on /readyz (models warm). The probe
# asks the address the server was started with: --host/--port given to `docker run` (read from
# the server's command line), else REWARD_HOST/REWARD_PORT, else 127.0.0.1:8000.
COPY scripts/docker/healthcheck.py /app/healthcheck.py
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
ENTRYPOINT ["reward", "serve", "--host", "0.0.0.0"]
CMD []
