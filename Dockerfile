# syntax=docker/dockerfile:1
# Multi-stage build of the gateway's own programs (see docker-compose.yml):
#   target `sidecar`   gw-sidecar + gwctl on Debian slim, with the demo tree models
#   target `envoy`     the official Envoy image with the gw_edge filter (.wasm)
#   target `devpeers`  the local run's development peers: gw-tpu-sink (a TPU that
#                      enforces the protocol) and gw-dev-relay (a Jito-style relay)
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
 && cargo build --release --locked -p testkit --bin gw-tpu-sink --bin gw-dev-relay \
 && cargo build --release --locked --target wasm32-wasip1 -p gw-filter \
 && mkdir -p /out \
 && cp target/release/gw-sidecar target/release/gwctl target/release/gw-tpu-sink \
       target/release/gw-dev-relay target/wasm32-wasip1/release/gw_filter.wasm /out/

# The demo tree models, built as the local run builds them (scripts/build-models.py:
# LightGBM → Treelite + tl2cgen → CMake, checked against LightGBM, golden vectors)
# with the pinned toolchain (abi/requirements.txt). On Debian bookworm, as the
# sidecar's image: the libraries link against its glibc.
FROM python:3.12-slim-bookworm AS models
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make libgomp1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY abi/requirements.txt abi/requirements.txt
RUN pip install --no-cache-dir -r abi/requirements.txt
COPY abi abi
COPY scripts/build-models.py scripts/build-models.py
# No git in the image: the libraries are named by this instead of the commit.
ARG MODELS_VERSION=image
RUN python scripts/build-models.py --out /models --git-sha "$MODELS_VERSION"

FROM debian:bookworm-slim AS sidecar
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/gw gw \
 && mkdir -p /var/lib/gw /etc/gw && chown gw /var/lib/gw
COPY --from=build /out/gw-sidecar /out/gwctl /usr/local/bin/
COPY --from=models /models /opt/gw/models
COPY sidecar/config.example.json /etc/gw/sidecar.json
USER gw
WORKDIR /var/lib/gw
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gw-sidecar"]
CMD ["--config", "/etc/gw/sidecar.json"]

FROM envoyproxy/envoy:v1.40.0 AS envoy
COPY --from=build /out/gw_filter.wasm /etc/gw/gw_filter.wasm

# Development peers only: never in front of a real validator or relay.
FROM debian:bookworm-slim AS devpeers
RUN useradd --system --uid 10002 gw
COPY --from=build /out/gw-tpu-sink /out/gw-dev-relay /usr/local/bin/
USER gw
