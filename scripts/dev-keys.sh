#!/usr/bin/env bash
# Makes (once) the development secrets of a gateway in DIR: TLS certificates
# (envoy/gen-dev-certs.sh), the command key op-admin-1 (Ed25519, raw hex, secret
# 0600), a JWT HS256 secret, and DIR/filter.json (filter-wasm/config.example.json
# with these keys). Needs openssl and python3 only. Never for production.
#
#   scripts/dev-keys.sh DIR
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:?usage: dev-keys.sh DIR}"
mkdir -p "$dir/keys"
bash "$root/envoy/gen-dev-certs.sh" "$dir/certs" >/dev/null
hexof() { od -An -v -tx1 | tr -d ' \n'; }
if [[ ! -f "$dir/keys/op-admin-1.sk.hex" ]]; then
  (
    umask 077
    pem="$dir/keys/op-admin-1.pem"
    openssl genpkey -algorithm ed25519 -out "$pem"
    # The last 32 bytes of the PKCS#8 / SPKI encodings are the raw seed / public key.
    openssl pkey -in "$pem" -outform DER | tail -c 32 | hexof > "$dir/keys/op-admin-1.sk.hex"
    openssl pkey -in "$pem" -pubout -outform DER | tail -c 32 | hexof > "$dir/keys/op-admin-1.pk.hex"
    rm -f "$pem"
  )
  chmod 644 "$dir/keys/op-admin-1.pk.hex"
fi
if [[ ! -f "$dir/keys/jwt.secret.hex" ]]; then
  (umask 077; openssl rand -hex 32 > "$dir/keys/jwt.secret.hex")
fi
python3 - "$dir" "$root/filter-wasm/config.example.json" <<'PY'
import base64, json, sys
d, example = sys.argv[1], sys.argv[2]
cfg = json.load(open(example))
cfg["command_keys"]["keys"][0]["public_key_hex"] = open(f"{d}/keys/op-admin-1.pk.hex").read().strip()
secret = bytes.fromhex(open(f"{d}/keys/jwt.secret.hex").read().strip())
cfg["jwt"]["jwks"]["keys"][0]["k"] = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
json.dump(cfg, open(f"{d}/filter.json", "w"), indent=2)
PY
