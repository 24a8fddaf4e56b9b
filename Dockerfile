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
    && useradd --system --uid 10001 fallback
COPY --from=build /src/target/release/fallback-worker /usr/local/bin/fallback-worker
USER fallback
ENV LOG_FORMAT=json
ENTRYPOINT ["fallback-worker"]
CMD ["worker"]
