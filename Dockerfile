# The API and the control worker. A hypervisor worker runs on the hypervisor itself (it needs
# the local libvirt socket): `ibp worker --hypervisor NAME` there, from the same package.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-utils libvirt-dev pkg-config gcc \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/ibp
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir .

ENV IBP_ENVIRONMENT=production
EXPOSE 8000
# Migrate, then serve. Set IBP_DATABASE_URL, IBP_REDIS_URL and IBP_SECRET_KEY.
CMD ["sh", "-c", "ibp migrate && exec ibp serve --host 0.0.0.0 --port 8000"]
