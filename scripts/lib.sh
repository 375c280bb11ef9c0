# Shared shell settings for the project's scripts. Source it; do not run it.
# Caches live outside the checkout so fresh clones (CI) reuse them.
GW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GW_CACHE="${GW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-gw}"
GW_VENV="${GW_VENV:-$GW_CACHE/venv}"
GW_MODELS_VENV="${GW_MODELS_VENV:-$GW_CACHE/venv-models}"
export GW_ROOT GW_CACHE GW_VENV GW_MODELS_VENV
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$GW_CACHE/target}"

# Each step's wall-clock time, so a slow run's log says where its time went.
log() { printf '==> %s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
