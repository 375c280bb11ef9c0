#!/usr/bin/env bash
# Runs the benchmarks. Each prints ratios against a baseline measured in the same run.
#   bash bench/run.sh            all
#   bash bench/run.sh verify     command verification: ours vs raw ed25519, wasmtime vs native
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$GW_ROOT"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
which="${1:-all}"
if [[ "$which" == all || "$which" == verify ]]; then
  log "building the wasm guest"
  cargo build -q --release --target wasm32-wasip1 -p wasm-verify
  log "bench: verify"
  cargo bench -q -p gw-bench --bench verify -- --noplot
fi
