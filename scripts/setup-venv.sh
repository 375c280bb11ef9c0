#!/usr/bin/env bash
# Creates (or reuses) the cached Python venv with the pinned test requirements.
# Idempotent: reinstalls only when scripts/requirements-test.txt changes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

req="$GW_ROOT/scripts/requirements-test.txt"
stamp="$GW_VENV/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$GW_VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
command -v python3 >/dev/null || die "python3 is required (3.10 or newer)"
log "creating Python venv at $GW_VENV"
python3 -m venv "$GW_VENV"
"$GW_VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$GW_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
