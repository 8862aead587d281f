# Multi-stage build: a full Rust toolchain to compile, a slim Debian to run.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin pgweir

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin pgweir
COPY --from=build /src/target/release/pgweir /usr/local/bin/pgweir
COPY config/example.toml /etc/pgweir/pgweir.toml
USER pgweir
# The example config listens on loopback; a mounted /etc/pgweir/pgweir.toml should set
# [listen] addr = "0.0.0.0:6432" to be reachable from outside the container.
EXPOSE 6432
ENTRYPOINT ["/usr/local/bin/pgweir"]
CMD ["--config", "/etc/pgweir/pgweir.toml"]
