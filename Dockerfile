# lakeproxy in a container: a slim Python image, no build tools, a non-root user.
#
#   docker build -t lakeproxy .
#   docker run --rm -p 127.0.0.1:6432:6432 --env-file lakeproxy.env lakeproxy
#
# It listens on 0.0.0.0:6432 (clients) and 0.0.0.0:9090 (/healthz, /readyz,
# /metrics). A non-loopback listener needs LAKEPROXY_CLIENT_PASSWORD (clients then
# log in with SCRAM-SHA-256); on a private network where every container may
# connect without a password, run it with `run --allow-remote-trust` instead.
# See compose.yaml and the README's "Docker" section. There is no Docker engine on
# our CI machines: tests/unit/test_packaging.py runs this file's install steps
# in a fresh virtualenv and checks the rest of it.

# ---- build: install lakeproxy and its dependencies into a virtualenv.
# (Every dependency ships wheels for linux/amd64 and arm64: nothing is compiled.)
FROM python:3.11-slim AS build
COPY pyproject.toml README.md LICENSE /src/
COPY lakeproxy /src/lakeproxy
RUN python -m venv /opt/lakeproxy
RUN /opt/lakeproxy/bin/pip install --no-cache-dir /src

# ---- run: the virtualenv on a fresh slim image.
FROM python:3.11-slim
# ca-certificates: LAKEBASE_SSLROOTCERT=system (the default) verifies Lakebase against them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/lakeproxy \
       --shell /usr/sbin/nologin lakeproxy
COPY --from=build /opt/lakeproxy /opt/lakeproxy
ENV PATH=/opt/lakeproxy/bin:$PATH \
    HOME=/home/lakeproxy \
    PYTHONUNBUFFERED=1 \
    LAKEPROXY_LISTEN=0.0.0.0:6432 \
    LAKEPROXY_ADMIN_LISTEN=0.0.0.0:9090
USER 10001
WORKDIR /home/lakeproxy
EXPOSE 6432 9090
# Healthy = /readyz answers 200: listening, a credential held, not draining, below
# LAKEPROXY_MAX_CLIENTS. The probe never touches the endpoint (no wake-ups).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["lakeproxy", "wait", "--admin", "127.0.0.1:9090", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lakeproxy"]
CMD ["run"]
