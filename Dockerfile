# syntax=docker/dockerfile:1
# The image of the API and the control worker: compose.yaml runs `ibp migrate` once, then
# `ibp serve` and `ibp worker` from it. A hypervisor's worker runs on the hypervisor itself,
# beside its libvirt (deploy/ibp-worker@.service), from the same package.

# --- build: every Python package, pinned by constraints.txt, into a venv -------------------
# (libvirt-python ships no wheel: it compiles here, against libvirt-dev.)
FROM python:3.11-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ibp
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN /opt/ibp/bin/pip install -c constraints.txt .

# --- runtime: the venv, the migrations, and only the libraries they load -------------------
FROM python:3.11-slim-bookworm
# libvirt0: libvirt-python's library; qemu-utils: qemu-img. Debian's security updates apply.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 qemu-utils \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /srv/ibp --no-create-home \
        --shell /usr/sbin/nologin ibp
COPY --from=build /opt/ibp /opt/ibp
WORKDIR /srv/ibp
# `ibp migrate` reads alembic.ini and migrations/ from the working directory.
COPY alembic.ini ./
COPY migrations ./migrations
ENV PATH=/opt/ibp/bin:$PATH IBP_ENVIRONMENT=production PYTHONUNBUFFERED=1
# Numeric, so a runtime that insists on a non-root user (runAsNonRoot) can tell.
USER 10001:10001
EXPOSE 8000
# Liveness of the API (the worker service turns it off); no curl in the image, Python has urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health', timeout=4)"]
# Serve only: migrations are their own one-shot command (`ibp migrate`, compose's migrate service).
# Set IBP_DATABASE_URL, IBP_REDIS_URL and IBP_SECRET_KEY.
CMD ["ibp", "serve", "--host", "0.0.0.0", "--port", "8000"]
