#!/usr/bin/env bash
# Builds Agave's QUIC TPU server (tests/agave-tpu: solana-streamer 3.1.14 from
# crates.io) for the sender's interop tests. Its own workspace, lock file and
# target directory in the cache: the first build is ~6 min on 2 cores, later
# ones are a no-op. The tests find it at $GW_CACHE/agave-target/release/agave-tpu.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$GW_ROOT/tests/agave-tpu"
log "building Agave's TPU server (tests/agave-tpu, solana-streamer 3.1.14)"
CARGO_TARGET_DIR="$GW_CACHE/agave-target" cargo build --release --locked --quiet
