# Multi-stage build: a small runtime image with just the binary and CA certificates.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY migrations migrations
COPY src src
# Declared targets must exist for cargo to read the manifest (the bench is not built here).
COPY benches benches
RUN cargo build --release --locked --bin fallback-worker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fallback \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fallback
COPY --from=build /src/target/release/fallback-worker /usr/local/bin/fallback-worker
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd. The binary
# writes nothing to disk (logs go to stderr), so a read-only root filesystem works as is.
USER 10001:10001
ENV LOG_FORMAT=json
ENTRYPOINT ["fallback-worker"]
CMD ["worker"]
