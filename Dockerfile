# The serving image: onnxruntime + FastAPI over the shipped model store; no torch, no training code.
# It installs what `make serve` installs, in the same two steps: the locked dependencies, every file
# checked against its hash (requirements/serve.lock), then the app without dependencies.
# Build with `make image` (docker or podman; podman needs `--format docker` to keep the HEALTHCHECK).

# Stage 1 installs the app (without dependencies) under /install; the final stage copies that
# over /usr/local. So the app is in the image once, in site-packages with its demo page as package
# data. Copying the source and running `pip install .` in one stage left a second, importable copy in
# the working directory (the one `python -m app` actually imported: the current directory comes first
# on sys.path), and reinstalled every dependency whenever app/ or the README changed. (A wheel
# bind-mounted from this stage, `RUN --mount=type=bind,from=...`, would do the same, but podman 4.3
# mounts an empty directory once the stage is cached.)
FROM python:3.11-slim AS app
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
RUN pip install --quiet --no-cache-dir --no-deps --no-compile --prefix=/install .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=8000 \
    LSTM_SERVE_MODEL_STORE=/srv/lstm-serve/model_store

WORKDIR /srv/lstm-serve

RUN groupadd --gid 10001 lstm-serve \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin lstm-serve

# Layers from the least to the most often changed: dependencies (only when the lock changes), the
# models, then the app (a few hundred kB), so that a code change rebuilds and ships only the last.
COPY requirements/serve.lock requirements/serve.lock
RUN pip install --quiet --require-hashes -r requirements/serve.lock

COPY model_store/ model_store/

COPY --from=app /install/ /usr/local/
# Bytecode compiled where the files now lie (the read-only image cannot cache it at run time).
RUN python -m compileall -q /usr/local/lib/python3*/site-packages/app

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "app.probe"]

# On SIGTERM the service drains for up to LSTM_SERVE_SHUTDOWN_GRACE_SECONDS (20 s), longer than
# `docker stop`'s default 10 s: stop it with `docker stop -t 30` (Kubernetes: terminationGracePeriodSeconds).
CMD ["python", "-m", "app"]
