#!/usr/bin/env bash
# Brings the local gateway up on 127.0.0.1: Envoy (HTTP/3 on UDP 8443, HTTP/2 +
# HTTP/1.1 on TCP 8443) running the gw_edge filter, in front of the sidecar on
# 127.0.0.1:8080 (re-verifies, keeps the durable replay guard, applies commands),
# which audits every decision into ClickHouse 26.9 on 127.0.0.1:8123.
# Commands travel from admission to the module agents over the embedded in-process
# bus, or with --kafka over a real Kafka-protocol broker (tansu, 127.0.0.1:9092;
# topic control-commands-proto, consumer groups ctrl-proto-{module}), which
# ClickHouse's Kafka engine also reads into control_ledger (sql/14).
# The sidecar's transaction sender is on: JSON-RPC at /api/rpc and opportunities at
# /api/opportunities, sending over QUIC to a local TPU (gw-tpu-sink, UDP 8009) and
# hedging to a local Jito-style relay (gw-dev-relay, 8010); sends audited in tx_sends.
# Searchers reach the hot path over QUIC (UDP 8011, ALPN gw-opportunities): only the
# dev searcher key ($run/keys/searcher.sk.hex) is allow-listed.
# Dev keys, a JWT secret and TLS certificates are made once under .run/. Ctrl-C
# stops everything.
#
#   bash scripts/run-gateway.sh [--kafka]           run in the foreground
#   bash scripts/run-gateway.sh [--kafka] --smoke   start, send signed commands, check, stop (CI)
#   bash scripts/run-gateway.sh --smoke --hostile   …then the hostile-input suite (tests/hostile/)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$GW_ROOT"
# The processes started here take their secrets from files (the *_FILE
# variables, as compose gives them); the sidecar refuses a secret given both
# ways, so one left exported in the caller's shell is not passed on.
unset GW_CLICKHOUSE_PASSWORD CTRL_SIGN_SK_HEX GW_LEDGER_SK_HEX GW_TPU_IDENTITY_HEX \
  GW_RELAY_AUTH GW_STATE_SK_HEX GW_EDGE_KEY_HEX GW_EDGE_KEY_PREV_HEX GW_TPU_SINK_IDENTITY_HEX
smoke=0
kafka=0
hostile=0
for a in "$@"; do
  case "$a" in
    --smoke) smoke=1 ;;
    --kafka) kafka=1 ;;
    --hostile) hostile=1 ;;
    *) die "usage: run-gateway.sh [--kafka] [--smoke [--hostile]]" ;;
  esac
done

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
fi
bash scripts/setup-venv.sh
(( kafka )) && bash scripts/install-tansu.sh
log "building gwctl, the sidecar and the filter"
cargo build --release --locked -q -p gwctl -p gw-sidecar
cargo build --release --locked -q -p testkit --bin gw-dev-relay --bin gw-tpu-sink
cargo build --release --locked -q --target wasm32-wasip1 -p gw-filter
bin="$CARGO_TARGET_DIR/release"
run="$GW_ROOT/.run"
bash scripts/dev-keys.sh "$run"
# Rebuilt when missing or built before ABI v2 (no golden vectors: the sidecar
# refuses those unless models.allow_unverified).
if [[ ! -e "$run/models/libmev_latest.so" || ! -e "$run/models/libarb_latest.so" \
      || "$(cat "$run/models/.abi" 2>/dev/null)" != 2 ]]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
  log "building the tree models (LightGBM → tl2cgen → CMake) into $run/models"
  "$GW_MODELS_VENV/bin/python" scripts/build-models.py --out "$run/models" >/dev/null
  echo 2 > "$run/models/.abi"
fi
cp "$CARGO_TARGET_DIR/wasm32-wasip1/release/gw_filter.wasm" "$run/gw_filter.wasm"
"$GW_VENV/bin/python" envoy/render.py --filter-config "$run/filter.json" \
  --set GW_TLS_CERT="$run/certs/server.pem" --set GW_TLS_KEY="$run/certs/server.key" \
  --set GW_FILTER_WASM="$run/gw_filter.wasm" --set GW_ADMIN_SOCKET="$run/envoy-admin.sock" -o "$run/envoy.yaml"
envoy_bin=$(ls "$GW_VENV"/lib/python*/site-packages/envoy/_bin/envoy)
"$envoy_bin" --mode validate -c "$run/envoy.yaml" >"$run/validate.log" 2>&1 || { cat "$run/validate.log"; die "envoy rejected $run/envoy.yaml"; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
"$GW_VENV/bin/python" scripts/clickhouse-server.py --data "$run/clickhouse" --http-port 8123 --tcp-port 9000 \
  --users "$run/clickhouse-users.standalone.xml" > "$run/clickhouse.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:8123/ping >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf http://127.0.0.1:8123/ping >/dev/null || die "clickhouse did not start; see $run/clickhouse.log"
# The tables, created by the administrator; the sidecar writes as gw_sidecar
# (SELECT, INSERT on its tables only).
ch_admin_pw="$(cat "$run/keys/clickhouse-admin.pw")"
# The administrator's credentials go to curl in a file only its owner reads: a
# command line is readable by every local user (/proc/*/cmdline).
(umask 077; printf 'header = "X-ClickHouse-User: gw_admin"\nheader = "X-ClickHouse-Key: %s"\n' "$ch_admin_pw" \
  > "$run/keys/clickhouse-admin.curl")
chq() { curl -sf -K "$run/keys/clickhouse-admin.curl" "http://127.0.0.1:8123/?query=$1"; }
GW_CLICKHOUSE_URL=http://127.0.0.1:8123 GW_CLICKHOUSE_USER=gw_admin \
  GW_CLICKHOUSE_PASSWORD_FILE="$run/keys/clickhouse-admin.pw" "$bin/gw-sidecar" --setup-clickhouse >/dev/null || die "creating the ClickHouse tables failed"
brokers=""
if (( kafka )); then
  brokers=127.0.0.1:9092
  "$GW_CACHE/tansu/bin/tansu" broker --listener-url tcp://$brokers --advertised-listener-url tcp://$brokers \
    --storage-engine memory://tansu/ > "$run/tansu.log" 2>&1 & pids+=($!)
  for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 0.1; done
  (echo > /dev/tcp/127.0.0.1/9092) 2>/dev/null || die "kafka (tansu) did not start; see $run/tansu.log"
fi
# The sender's local peers: a TPU that enforces the protocol (its identity the dev
# key tpu-sink, pinned by the sender), and a relay. Their logs go first: a log left
# by an earlier run (the smoke runs share .run) must not pass for this one's before
# the new process has truncated it.
rm -f "$run/tpu-sink.log" "$run/relay.log"
GW_TPU_SINK_IDENTITY_FILE="$run/keys/tpu-sink.sk.hex" \
  "$bin/gw-tpu-sink" 127.0.0.1:8009 > "$run/tpu-sink.log" 2>&1 & pids+=($!)
"$bin/gw-dev-relay" 127.0.0.1:8010 > "$run/relay.log" 2>&1 & pids+=($!)
for _ in $(seq 1 300); do grep -q identity "$run/tpu-sink.log" 2>/dev/null && break; sleep 0.1; done
grep -q identity "$run/tpu-sink.log" || die "gw-tpu-sink did not start; see $run/tpu-sink.log"
"$GW_VENV/bin/python" scripts/sidecar-config.py --keys "$run/keys" --filter-config "$run/filter.json" --tpu 127.0.0.1:8009 \
  --relay http://127.0.0.1:8010 --ingest 127.0.0.1:8011 -o "$run/sidecar.json"
# Secrets as files (the *_FILE variables), as compose gives them.
GW_TPU_IDENTITY_HEX_FILE="$run/keys/tpu-identity.sk.hex" \
GW_MODELS_DIR="$run/models" GW_KAFKA_BROKERS="$brokers" GW_CLICKHOUSE_URL=http://127.0.0.1:8123 \
  GW_CLICKHOUSE_USER=gw_sidecar GW_CLICKHOUSE_PASSWORD_FILE="$run/keys/clickhouse-sidecar.pw" CTRL_PUBKEY_ID=op-admin-1 \
  CTRL_SIGN_SK_HEX_FILE="$run/keys/op-admin-1.sk.hex" GW_LEDGER_SK_HEX_FILE="$run/keys/ledger.sk.hex" \
  GW_EDGE_KEY_FILE="$run/keys/edge.key.hex" GW_SIDECAR_LISTEN=127.0.0.1:8080 \
  "$bin/gw-sidecar" --config "$run/sidecar.json" & pids+=($!)
"$envoy_bin" -c "$run/envoy.yaml" --concurrency 2 --disable-hot-restart --log-level warn & pids+=($!)
for _ in $(seq 1 100); do
  curl -sf --unix-socket "$run/envoy-admin.sock" http://admin/ready >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf --unix-socket "$run/envoy-admin.sock" http://admin/ready >/dev/null || die "envoy did not become ready"
if (( kafka )); then
  # The original Kafka-engine path (raw topic → control_ledger), beside the verified ledger.
  mkdir -p "$run/clickhouse/format_schemas"
  cp proto/control.proto "$run/clickhouse/format_schemas/control.proto"
  for _ in $(seq 1 50); do
    [[ $(chq 'EXISTS+TABLE+control_ledger' || true) == 1 ]] && break; sleep 0.2
  done
  CH_ADMIN_PW="$ch_admin_pw" "$GW_VENV/bin/python" - "$run/clickhouse/format_schemas" "$brokers" <<'PY' || die "applying sql/14 failed"
import os, sys, urllib.request
schemas, brokers = sys.argv[1], sys.argv[2]
auth = {"X-ClickHouse-User": "gw_admin", "X-ClickHouse-Key": os.environ["CH_ADMIN_PW"]}
sql = open("sql/14_control_proto_kafka.sql").read().replace("{kafka_brokers}", brokers).replace("{format_schemas}", schemas)
body = "\n".join(l for l in sql.splitlines() if not l.lstrip().startswith("--"))
for stmt in filter(None, (s.strip().rstrip(";") for s in body.split(";\n"))):
    urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:8123/", stmt.encode(), auth)).read()
PY
fi

token=$("$bin/gwctl" jwt --secret-file "$run/keys/jwt.secret.hex" --sub "${USER:-operator}-dev" --role admin --ttl 8h --kid dev)
(umask 077; rm -f "$run/admin.jwt"; echo "$token" > "$run/admin.jwt")
# A fresh demo command each start (gwctl sign never writes over a command file).
rm -f "$run/throttle.bin"
"$bin/gwctl" sign --key "$run/keys/op-admin-1.sk.hex" --key-id op-admin-1 --module mev \
  --action throttle --arg throttle_pct=40 --issuer dashboard --out "$run/throttle.bin" 2>/dev/null
cat <<MSG

Gateway is up: https://localhost:8443 (HTTP/3 over UDP, HTTP/2 + HTTP/1.1 over TLS)
  console:            https://localhost:8443/ (log in with the admin token; the dev CA
                      is not in your browser's store: accept the warning or import $run/certs/ca.pem)
  admin token (8h):   $run/admin.jwt
  dev CA:             $run/certs/ca.pem
  command key:        $run/keys/op-admin-1.sk.hex (id op-admin-1)

Send a signed command over HTTP/3:
  $bin/gwctl send https://127.0.0.1:8443/api/control/commands $run/throttle.bin \\
      --token-file $run/admin.jwt --ca $run/certs/ca.pem
Sign another:
  $bin/gwctl sign --key $run/keys/op-admin-1.sk.hex --key-id op-admin-1 --module mev \\
      --action policy --arg ev_min=0.2 --arg tip_ladder=0.1,0.2 --issuer dashboard --out cmd.bin
JSON route (the sidecar signs):
  curl -s --cacert $run/certs/ca.pem -H "authorization: Bearer \$(cat $run/admin.jwt)" \
      -H 'content-type: application/json' -d '{"throttle_pct": 50}' \
      https://localhost:8443/api/control/module/arbitrage:throttle
Models:          curl -s --cacert $run/certs/ca.pem -H "authorization: Bearer \$(cat $run/admin.jwt)" https://localhost:8443/api/models
                 (rebuild: $GW_MODELS_VENV/bin/python scripts/build-models.py --out $run/models; the sidecar swaps them in)
Module state:    curl -s --cacert $run/certs/ca.pem -H "authorization: Bearer \$(cat $run/admin.jwt)" https://localhost:8443/api/modules
Send a Solana transaction (JSON-RPC sendTransaction, base58 or base64):
  curl -s --cacert $run/certs/ca.pem -H "authorization: Bearer \$(cat $run/admin.jwt)" \
      -H 'content-type: application/json' https://localhost:8443/api/rpc \
      -d '{"jsonrpc":"2.0","id":1,"method":"sendTransaction","params":["<tx>",{"encoding":"base64"}]}'
  (any Solana client works with the URL https://localhost:8443/api/rpc and that header)
Searcher (QUIC ingest, UDP 8011; an aioquic client with the dev searcher key):
  $GW_VENV/bin/python tests/searcher/searcher.py --endpoint 127.0.0.1:8011 --key $run/keys/searcher.sk.hex \\
      --server-identity \$(cat $run/keys/tpu-identity.pk.hex) --module arbitrage \\
      --features 14,10.5,9,0.3,0.8,2,8,3 <tx hex> …   (the arbitrage model scores 8 features)
Sender status:   curl -s --cacert $run/certs/ca.pem -H "authorization: Bearer \$(cat $run/admin.jwt)" https://localhost:8443/api/sender
                 local TPU: $run/tpu-sink.log   relay: $run/relay.log
ClickHouse:      user gw_admin, password in $run/keys/clickhouse-admin.pw (the sidecar writes as gw_sidecar)
Sends audited:   curl -s -K $run/keys/clickhouse-admin.curl 'http://127.0.0.1:8123/?query=SELECT+signature,route,hedged,outcome,latency_us+FROM+tx_sends+ORDER+BY+ts_us'
Bus:             ${brokers:-in-process (start with --kafka for Kafka)}
Edge decisions:  curl -s --unix-socket $run/envoy-admin.sock http://admin/stats?filter=gw_edge
Audit ledger:    curl -s -K $run/keys/clickhouse-admin.curl 'http://127.0.0.1:8123/?query=SELECT+seq,stage,decision,code,request_id+FROM+control_decisions+ORDER+BY+seq'
                 GW_CLICKHOUSE_USER=gw_admin GW_CLICKHOUSE_PASSWORD_FILE=$run/keys/clickhouse-admin.pw \\
                 $bin/gwctl ledger verify --clickhouse http://127.0.0.1:8123 \
                   --checkpoint .run/sidecar/ledger/checkpoints.log --key @.run/keys/ledger.pk.hex
MSG

if (( smoke )); then
  export GW_CLICKHOUSE_USER=gw_admin GW_CLICKHOUSE_PASSWORD_FILE="$run/keys/clickhouse-admin.pw"   # for gwctl ledger verify
  count() { chq 'SELECT+count()+FROM+control_decisions' || echo 0; }
  n0=$(count)
  kcount() { chq 'SELECT+count()+FROM+control_ledger' || echo 0; }
  k0=$(kcount)
  out=$("$bin/gwctl" send https://127.0.0.1:8443/api/control/commands "$run/throttle.bin" --token-file "$run/admin.jwt" --ca "$run/certs/ca.pem")
  echo "$out" | head -1
  echo "$out" | grep -q '"applied":true' || die "smoke: the sidecar did not apply the command: $out"
  # The same bytes again: refused as a replay, and gwctl exits 0 (applied before).
  again=$("$bin/gwctl" send https://127.0.0.1:8443/api/control/commands "$run/throttle.bin" --token-file "$run/admin.jwt" --ca "$run/certs/ca.pem" --http2) \
    || die "smoke: gwctl send of an applied command's bytes did not exit 0: $again"
  echo "$again" | head -1 | grep -q '409' || die "smoke: a replay was not refused: $again"
  json=$(curl -sS --cacert "$run/certs/ca.pem" -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"throttle_pct": 50}' https://localhost:8443/api/control/module/arbitrage:throttle)
  echo "$json" | grep -q '"applied":true' || die "smoke: the JSON route failed: $json"
  modules=$(curl -sf --cacert "$run/certs/ca.pem" -H "authorization: Bearer $token" https://localhost:8443/api/modules)
  echo "$modules" | grep -q '"mev":{[^}]*"throttle_pct":40' || die "smoke: mev did not change: $modules"
  echo "$modules" | grep -q '"arbitrage":{[^}]*"throttle_pct":50' || die "smoke: arbitrage did not change: $modules"
  # For each of the two commands: edge accepted, sidecar accepted, agent applied;
  # and the resend: the edge lets the same bytes through, the sidecar refuses them
  # as a replay: 8 rows.
  for _ in $(seq 1 50); do
    n=$(( $(count) - n0 ))
    (( n >= 8 )) && break
    sleep 0.2
  done
  (( n >= 8 )) || die "smoke: expected 8 new audited decisions in ClickHouse, found $n"
  replays=$(chq "SELECT+count()+FROM+control_decisions+WHERE+stage='sidecar'+AND+code='replay'" || echo 0)
  (( replays >= 1 )) || die "smoke: the replay's refusal is not in the ledger"
  # The JSON route retried with its Idempotency-Key, through Envoy: applied once.
  idem() { curl -sS --cacert "$run/certs/ca.pem" -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -H "idempotency-key: smoke-$$" -d '{"throttle_pct": 60}' https://localhost:8443/api/control/module/arbitrage:throttle; }
  first=$(idem)
  echo "$first" | grep -q '"applied":true' || die "smoke: the JSON route with an idempotency key failed: $first"
  retry=$(idem)
  echo "$retry" | grep -q '"error":"replay"' && echo "$retry" | grep -q '"applied":true' \
    || die "smoke: a retry with the same idempotency key was not answered as the first: $retry"
  "$bin/gwctl" ledger verify --clickhouse http://127.0.0.1:8123 || die "smoke: the ledger chain does not verify"
  models=$(curl -sf --cacert "$run/certs/ca.pem" -H "authorization: Bearer $token" https://localhost:8443/api/models)
  echo "$models" | grep -q '"name":"mev"' || die "smoke: no mev model serving: $models"
  score=$(curl -sS --cacert "$run/certs/ca.pem" -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"rows": [[12, 10, 9, 0.3, 0.5, 2, 8, null]]}' https://localhost:8443/api/models/mev/predict)
  echo "$score" | grep -q '"outputs":\[\[' || die "smoke: the mev model did not score: $score"
  log "smoke: models serving through the C ABI: $score"
  # A model from each training library through the README's pipeline into this gateway.
  "$GW_MODELS_VENV/bin/python" scripts/smoke-models.py "$run" "$run/admin.jwt" \
    || die "smoke: a model did not go through the pipeline into the gateway"
  # A real Solana transaction (solders) through Envoy's JSON-RPC route to the local TPU.
  # (RPC sends follow arbitrage's state: start it, and undo the 50 % above.)
  for step in 'start {}' 'throttle {"throttle_pct": 100}'; do
    json=$(curl -sS --cacert "$run/certs/ca.pem" -H "authorization: Bearer $token" -H 'content-type: application/json' \
      -d "${step#* }" "https://localhost:8443/api/control/module/arbitrage:${step%% *}")
    echo "$json" | grep -q '"applied":true' || die "smoke: the JSON route failed: $json"
  done
  "$GW_VENV/bin/python" sidecar/tests/py/solana_txs.py 1 > "$run/smoke-txs.jsonl"
  tx=$(sed -n 1p "$run/smoke-txs.jsonl")
  b64=$(echo "$tx" | "$GW_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["b64"])')
  sig=$(echo "$tx" | "$GW_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["signature"])')
  sent=$(curl -sS --cacert "$run/certs/ca.pem" -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"sendTransaction\",\"params\":[\"$b64\",{\"encoding\":\"base64\",\"skipPreflight\":true}]}" \
    https://localhost:8443/api/rpc)
  echo "$sent" | grep -q "\"result\":\"$sig\"" || die "smoke: sendTransaction did not answer the signature $sig: $sent"
  for _ in $(seq 1 50); do grep -q "tx $sig" "$run/tpu-sink.log" && break; sleep 0.1; done
  grep -q "tx $sig" "$run/tpu-sink.log" || die "smoke: the transaction did not reach the local TPU"
  for _ in $(seq 1 50); do
    a=$(chq "SELECT+count()+FROM+tx_sends+WHERE+signature='$sig'" || echo 0)
    (( a >= 1 )) && break
    sleep 0.2
  done
  (( a >= 1 )) || die "smoke: the send is not audited in tx_sends"
  log "smoke: solders transaction $sig sent through Envoy → sidecar → QUIC TPU, audited"
  # A searcher (aioquic) offers the other solders transaction to the hot path over
  # the QUIC ingest; a key not on the allow-list is refused at the handshake.
  tx2=$(sed -n 2p "$run/smoke-txs.jsonl")
  hex2=$(echo "$tx2" | "$GW_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["hex"])')
  sig2=$(echo "$tx2" | "$GW_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["signature"])')
  searcher=("$GW_VENV/bin/python" tests/searcher/searcher.py --endpoint 127.0.0.1:8011
    --server-identity "$(cat "$run/keys/tpu-identity.pk.hex")" --module arbitrage
    --features 14,10.5,9,0.3,0.8,2,8,3)
  "${searcher[@]}" --key "$run/keys/searcher.sk.hex" "$hex2" || die "smoke: the searcher could not send over the QUIC ingest"
  for _ in $(seq 1 50); do grep -q "tx $sig2" "$run/tpu-sink.log" && break; sleep 0.1; done
  grep -q "tx $sig2" "$run/tpu-sink.log" || die "smoke: the searcher's opportunity did not reach the local TPU"
  openssl rand -hex 32 > "$run/stranger.sk.hex"
  "${searcher[@]}" --key "$run/stranger.sk.hex" --expect-refused "$hex2" > /dev/null \
    || die "smoke: a searcher key not on the allow-list was served"
  log "smoke: a searcher's opportunity (aioquic, QUIC ingest) reached the local TPU as $sig2; a stranger was refused"
  # The chain against its signed checkpoint (written every checkpoint_every_secs).
  for _ in $(seq 1 100); do [[ -s "$run/sidecar/ledger/checkpoints.log" ]] && break; sleep 0.2; done
  "$bin/gwctl" ledger verify --clickhouse http://127.0.0.1:8123 \
    --checkpoint "$run/sidecar/ledger/checkpoints.log" --key "@$run/keys/ledger.pk.hex" \
    || die "smoke: the ledger does not match its signed checkpoint"
  log "smoke: $n decisions audited in ClickHouse, chain verified against its signed checkpoint"
  if (( kafka )); then
    for _ in $(seq 1 100); do
      k=$(( $(kcount) - k0 ))
      (( k >= 2 )) && break
      sleep 0.3
    done
    (( k >= 2 )) || die "smoke: the Kafka engine did not ingest the published commands ($k rows)"
    log "smoke: commands crossed Kafka; ClickHouse's Kafka engine ingested $k into control_ledger"
  fi
  log "smoke: signed command applied once over HTTP/3 (mev 40%), replay refused over HTTP/2, JSON route signed and applied (arbitrage 50%), its retry with an idempotency key answered as the first"
  # The live stream through Envoy on all three protocols, then the console in a
  # real browser (Debian's Chromium, playwright-core from tests/console's lock file).
  timeout 120 "$GW_VENV/bin/python" tests/console/realtime.py --run "$run" --gwctl "$bin/gwctl" \
    --python "$GW_VENV/bin/python" || die "smoke: /api/realtime through Envoy failed"
  command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
  (cd tests/console && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || die "npm ci in tests/console failed"
  timeout 180 node tests/console/browser.mjs --run "$run" --gwctl "$bin/gwctl" --out "$run/screenshots" \
    || die "smoke: the console's browser test failed (screenshots in $run/screenshots)"
  if (( hostile )); then
    log "hostile-input suite (tests/hostile/hostile.py)"
    timeout 600 "$GW_VENV/bin/python" tests/hostile/hostile.py --run "$run" || die "the hostile-input suite failed"
    timeout 300 "$GW_VENV/bin/python" tests/hostile/replay_order.py --run "$run" || die "the replay-order test failed"
    "$bin/gwctl" ledger verify --clickhouse http://127.0.0.1:8123 \
      || die "the ledger does not verify after the hostile-input suite"
  fi
  exit 0
fi
echo "Ctrl-C to stop."
wait
