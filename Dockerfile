# MoM Service image: `docker build -t mom-service .`, then see docs/deployment.md.
# Two stages: the builder installs the pinned dependencies and the package into a virtualenv at /opt/venv; the
# final image gets that virtualenv and nothing else from the build (no pip cache, no build tools, no sources).

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The pinned dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY pyproject.toml README.md LICENSE ./
COPY mom_service ./mom_service
RUN pip install --no-cache-dir --no-deps .


FROM python:3.11-slim

# A fixed uid, so that volumes and mounted files can be given to it on the host.
RUN groupadd --system --gid 10001 mom \
    && useradd --system --uid 10001 --gid mom --home-dir /app --no-create-home --shell /usr/sbin/nologin mom

COPY --from=builder /opt/venv /opt/venv

# /app is the working directory: `mom-service serve` reads ./config.yaml (mount it read-only at /app/config.yaml;
# without one the offline demo config runs) and ./.env, and writes the SQLite usage records to /app/data.
# MOM_CONFIG is deliberately not set: pointing it at a file that is not mounted would stop the service.
WORKDIR /app
COPY config.yaml_template ./
RUN mkdir -p /app/data && chown -R mom:mom /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite+aiosqlite:////app/data/mom.db \
    LITELLM_LOCAL_MODEL_COST_MAP=True

VOLUME ["/app/data"]
EXPOSE 8000

# Liveness: /health answers without a token and without I/O. No curl in the slim image: Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=3)"]

# Numeric, so that Kubernetes' runAsNonRoot (and anyone reading the image config) can tell it is not root: mom.
USER 10001:10001

# The same command as `make run`. It handles SIGTERM itself, as PID 1 too: a graceful drain (docs/operations.md).
CMD ["mom-service", "serve"]
