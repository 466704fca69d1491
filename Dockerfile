# The serving image: onnxruntime + FastAPI over the shipped model store; no torch, no training code.
# Its install step is the README's serving install (`make serve` runs the same `pip install .`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=8000 \
    LSTM_SERVE_MODEL_STORE=/srv/lstm-serve/model_store

WORKDIR /srv/lstm-serve

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lstm-serve

COPY pyproject.toml README.md ./
COPY app/ app/
RUN pip install --quiet . && rm -rf build ./*.egg-info

COPY model_store/ model_store/

USER 10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "app.probe"]

CMD ["python", "-m", "app"]
