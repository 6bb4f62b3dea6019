# syntax=docker/dockerfile:1
# tokengate container image: `docker compose build` (or `docker build -t tokengate .`).
# The image holds only the binary and CA certificates; the config, key files and secrets are
# mounted at run time (see docker-compose.yml and conf/docker.toml).

# --- build -----------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
# cmake: libz-ng-sys (pulled in by pingora) and aws-lc-sys (TLS crypto) build with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artifacts between builds (BuildKit); the binary is
# copied out of the cached target directory so the next stage can use it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin tokengate \
    && install -m 0755 target/release/tokengate /usr/local/bin/tokengate

# --- run -------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: trust roots for the upstream APIs and token endpoints.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tokengate \
    && useradd --system --uid 10001 --gid tokengate --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tokengate \
    && mkdir -p /etc/tokengate
COPY --from=build /usr/local/bin/tokengate /usr/local/bin/tokengate
USER tokengate:tokengate
# Proxy and admin listeners of conf/docker.toml.
EXPOSE 8080 9090
# SIGTERM: /readyz 503 and serving for server.shutdown_delay, then in-flight requests drain
# for at most server.grace_period; exit 0 as soon as none is left.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokengate"]
CMD ["run", "-c", "/etc/tokengate/tokengate.toml"]
