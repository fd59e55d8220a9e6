# pushworker: the Celery worker (default command), Celery beat and pushctl, in one image.
#
#   docker build -t pushworker:local .
#
# The base image is a build argument so that it can be pinned by digest where images are
# mirrored (--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...), or built from Debian's
# own packages where Docker Hub cannot be reached (scripts/compose-image). What a base must hold
# (docs/deploy.md, "The base image"): python3 (3.11, with venv), /bin/sh, groupadd and useradd,
# and skopeo at /usr/bin/skopeo or apt-get able to install it. Only `python3` is called here:
# Debian has no `python`, the official images have both.
#
# No `# syntax=` line: BuildKit would fetch that frontend from Docker Hub before anything else.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv holding the pinned dependencies and the project's wheel --------------
FROM ${PYTHON_IMAGE} AS build
# Named, so that scripts/compose-image can remove this stage's images from earlier builds.
LABEL org.opencontainers.image.title="pushworker-build"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock changes, not on every code edit.
# --no-deps: exactly the pinned closure, nothing resolved at build time.
# Where the wheels come from: pip's index, or, when the build context has a wheelhouse/
# directory of wheels, those alone (no index). scripts/compose-image puts them there, downloaded
# on the host with the host's own pip configuration, for engines that reach no index. In a plain
# `docker build .` the pattern matches nothing, which both builders allow beside a file that
# exists (a pattern under a missing directory, wheelhouse/*.whl, BuildKit refuses). The
# directory's contents land in /wheelhouse. The pip.conf belongs to this stage only.
COPY requirements.lock wheelhouse* /wheelhouse/
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
      printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > /etc/pip.conf; \
    fi \
 && python3 -m venv /opt/pushworker \
 && /opt/pushworker/bin/pip install --no-deps -r /wheelhouse/requirements.lock \
 && /opt/pushworker/bin/pip check
# The project itself, built with a pinned setuptools in a throwaway environment (made before the
# code is copied, so that a code change does not make it again).
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install setuptools==84.2.1
COPY pyproject.toml README.md celeryconfig.py ./
COPY worker ./worker
COPY tasks ./tasks
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/pushworker/bin/pip install --no-deps /wheels/pushworker-*.whl \
 && /opt/pushworker/bin/pip check

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pushworker" \
      org.opencontainers.image.description="Pushes Docker images to explicitly named registries; append-only event log" \
      org.opencontainers.image.licenses="Apache-2.0"
# skopeo (Debian's, 1.9 in bookworm) copies the sources that are not the Docker Engine
# (docs/sources.md); it is run with its own private files, never the image's configuration.
# A base that holds it already (scripts/compose-image's) needs no package index here.
RUN command -v skopeo >/dev/null \
 || { apt-get update \
      && apt-get install --yes --no-install-recommends skopeo \
      && rm -rf /var/lib/apt/lists/*; }
# A fixed, unprivileged user. It reaches the Docker Engine through the socket's group, given at
# run time (compose: group_add: [DOCKER_GID]); root is never needed.
RUN groupadd --system --gid 10001 pushworker \
 && useradd --system --uid 10001 --gid pushworker --home-dir /var/lib/pushworker \
      --create-home --shell /usr/sbin/nologin pushworker
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
# one-shot commands serve no metrics: compose disables the check for them.) `python` is the
# virtualenv's, first on PATH, whatever the base calls its own.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "worker.metrics", "check"]
# Migrations are never run here: `pushctl db upgrade` is its own command (compose: `migrate`).
CMD ["celery", "-A", "tasks.app", "worker", "-Q", "pushworker", "--without-gossip", "--without-mingle", "-l", "INFO"]
# Last, so that a code change rebuilds this one layer of the runtime stage: with the vfs storage
# driver every instruction copies the whole image, 10 s or more each. The files are root's
# (COPY ignores USER): the worker cannot change its own code.
COPY --from=build /opt/pushworker /opt/pushworker
