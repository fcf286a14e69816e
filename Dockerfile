# The gateway image: a virtual environment built in one stage, copied alone into a slim runtime.
#
#   docker build -t gateway:0.1.0 .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:8081:8081 \
#     -v "$PWD/gateway.yaml:/etc/gateway/gateway.yaml:ro" \
#     -e GATEWAY_REDIS_URL=redis://redis.example.internal:6379/0 \
#     -e GATEWAY_ADMIN_LISTEN_HOST=0.0.0.0 \
#     gateway:0.1.0
#
# The configuration is not baked in: mount it at /etc/gateway/gateway.yaml (a ConfigMap in k8s/).
# There is no redis-server in the image: point redis.url (or GATEWAY_REDIS_URL) at a real Redis;
# `redis.url: embedded` exits 2 with a message saying so.

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Every dependency ships a manylinux wheel (x86_64 and aarch64), so no compiler is needed even here.
# pip writes the .pyc files now: the runtime's root filesystem is read-only.
RUN python -m venv /opt/venv
WORKDIR /src
# README.md is the package's long description (pyproject.toml's `readme`).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# pip and setuptools leave the venv afterwards: nothing is installed at run time.
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip uninstall --quiet --yes pip setuptools \
    && /opt/venv/bin/gateway --help >/dev/null


FROM python:3.11-slim

LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="API-key gateway: a reverse proxy that checks bearer keys against a Redis key table"

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /srv/gateway
USER 10001:10001

# 8080: the proxy listener; 8081: the admin API, /healthz, /readyz and /metrics.
# The admin listener binds 127.0.0.1 unless the config (or GATEWAY_ADMIN_LISTEN_HOST) says 0.0.0.0;
# never publish 8081 to the public network.
EXPOSE 8080 8081

# Liveness of the process, from inside the container (no curl in slim images). Honours
# GATEWAY_ADMIN_LISTEN_PORT when the admin port is moved through the environment.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_ADMIN_LISTEN_PORT', '8081'), timeout=2)"]

ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml"]
