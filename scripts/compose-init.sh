#!/usr/bin/env bash
# Prepares .run/compose/ for `docker compose up`: dev secrets (scripts/dev-keys.sh),
# the Envoy config rendered from the same template as the local run (host names of
# the compose network, container paths), the sidecar's configuration written as the
# local run writes its own (scripts/sidecar-config.py: the sender on, to the
# development TPU and relay services), the sidecar's and the development TPU's key
# secrets as files each container reads alone and an admin JWT (8 h). Needs openssl
# and python3. Development keys only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
run="${1:-.run/compose}"
bash scripts/dev-keys.sh "$run"
# Envoy and the sidecar run as users of their own in their images (Envoy's 101, the
# sidecar's gw, 10001): each reads its own secrets through an ACL entry and no one
# else can (0600 + ACL, as the local run keeps them 0600). Without setfacl (Debian's
# `acl`) or ACLs on this filesystem, they are left readable by every user of the
# host, and said.
open_to_all=()
# A rootless or user-namespaced engine maps a container's uid to another on the host:
# an ACL for 101 would let the wrong account read, and not the container's.
remapped=""
if command -v docker >/dev/null && docker info -f '{{.SecurityOptions}}' 2>/dev/null | grep -Eq 'rootless|userns'; then
  remapped="the Docker engine remaps users (rootless or userns-remap)"
elif command -v podman >/dev/null && ! command -v docker >/dev/null; then
  remapped="podman runs the containers (it maps users)"
fi
grant() { # UID FILE...
  local uid=$1 f
  shift
  for f in "$@"; do
    chmod 600 "$f"
    if [[ -n "$remapped" ]] || ! setfacl -m "u:$uid:r" "$f" 2>/dev/null; then
      chmod 644 "$f"
      open_to_all+=("$f")
    fi
  done
}
grant 101 "$run/certs/server.key" "$run/certs/envoy-client.key"
grant 10001 "$run/certs/sidecar.key" "$run/keys/clickhouse-sidecar.pw" "$run/keys/clickhouse-admin.pw"
# The sidecar's signing keys reach it as files (the *_FILE variables of
# docker-compose.yml), never in its environment, which `docker inspect` shows.
grant 10001 "$run/keys/op-admin-1.sk.hex" "$run/keys/ledger.sk.hex" "$run/keys/edge.key.hex" \
  "$run/keys/tpu-identity.sk.hex"
# The development TPU's identity, for the devpeers image's user (10002).
grant 10002 "$run/keys/tpu-sink.sk.hex"
python3 envoy/render.py --filter-config "$run/filter.json" \
  --set GW_LISTEN_ADDRESS=0.0.0.0 --set GW_CLUSTER_TYPE=STRICT_DNS \
  --set GW_SIDECAR_ADDRESS=sidecar --set GW_SIDECAR_PORT=8080 \
  --set GW_TLS_CERT=/etc/gw/certs/server.pem --set GW_TLS_KEY=/etc/gw/certs/server.key \
  --set GW_UPSTREAM_CA=/etc/gw/certs/ca.pem \
  --set GW_UPSTREAM_CLIENT_CERT=/etc/gw/certs/envoy-client.pem \
  --set GW_UPSTREAM_CLIENT_KEY=/etc/gw/certs/envoy-client.key \
  --set GW_FILTER_WASM=/etc/gw/gw_filter.wasm --set GW_ADMIN_SOCKET=/tmp/envoy-admin.sock \
  -o "$run/envoy.yaml"
# render.py writes it 0600 (it holds the filter's JWT keys): Envoy's user reads it.
grant 101 "$run/envoy.yaml"
# Before 2026-12-10 the keys were written into env files here: an earlier run's
# are removed, as they hold the keys in a second place.
rm -f "$run/sidecar.env" "$run/tpu-sink.env"
# The development TPU has a fixed address on the compose network (docker-compose.yml):
# a leader's TPU address is an IP address, as Solana's leader schedule gives it.
# The state directory is absolute, inside the sidecar-state volume (where the image's
# working directory put it before: /var/lib/gw/.run/sidecar).
python3 scripts/sidecar-config.py --keys "$run/keys" --filter-config "$run/filter.json" --tpu 172.30.0.9:8009 \
  --relay http://relay:8010 --ingest 0.0.0.0:8011 --state-dir /var/lib/gw/.run/sidecar \
  -o "$run/sidecar.json"
chmod 644 "$run/sidecar.json"
# An admin token for the filter's JWT rules (same claims as `gwctl jwt`).
python3 - "$run" <<'PY'
import base64, hashlib, hmac, json, os, sys, time
run = sys.argv[1]
secret = bytes.fromhex(open(f"{run}/keys/jwt.secret.hex").read().strip())
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
now = int(time.time())
head = {"alg": "HS256", "typ": "JWT", "kid": "dev"}
claims = {"iss": "defi-dashboard", "aud": "defi-users", "sub": "compose-admin",
          "roles": ["admin"], "iat": now, "exp": now + 8 * 3600}
signing = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
sig = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
fd = os.open(f"{run}/admin.jwt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.fchmod(fd, 0o600)
os.write(fd, f"{signing}.{b64(sig)}\n".encode())
os.close(fd)
PY
if (( ${#open_to_all[@]} )); then
  why=$remapped
  [[ -n "$why" ]] || why="no ACLs here (install Debian's acl, or use a filesystem with ACLs)"
  echo "warning: $why:" \
    "these secrets are readable by every user of this host: ${open_to_all[*]}" >&2
fi
echo "compose files written to $run: now run: docker compose up --build"
