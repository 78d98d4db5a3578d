# PostgreSQL from Debian's packages, for the compose smoke test (infra/smoke.sh), where the
# official image cannot be pulled. It reads the official image's POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB on first start and initialises the cluster in UTF-8.
ARG DEBIAN_IMAGE=gpuhost-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data && chown postgres:postgres /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:$PATH
USER postgres
EXPOSE 5432
ENTRYPOINT ["postgres-entrypoint"]
