# idtoken-proxy container image: the proxy as a sidecar (Kubernetes, Cloud Run).
#
#   docker build -t idtoken-proxy:0.1.0 .
#   docker run --rm -e IDTOKEN_PROXY_UPSTREAM=https://hello-abc123-uc.a.run.app idtoken-proxy:0.1.0
#
# No credentials are baked in: on Google Cloud the proxy uses the workload's
# identity through the metadata server; elsewhere mount a key and set
# GOOGLE_APPLICATION_CREDENTIALS, or mount a config file and set IDTOKEN_PROXY_CONFIG.

# --- build: install the package and its runtime dependencies into a venv.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# Runtime dependencies only (no test extra); pip checks them against pyproject's bounds.
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# --- runtime: the venv on a fresh slim base, no compilers, no sources.
FROM python:3.11-slim-bookworm
COPY --from=build /opt/venv /opt/venv
# A fixed non-root uid, so runAsNonRoot can verify it without a name lookup.
RUN useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin proxy
USER 65532:65532
# Sidecar defaults. As environment they win over a config file (flags > environment >
# file): change them with the same variable or flag, not in the file.
#   IDTOKEN_PROXY_ADMIN_PORT  admin listener (health, readiness, metrics; no identity)
#   IDTOKEN_PROXY_LOG_FORMAT  json: Cloud Logging reads severity and httpRequest from it
# The main listener keeps its defaults (127.0.0.1:8080): set --port when the app owns 8080.
# DL3064 flags these names for the "TOKEN" in IDTOKEN_PROXY_: none of the values is a secret.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IDTOKEN_PROXY_ADMIN_PORT=9090 \
    IDTOKEN_PROXY_LOG_FORMAT=json
EXPOSE 9090
# Liveness against the admin listener; the image has no curl, Python is there anyway.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/.proxy/healthz' % os.environ.get('IDTOKEN_PROXY_ADMIN_PORT', '9090'), timeout=2)"]
# SIGTERM starts the graceful shutdown (drain up to shutdown_timeout, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["idtoken-proxy"]
CMD []
