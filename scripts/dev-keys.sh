#!/usr/bin/env bash
# Makes (once) the development secrets of a gateway in DIR: TLS certificates
# (envoy/gen-dev-certs.sh), Ed25519 keys as raw hex (secrets 0600): the command key
# op-admin-1, the ledger checkpoint key, the sender's TPU identity (tpu-identity:
# its QUIC certificate to leaders and to searchers), the development TPU's
# (tpu-sink) and a searcher's (searcher), the ClickHouse users (gw_admin, gw_sidecar;
# passwords 0600), a JWT HS256 secret, the edge key (edge.key.hex: the filter seals
# its stamp with it, the sidecar checks the seal; GW_EDGE_KEY_HEX), and
# DIR/filter.json (filter-wasm/config.example.json with these keys). Needs openssl and python3 only.
# Never for production.
#
#   scripts/dev-keys.sh DIR
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:?usage: dev-keys.sh DIR}"
mkdir -p "$dir/keys"
bash "$root/envoy/gen-dev-certs.sh" "$dir/certs" >/dev/null
hexof() { od -An -v -tx1 | tr -d ' \n'; }
# An Ed25519 key pair as raw hex: DIR/keys/NAME.sk.hex (0600) and NAME.pk.hex (the
# public key of an existing seed too).
ed25519_pair() {
  local sk="$dir/keys/$1.sk.hex" pk="$dir/keys/$1.pk.hex"
  [[ -f "$sk" && -f "$pk" ]] && return 0
  (
    umask 077
    # The last 32 bytes of the PKCS#8 / SPKI encodings are the raw seed / public key.
    [[ -f "$sk" ]] || openssl genpkey -algorithm ed25519 -outform DER | tail -c 32 | hexof > "$sk"
    der="302e020100300506032b657004220420$(tr -d ' \n' < "$sk")"
    # shellcheck disable=SC2059  # the format is the key's bytes as \x escapes
    printf "$(sed 's/../\\x&/g' <<< "$der")" \
      | openssl pkey -inform DER -pubout -outform DER | tail -c 32 | hexof > "$pk"
  )
  chmod 644 "$pk"
}
ed25519_pair op-admin-1
# The key that signs ledger checkpoints (GW_LEDGER_SK_HEX; gwctl ledger verify --key).
ed25519_pair ledger
# The transaction sender (GW_TPU_IDENTITY_HEX), the development TPU it sends to
# (gw-tpu-sink) and the searcher allowed on its QUIC ingest.
ed25519_pair tpu-identity
ed25519_pair tpu-sink
ed25519_pair searcher
# ClickHouse: the administrator's and the sidecar's passwords, and the users file
# both shapes are made from (scripts/clickhouse-users.py).
for who in clickhouse-admin clickhouse-sidecar; do
  [[ -f "$dir/keys/$who.pw" ]] || (umask 077; openssl rand -hex 24 > "$dir/keys/$who.pw")
done
for shape in standalone users-d; do
  python3 "$root/scripts/clickhouse-users.py" --"$shape" -o "$dir/clickhouse-users.$shape.xml" \
    --admin-password-file "$dir/keys/clickhouse-admin.pw" \
    --sidecar-password-file "$dir/keys/clickhouse-sidecar.pw"
done
for secret in jwt.secret edge.key; do
  [[ -f "$dir/keys/$secret.hex" ]] || (umask 077; openssl rand -hex 32 > "$dir/keys/$secret.hex")
done
python3 - "$dir" "$root/filter-wasm/config.example.json" <<'PY'
import base64, json, os, sys
d, example = sys.argv[1], sys.argv[2]
cfg = json.load(open(example))
cfg["command_keys"]["keys"][0]["public_key_hex"] = open(f"{d}/keys/op-admin-1.pk.hex").read().strip()
secret = bytes.fromhex(open(f"{d}/keys/jwt.secret.hex").read().strip())
cfg["jwt"]["jwks"]["keys"][0]["k"] = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
cfg["edge_key_hex"] = open(f"{d}/keys/edge.key.hex").read().strip()
# It holds the JWT secret and the edge key: readable by its owner only.
fd = os.open(f"{d}/filter.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.fchmod(fd, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump(cfg, f, indent=2)
PY
