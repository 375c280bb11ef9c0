#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a bounded time from its committed
# seed corpus, and fails on any crash, panic, timeout or leak. New inputs go to a
# scratch corpus, never into the checkout; a crashing input is kept under
# $GW_CACHE/fuzz-artifacts/ and printed.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default 30 s, every target)
#
# Needs the nightly toolchain (cargo-fuzz passes -Z flags); installs cargo-fuzz once
# under $GW_CACHE. docs/fuzzing.md: long runs, sanitizers, reproducing a crash.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$GW_ROOT"
secs="${1:-30}"; shift || true
targets=("$@")
if (( ${#targets[@]} == 0 )); then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^gw-fuzz$')
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
fuzz_root="$GW_CACHE/cargo-fuzz"
if [[ ! -x "$fuzz_root/bin/cargo-fuzz" ]]; then
  log "installing cargo-fuzz into $fuzz_root (once)"
  cargo install --locked --root "$fuzz_root" cargo-fuzz
fi
export PATH="$fuzz_root/bin:$PATH"
# Its own target dir: instrumented builds never mix with the main build's.
export CARGO_TARGET_DIR="$GW_CACHE/fuzz-target"
# -s none: the targets are safe Rust (a panic is the failure looked for); a run with
# AddressSanitizer is docs/fuzzing.md's long run.
log "building the fuzz targets (nightly, coverage-instrumented)"
cargo +nightly fuzz build -s none --fuzz-dir fuzz
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
artifacts="$GW_CACHE/fuzz-artifacts"; mkdir -p "$artifacts"
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  log "fuzzing $t for ${secs}s"
  if ! cargo +nightly fuzz run -s none --fuzz-dir fuzz "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$artifacts/$t-" > "$scratch/$t.log" 2>&1; then
    tail -40 "$scratch/$t.log"
    failed+=("$t")
  else
    grep -E '^stat::number_of_executed_units|^Done' "$scratch/$t.log" | tr '\n' ' '; echo
  fi
done
if (( ${#failed[@]} )); then
  die "fuzzing found crashes in: ${failed[*]} (inputs under $artifacts)"
fi
log "fuzzing: ${#targets[@]} targets, ${secs}s each, no crash"
