#!/usr/bin/env bash
# Writes the seed corpora under fuzz/corpus/ (committed; rerun to refresh them):
# commands signed by gwctl, tokens minted by gwctl, the example configurations,
# Solana transactions made by solders, edge reports as the filter sends them.
# Needs a built gwctl and the project venv (scripts/setup-venv.sh).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$GW_ROOT"
gwctl="$CARGO_TARGET_DIR/debug/gwctl"
[[ -x "$gwctl" ]] || cargo build -q -p gwctl
c=fuzz/corpus
rm -rf "$c" && mkdir -p "$c"/{command,ed25519_differential,jwt,filter_config,rpc_transaction,edge_report,sidecar_config,journal_segment}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
printf '07%.0s' $(seq 32) > "$tmp/fuzz.sk.hex"   # the key fuzz_targets/command.rs trusts

i=0
for spec in "mev throttle --arg throttle_pct=40" "arbitrage start" "mev policy --arg ev_min=0.2 --arg tip_ladder=0.1,0.2" \
            "arbitrage kill" "mev restart" "arbitrage stop"; do
  set -- $spec
  "$gwctl" sign --key "$tmp/fuzz.sk.hex" --key-id fuzz --module "$1" --action "$2" "${@:3}" \
    --issuer dashboard --ts 1750000000 --nonce $((1000 + i)) --request-id "seed-$i" --out "$tmp/cmd$i.bin" 2>/dev/null
  i=$((i + 1))
done
"$GW_VENV/bin/python" - "$tmp" "$c" <<'PY'
import base64, glob, hashlib, hmac, json, os, sys
tmp, c = sys.argv[1], sys.argv[2]

def put(target, data):
    name = hashlib.sha1(data).hexdigest()[:16]
    open(os.path.join(c, target, name), "wb").write(data)

def varint(buf, pos):
    v = shift = 0
    while True:
        b = buf[pos]; pos += 1
        v |= (b & 0x7f) << shift; shift += 7
        if not b & 0x80:
            return v, pos

def records(buf):
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            _, pos = varint(buf, pos)
        elif wt == 2:
            n, pos = varint(buf, pos); pos += n
        else:
            raise SystemExit(f"unexpected wire type {wt}")
        yield field, buf[start:pos]

for path in sorted(glob.glob(f"{tmp}/cmd*.bin")):
    body = open(path, "rb").read()
    put("command", b"\x00" + body)
    payload = b"".join(r for f, r in records(body) if f not in (8, 9, 10))
    put("command", b"\x01" + payload)

# ed25519_differential: mode, seed or key, flip, message.
for n in range(4):
    put("ed25519_differential", bytes([1]) + bytes([n + 1]) * 32 + bytes([n, 0]) + b"control command %d" % n)
put("ed25519_differential", bytes([0]) + bytes(32) + bytes(64) + b"zero key")

# jwt: mode 0 tokens (HS256 by the fuzz key, and alg tricks), mode 1 claims.
secret = b"fuzz-secret-fuzz-secret-fuzz-secret!"
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
claims = {"iss": "fuzz", "aud": "gw", "sub": "op", "roles": ["admin"], "iat": 1750000000, "exp": 1750003600}
for head in ({"alg": "HS256", "kid": "k1"}, {"alg": "none"}, {"alg": "HS256", "crit": ["x"]}, {"alg": "ES256", "kid": "k1"}):
    signing = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    put("jwt", b"\x00" + f"{signing}.{b64(sig)}".encode())
for extra in ({}, {"nbf": 1750000100}, {"iat": 1750090000}, {"aud": ["x", "gw"]}, {"roles": "admin operator"}, {"exp": "soon"}):
    put("jwt", b"\x01" + json.dumps({**claims, **extra}).encode())

# filter_config: the example (verify stage; with keys in place of its
# placeholders, so that the rest of it is read) and a stamp stage.
example = json.loads(open("filter-wasm/config.example.json", "rb").read())
example["edge_key_hex"] = "ab" * 32
example["command_keys"]["keys"][0]["public_key_hex"] = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
example["jwt"]["jwks"]["keys"][0]["k"] = "YWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWI"
put("filter_config", json.dumps(example, indent=2).encode())
put("filter_config", json.dumps({"stage": "stamp"}).encode())
cfg = dict(example); cfg["routes"] = cfg["routes"] + [{"prefix": "/x", "role": "viewer", "methods": ["GET"]}]
put("filter_config", json.dumps(cfg).encode())

# sidecar_config: the example and one with a sender.
sc = json.loads(open("sidecar/config.example.json", "rb").read())
sc["command_keys"]["keys"][0]["public_key_hex"] = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
put("sidecar_config", json.dumps(sc, indent=2).encode())
s = dict(sc); s["sender"] = {"tpu": {}, "relay": {"url": "http://127.0.0.1:8010"},
    "leaders": {"static": [{"tpu_quic": "127.0.0.1:8009", "identity": "11111111111111111111111111111111"}]}, "hedge_delay_ms": 10}
put("sidecar_config", json.dumps(s).encode())

# edge_report: a batch as the filter posts it.
raw = open(sorted(glob.glob(f"{tmp}/cmd*.bin"))[0], "rb").read()
batch = [{"decision": "rejected", "code": "replay", "path": "/api/control/commands", "raw_hex": raw.hex(),
          "ts_ms": 1750000000000, "requester": "op", "requester_roles": "admin", "token_issuer": "defi-dashboard"},
         {"decision": "accepted", "code": "", "path": "/api/control/commands", "raw_hex": "", "ts_ms": 1}]
put("edge_report", json.dumps(batch).encode())
put("edge_report", b"[]")
# With report ids, as the filter sends them since 2026-12-06.
put("edge_report", json.dumps([dict(batch[0], id="00000000deadbeef-1f"),
                               dict(batch[0], id="00000000deadbeef-20", raw_hex="", raw_len=70000)]).encode())

# journal_segment: records as the journal frames them (len u32 | crc32 of LSN and
# payload u32 | LSN u64 | payload, little-endian; payload: version 2, then JSON),
# over zeros written ahead; then torn (the file cut, a sector unwritten) and damaged.
import struct, zlib
def frame(lsn, payload):
    l = struct.pack("<Q", lsn)
    return struct.pack("<II", len(payload), zlib.crc32(l + payload)) + l + payload
recs = b"".join(frame(i, b"\x02" + json.dumps({"entries": [{"forwarded": {"lsn": i}}]}).encode()) for i in range(1, 4))
big = frame(4, b"\x02" + json.dumps({"entries": [{"forwarded": {"lsn": 4}}], "pad": "x" * 900}).encode())
put("journal_segment", recs + bytes(2048))
put("journal_segment", recs + big + bytes(1024))
put("journal_segment", (recs + big)[:512])
torn = bytearray(recs + big + bytes(1024)); torn[512:1024] = bytes(512)
put("journal_segment", bytes(torn))
bad = bytearray(recs + bytes(1024)); bad[40] ^= 1
put("journal_segment", bytes(bad))
PY
# rpc_transaction: solders transactions, raw (mode 0), base58 (1), base64 (2).
"$GW_VENV/bin/python" sidecar/tests/py/solana_txs.py 2 | "$GW_VENV/bin/python" -c '
import hashlib, json, os, sys
for line in sys.stdin:
    t = json.loads(line)
    for data in (b"\x00" + bytes.fromhex(t["hex"]), b"\x01" + t["b58"].encode(), b"\x02" + t["b64"].encode()):
        open(os.path.join(sys.argv[1], hashlib.sha1(data).hexdigest()[:16]), "wb").write(data)
' "$c/rpc_transaction"
for d in "$c"/*; do echo "$(basename "$d"): $(ls "$d" | wc -l) seeds"; done
