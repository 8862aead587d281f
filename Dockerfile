# pgweir container image. Multi-stage: the full Rust toolchain compiles, a slim Debian runs.
#   docker build -t pgweir .
#   docker run -v $PWD/deploy/pgweir.toml:/etc/pgweir/pgweir.toml:ro -p 6432:6432 -p 6433:6433 pgweir
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Manifests first, so dependency downloads are cached while only sources change.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin pgweir \
    && strip target/release/pgweir

FROM debian:bookworm-slim
# ca-certificates: server_tls verify-full against a public CA bundle when no ca_file is given.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgweir
COPY --from=build /src/target/release/pgweir /usr/local/bin/pgweir
# A working default for docker-compose; mount your own file over it (read-only is fine).
COPY deploy/pgweir.toml /etc/pgweir/pgweir.toml
USER 10001:10001
EXPOSE 6432 6433
# `pgweir health` is a tiny HTTP client for GET /health: the image needs no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/pgweir", "health", "--admin", "127.0.0.1:6433"]
# SIGTERM drains: stop accepting, tell idle clients, let transactions finish (shutdown_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgweir"]
CMD ["--config", "/etc/pgweir/pgweir.toml"]
