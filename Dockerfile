# syntax=docker/dockerfile:1
# pushworker: the Celery worker (default command), Celery beat and pushctl, in one image.
#
#   docker build -t pushworker:local .
#
# The base image is a build argument so that it can be pinned by digest where images are
# mirrored: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv holding the pinned dependencies and the project's wheel --------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock changes, not on every code edit.
# --no-deps: exactly the pinned closure, nothing resolved at build time.
COPY requirements.lock ./
RUN python -m venv /opt/pushworker \
 && /opt/pushworker/bin/pip install --no-deps -r requirements.lock \
 && /opt/pushworker/bin/pip check
# The project itself, built with a pinned setuptools in a throwaway environment.
COPY pyproject.toml README.md celeryconfig.py ./
COPY worker ./worker
COPY tasks ./tasks
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install setuptools==84.2.1 \
 && /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/pushworker/bin/pip install --no-deps /wheels/pushworker-*.whl \
 && /opt/pushworker/bin/pip check

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pushworker" \
      org.opencontainers.image.description="Pushes Docker images to explicitly named registries; append-only event log" \
      org.opencontainers.image.licenses="Apache-2.0"
# skopeo (Debian's, 1.9 in bookworm) copies the sources that are not the Docker Engine
# (docs/sources.md); it is run with its own private files, never the image's configuration.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends skopeo \
 && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged user. It reaches the Docker Engine through the socket's group, given at
# run time (compose: group_add: [DOCKER_GID]); root is never needed.
RUN groupadd --system --gid 10001 pushworker \
 && useradd --system --uid 10001 --gid pushworker --home-dir /var/lib/pushworker \
      --create-home --shell /usr/sbin/nologin pushworker
COPY --from=build /opt/pushworker /opt/pushworker
ENV PATH=/opt/pushworker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PUSHWORKER_LOG_FORMAT=json \
    PUSHWORKER_METRICS_PORT=9808 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/pushworker-metrics \
    DOCKER_HOST=unix:///var/run/docker.sock
WORKDIR /var/lib/pushworker
USER pushworker:pushworker
EXPOSE 9808
# The worker's main process serves /metrics; it answers as long as the worker runs. (Beat and
# one-shot commands serve no metrics: compose disables the check for them.)
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "worker.metrics", "check"]
# Migrations are never run here: `pushctl db upgrade` is its own command (compose: `migrate`).
CMD ["celery", "-A", "tasks.app", "worker", "-Q", "pushworker", "--without-gossip", "--without-mingle", "-l", "INFO"]
