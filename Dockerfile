# syntax=docker/dockerfile:1
# Multi-stage build of the gateway's own programs (see docker-compose.yml):
#   target `sidecar`  gw-sidecar + gwctl on Debian slim
#   target `envoy`    the official Envoy image with the gw_edge filter (.wasm)
# Build context: the repository root.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gw-sidecar -p gwctl \
 && cargo build --release --locked --target wasm32-wasip1 -p gw-filter \
 && mkdir -p /out \
 && cp target/release/gw-sidecar target/release/gwctl target/wasm32-wasip1/release/gw_filter.wasm /out/

FROM debian:bookworm-slim AS sidecar
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/gw gw \
 && mkdir -p /var/lib/gw /etc/gw && chown gw /var/lib/gw
COPY --from=build /out/gw-sidecar /out/gwctl /usr/local/bin/
COPY sidecar/config.example.json /etc/gw/sidecar.json
USER gw
WORKDIR /var/lib/gw
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gw-sidecar"]
CMD ["--config", "/etc/gw/sidecar.json"]

FROM envoyproxy/envoy:v1.40.0 AS envoy
COPY --from=build /out/gw_filter.wasm /etc/gw/gw_filter.wasm
