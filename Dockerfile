# The erq image: API and workers (the command chooses). CUDA wheels of torch run on GPU hosts
# with the NVIDIA container toolkit, and on CPU elsewhere.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    ERQ_VAR_DIR=/var/lib/erq ERQ_ARTIFACT_DIR=/var/lib/erq/artifacts ERQ_DATA_ROOTS=/data

RUN useradd --create-home --uid 10001 erq && mkdir -p /var/lib/erq/artifacts /data /app \
    && chown -R erq:erq /var/lib/erq /app
WORKDIR /app

COPY --chown=erq:erq pyproject.toml README.md erq_cli.py alembic.ini ./
COPY --chown=erq:erq erq_core ./erq_core
COPY --chown=erq:erq storage ./storage
COPY --chown=erq:erq service ./service
COPY --chown=erq:erq worker ./worker
COPY --chown=erq:erq migrations ./migrations
RUN pip install -e .

USER erq
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["erq", "api", "--host", "0.0.0.0", "--port", "8000"]
