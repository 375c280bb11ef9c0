#!/usr/bin/env bash
# Runs the benchmarks. Each prints ratios against a baseline measured in the same run.
#   bash bench/run.sh            all
#   bash bench/run.sh verify     command verification: dalek vs tables; native vs wasmtime vs V8
#   bash bench/run.sh edge       Envoy: no auth vs jwt_authn vs gw_edge (JWT, signed command)
#   bash bench/run.sh control    ledger rows/s vs raw INSERT RowBinary; commands/s end to end
#                                (GW_BENCH_SKIP_LEDGER=1: only the commands;
#                                GW_BENCH_SKIP_COMMANDS=1: only the ledger;
#                                GW_BENCH_SEQ_ONLY=1: of the commands, one at a time only;
#                                GW_BENCH_SLICE_US=N: the sidecar's scheduling slice, 0 the kernel's)
#   bash bench/run.sh models     predict through the model ABI host vs tl2cgen statically linked
#   bash bench/run.sh sender     tx/s ours vs raw quinn; hedge timing error
#   bash bench/run.sh hotpath    QUIC ingest frame → TPU vs a direct in-process offer (latency)
#   bash bench/run.sh parity     the TPU route vs solana-tpu-client-next against Agave's TPU server
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$GW_ROOT"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
which="${1:-all}"
if [[ "$which" == all || "$which" == verify ]]; then
  log "building the wasm guest"
  cargo build -q --release --target wasm32-wasip1 -p wasm-verify
  log "bench: verify"
  envoy_bin="$(ls "$GW_VENV"/lib/python*/site-packages/envoy/_bin/envoy 2>/dev/null || true)"
  GW_ENVOY="$envoy_bin" cargo bench -q -p gw-bench --bench verify -- --noplot "${@:2}"
fi
if [[ "$which" == all || "$which" == edge ]]; then
  command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }
  bash scripts/setup-venv.sh
  cargo build -q --release --locked -p gwctl
  cargo build -q --release --locked --target wasm32-wasip1 -p gw-filter
  cargo build -q --release --locked -p gw-bench --example native_verify
  log "bench: edge"
  "$GW_VENV/bin/python" bench/edge.py \
    --envoy "$(ls "$GW_VENV"/lib/python*/site-packages/envoy/_bin/envoy)" \
    --wasm "$CARGO_TARGET_DIR/wasm32-wasip1/release/gw_filter.wasm" \
    --gwctl "$CARGO_TARGET_DIR/release/gwctl" \
    --native-verify "$CARGO_TARGET_DIR/release/examples/native_verify" "${@:2}"
fi
if [[ "$which" == all || "$which" == control ]]; then
  bash scripts/setup-venv.sh
  cargo build -q --release --locked --target wasm32-wasip1 -p gw-filter
  log "bench: control"
  cargo bench -q -p gw-bench --bench control
fi
if [[ "$which" == all || "$which" == models ]]; then
  bash scripts/setup-venv.sh
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
  out="$GW_CACHE/bench-models"
  rm -rf "$out"
  # float64: the gateway's LightGBM mev model; float32: an XGBoost regressor of the
  # same size on the same rows.
  "$GW_MODELS_VENV/bin/python" scripts/build-models.py --out "$out/f64" --models mev --git-sha bench \
    --keep-work "$out/f64/work" >/dev/null
  mkdir -p "$out/f32"
  "$GW_MODELS_VENV/bin/python" - "$out" <<'PY'
import json, sys, numpy as np, xgboost as xgb
out = sys.argv[1]
c = json.load(open(f"{out}/f64/mev.check.json"))  # the same rows as the float64 model
x = np.array([[np.nan if v is None else v for v in r] for r in c["rows"]], dtype=np.float32)
rng = np.random.default_rng(3)
xt = rng.normal(size=(5000, 8)).astype(np.float32) * np.nanstd(x, axis=0) + np.nanmean(x, axis=0)
y = xt[:, 0] * np.minimum(xt[:, 1], 12) - 4 * xt[:, 4] + rng.normal(0, 2, 5000)
b = xgb.train({"objective": "reg:squarederror", "max_depth": 5, "eta": 0.08, "seed": 1},
              xgb.DMatrix(xt, label=y), 120)
b.save_model(f"{out}/f32/xgb.json")
np.save(f"{out}/f32/rows.npy", x)
json.dump({"rows": c["rows"]}, open(f"{out}/f32/rows.json", "w"))
PY
  "$GW_MODELS_VENV/bin/python" abi/build_model.py --name mev --xgboost "$out/f32/xgb.json" \
    --rows "$out/f32/rows.npy" --out "$out/f32" --version bench --activate \
    --keep-c "$out/f32/work/mev-c" >/dev/null
  log "bench: models"
  GW_MODEL_C_DIR_F64="$out/f64/work/mev-c" GW_MODEL_C_DIR_F32="$out/f32/work/mev-c" \
    GW_BENCH_MODELS="$out" cargo bench -q -p gw-bench --bench models
fi
if [[ "$which" == all || "$which" == sender ]]; then
  log "bench: sender"
  cargo bench -q -p gw-bench --bench sender
fi
if [[ "$which" == all || "$which" == hotpath ]]; then
  log "bench: hotpath"
  cargo bench -q -p gw-bench --bench hotpath
fi
if [[ "$which" == all || "$which" == parity ]]; then
  bash scripts/build-agave-tpu.sh
  log "bench: parity (TPU route vs solana-tpu-client-next, Agave's server)"
  cargo bench -q -p gw-bench --bench tpu_parity
fi
