# syntax=docker/dockerfile:1
#
# relay container image.
#
#   docker build -t relay:0.1.0 .
#   docker run --read-only -v relay-data:/var/lib/relay \
#     -v "$PWD/relay.yaml:/etc/relay/relay.yaml:ro" -p 587:587 -p 465:465 -p 9464:9464 relay:0.1.0
#
# Two stages: the builder makes a venv from the lock files (requirements/, every package pinned
# with its hashes); the final stage copies only that venv onto the same base, so the image
# carries no build tools and no source tree. No compiler is needed: every dependency ships
# wheels for amd64 and arm64 except dkimpy (pure Python, published as source only), which the
# builder turns into a wheel with the locked setuptools.
#
# BASE_IMAGE: the official Python image, pinned to a patch release; pin it by digest as well
# (python:3.11.14-slim-bookworm@sha256:...) in the build that publishes the image, and let a bot
# bump both. Any Debian bookworm root with python3 and python3-venv works too: the test suite
# builds on one made with debootstrap, where no registry is reachable.
# PIP_INDEX_URL: a PyPI mirror, if the build cannot reach PyPI itself. The hashes in the lock
# files decide what is installed, whichever index serves it.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# The lock files first, so a change to relay/ alone reuses the dependency layers. The check
# fails the build, naming the fix, when pyproject.toml declares what the lock files do not.
COPY pyproject.toml ./
COPY requirements ./requirements
# Every file is checked against the lock's hashes as it is downloaded (pip wheel); a source
# package is built without isolation, i.e. with the locked setuptools of /opt/build only.
RUN python3 requirements/lock.py check \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements/build.txt \
 && /opt/build/bin/pip wheel --require-hashes --no-deps --no-build-isolation --wheel-dir /tmp/wheels \
      -r requirements/image.txt \
 && python3 -m venv /opt/relay \
 && /opt/relay/bin/pip install --no-index --no-deps /tmp/wheels/*.whl

# README.md: pyproject.toml names it, so building the package reads it.
COPY README.md ./
COPY relay ./relay
# relay itself, without dependencies (they are all locked above), then `pip check`: a
# requirement of pyproject.toml that the lock does not satisfy fails here. pip compiles the .pyc
# files, so the read-only final image never needs to write bytecode.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
 && /opt/relay/bin/pip install --no-deps /tmp/dist/relay-*.whl \
 && /opt/relay/bin/pip check


FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="SMTP relay proxy: DKIM signing, SPF egress check, SOCKS5/HTTP CONNECT delivery" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid (relay.config.defaults.IMAGE_UID), so Kubernetes runAsNonRoot can
# verify it and volume ownership is predictable. /var/lib/relay is the only writable path: the
# image runs with a read-only root filesystem, and ECS copies this directory's ownership into
# the task's bind-mount volume because VOLUME names the same path.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/relay --no-create-home \
      --shell /usr/sbin/nologin relay \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/relay \
 && install -d -m 0755 /etc/relay

COPY --from=builder /opt/relay /opt/relay

# TMPDIR and HOME point into the volume: with a read-only root, /tmp is not writable.
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/relay \
    TMPDIR=/var/lib/relay \
    RELAY_CONFIG=/etc/relay/relay.yaml

WORKDIR /var/lib/relay
VOLUME ["/var/lib/relay"]

USER 10001:10001

# 587 submission (STARTTLS), 465 submissions (implicit TLS), 9464 metrics/healthz/readyz.
# Binding 587/465 as a non-root user needs net.ipv4.ip_unprivileged_port_start=0 in the
# container's network namespace: Docker and Podman set it by default; the Kubernetes manifests
# and the ECS task definition in deploy/ set it explicitly.
EXPOSE 587 465 9464

# slim has no curl: ask the relay's own /healthz with the interpreter it already carries.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4).status == 200 else 1)"]

# The config path comes from RELAY_CONFIG (above), not a -c in CMD, so one variable moves it:
# `docker run -e RELAY_CONFIG=/run/config/relay.yaml ...` needs no CMD override.
ENTRYPOINT ["relay"]
CMD ["serve"]
