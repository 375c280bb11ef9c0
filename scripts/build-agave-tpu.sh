#!/usr/bin/env bash
# Builds Agave's QUIC TPU server (tests/agave-tpu: solana-streamer 3.1.14 from
# crates.io) for the sender's interop tests, and Agave's TPU client
# (solana-tpu-client-next 3.1.14, `next-load`) for the parity benchmark. Its own
# workspace, lock file and target directory in the cache: the first build is
# ~6 min on 2 cores, later ones a no-op. Always with the same features, so the
# tests and the benchmark never rebuild each other's dependencies. The tests find
# the server at $GW_CACHE/agave-target/release/agave-tpu.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$GW_ROOT/tests/agave-tpu"
log "building Agave's TPU server (tests/agave-tpu, solana-streamer 3.1.14)"
CARGO_TARGET_DIR="$GW_CACHE/agave-target" cargo build --release --locked --quiet --features next
