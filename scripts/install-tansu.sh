#!/usr/bin/env bash
# Installs the Kafka-compatible broker tansu 0.6.0 (crates.io, Apache-2.0) once into
# the cache ($GW_CACHE/tansu/bin/tansu); later runs reuse it. The first build takes
# about 12 minutes on 2 cores.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
root="$GW_CACHE/tansu"
if [[ -x "$root/bin/tansu" ]] && "$root/bin/tansu" --version 2>/dev/null | grep -q '0\.6\.0'; then
  exit 0
fi
log "installing tansu 0.6.0 into $root (one-time, ~12 min)"
# Its own target dir: the workspace's cache must not be churned by an unrelated build.
CARGO_TARGET_DIR="$GW_CACHE/tansu-build" cargo install tansu --locked --version 0.6.0 \
  --no-default-features --features dynostore --root "$root"
rm -rf "$GW_CACHE/tansu-build"
