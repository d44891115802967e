# transfer-worker: a multi-stage build; the runtime image holds the binary
# only (plus CA certificates for TLS to SQS and PostgreSQL) and runs as an
# unprivileged user. No Docker engine runs on the project's own machines:
# tests/it/container.rs checks this file and the compose service statically.
#
#   docker build -t transfer-worker .
#   docker run --rm -e DATABASE_URL=... -e SQS_QUEUE_URL=... transfer-worker

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Queries are checked at compile time against the committed .sqlx/ metadata
# (.cargo/config.toml sets SQLX_OFFLINE), so no database is needed here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo .cargo
COPY .sqlx .sqlx
COPY migrations migrations
COPY src src
RUN cargo build --release --locked --bin transfer-worker

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/transfer-worker /usr/local/bin/transfer-worker
# nobody:nogroup
USER 65534:65534
# The admin server (probes, metrics, console) on all interfaces inside the
# container; its console then requires TRANSFER_WORKER_ADMIN_TOKEN to act.
ENV TRANSFER_WORKER_ADMIN_ADDR=0.0.0.0:9187
EXPOSE 9187
HEALTHCHECK --interval=5s --timeout=2s --retries=5 CMD ["transfer-worker", "probe", "--path", "/readyz"]
ENTRYPOINT ["transfer-worker"]
CMD ["run"]
