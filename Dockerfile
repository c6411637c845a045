# The erq images, one target each:
#   docker build --target api -t erq-api .       the REST API: no torch, starts in a second
#   docker build --target worker -t erq-worker .  the GPU worker: the engine and CUDA wheels of torch
# Dependencies are installed before the source is copied, so a code change rebuilds only the last
# layers; their pins come from pyproject.toml, the one place they are written.
FROM python:3.11.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ERQ_HOME=/var/lib/erq ERQ_DATA_ROOTS=/data

RUN useradd --create-home --uid 10001 erq && mkdir -p /var/lib/erq/artifacts /data /app \
    && chown -R erq:erq /var/lib/erq /app
WORKDIR /app

# requirements-api.txt: the plain dependencies; requirements-worker.txt: those plus the engine extra.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
api = p['dependencies']; engine = p['optional-dependencies']['engine']; \
open('/tmp/requirements-api.txt', 'w').write('\n'.join(api) + '\n'); \
open('/tmp/requirements-worker.txt', 'w').write('\n'.join(api + engine) + '\n')"


FROM base AS api
RUN pip install -r /tmp/requirements-api.txt
COPY pyproject.toml README.md erq_cli.py alembic.ini ./
COPY erq_core ./erq_core
COPY storage ./storage
COPY migrations ./migrations
COPY service ./service
COPY worker ./worker
COPY erq_client ./erq_client
RUN pip install --no-deps . && rm -rf build *.egg-info
USER erq
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["erq", "api", "--host", "0.0.0.0", "--port", "8000"]


FROM base AS worker
RUN pip install -r /tmp/requirements-worker.txt
# The Hugging Face cache volume mounts here: a new named volume takes this folder's owner.
ENV HF_HOME=/var/lib/erq/hf-cache ERQ_WORKER_HEALTH_FILE=/tmp/erq-worker.alive
RUN mkdir -p /var/lib/erq/hf-cache && chown erq:erq /var/lib/erq/hf-cache
COPY pyproject.toml README.md erq_cli.py alembic.ini ./
COPY erq_core ./erq_core
COPY storage ./storage
COPY migrations ./migrations
COPY service ./service
COPY worker ./worker
COPY erq_client ./erq_client
RUN pip install --no-deps . && rm -rf build *.egg-info
USER erq
# Healthy while the worker's sweeper reaches the database and the broker (it touches the health file).
HEALTHCHECK --interval=30s --start-period=120s CMD ["erq", "worker", "--healthcheck"]
CMD ["erq", "worker", "--concurrency", "1"]
