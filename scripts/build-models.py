#!/usr/bin/env python3
"""Trains the gateway's two demo tree models (LightGBM) and puts each through the
model pipeline, abi/build_model.py: Treelite + tl2cgen, golden vectors, CMake
(abi/CMakeLists.txt), checked against LightGBM, activated (abi/activate.sh).
Runs in the model toolchain's venv ($GW_MODELS_VENV, abi/requirements.txt).

  build-models.py --out DIR [--git-sha SHA] [--seed N] [--fault N]

DIR receives libmev_v<SHA>.so, libarb_v<SHA>.so, the libmev_latest.so /
libarb_latest.so links, and per model <name>.check.json: rows and the training
library's own predictions for them (tests compare the ABI host against these).

The data (documented generator, fixed seed): one row per trading opportunity, 8
features, float32:
  0 spread_bps        N(12, 6)      price gap between venues, basis points
  1 depth_log         N(10, 1.5)    log of the shallower pool's depth, USD
  2 gas_lamports_log  N(9, 0.7)     log of the priority fee needed to land
  3 slot_phase        U(0, 1)       position inside the leader's 4-slot window
  4 volatility        |N(0, 1)|     recent mid-price volatility (z)
  5 hops              U{2, 3, 4}    legs of the route
  6 tip_log           N(8, 1)       log of the relay tip offered
  7 latency_ms        Γ(2, 1.5)     observed submit-to-land latency
EV (lamports, scaled) is a nonlinear function of these plus noise; `mev` weights
landing (tip, phase, latency) more, `arb` weights spread and depth more. ~3 % of
values are missing (NaN) to exercise the models' default directions.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import lightgbm as lgb
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_FEATURES = 8


def dataset(rng, n, kind):
    x = np.column_stack([
        rng.normal(12, 6, n),
        rng.normal(10, 1.5, n),
        rng.normal(9, 0.7, n),
        rng.uniform(0, 1, n),
        np.abs(rng.normal(0, 1, n)),
        rng.integers(2, 5, n).astype(float),
        rng.normal(8, 1, n),
        rng.gamma(2, 1.5, n),
    ]).astype(np.float32)
    spread, depth, gas, phase, vol, hops, tip, lat = x.T
    land = 1 / (1 + np.exp(-(1.2 * (tip - gas) - 2.0 * np.abs(phase - 0.35) - 0.25 * lat)))
    gross = spread * np.minimum(depth, 12) / (1 + 0.3 * (hops - 2)) - 4 * vol
    if kind == "mev":
        ev = 1.5 * land * gross - 0.6 * np.exp(gas - 9) - 0.4 * np.exp(tip - 8)
    else:
        ev = land * (1.3 * gross + 2 * np.log1p(np.maximum(depth - 8, 0))) - 0.5 * np.exp(gas - 9)
    y = (ev + rng.normal(0, 2, n)).astype(np.float32)
    mask = rng.uniform(size=x.shape) < 0.03
    x[mask] = np.nan
    return x, y


def train(kind, seed, workdir, rounds):
    """Trains `kind` and saves what the pipeline takes: the model file and the rows
    (check rows double as the golden rows)."""
    rng = np.random.default_rng(seed + (0 if kind == "mev" else 1000))
    x, y = dataset(rng, 6000, kind)
    params = {"objective": "regression", "num_leaves": 31, "learning_rate": 0.08,
              "min_data_in_leaf": 20, "verbose": -1, "seed": seed, "deterministic": True}
    booster = lgb.train(params, lgb.Dataset(x[:5000], y[:5000]), num_boost_round=rounds)
    test_x = x[5000:5200]
    pred = booster.predict(test_x)
    rmse = float(np.sqrt(np.mean((booster.predict(x[5000:]) - y[5000:]) ** 2)))
    baseline = float(np.sqrt(np.mean((y[5000:] - y[:5000].mean()) ** 2)))
    model_txt = os.path.join(workdir, f"{kind}.txt")
    booster.save_model(model_txt)
    rows = os.path.join(workdir, f"{kind}.rows.npy")
    np.save(rows, test_x)
    check = {
        "model": kind, "n_features": N_FEATURES, "rmse": rmse, "rmse_predict_mean": baseline,
        # NaN is not JSON: missing values travel as null.
        "rows": [[None if np.isnan(v) else float(v) for v in row] for row in test_x],
        "predictions": [float(p) for p in pred],
    }
    return model_txt, rows, check


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--git-sha", default=None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--fault", type=int, default=0, help="tests only: MODEL_TEST_FAULT")
    ap.add_argument("--abi", type=int, default=2, help="1: a v1 library (no golden vectors)")
    ap.add_argument("--models", default="mev,arb")
    ap.add_argument("--rounds", type=int, default=120, help="boosting rounds (tests use fewer)")
    ap.add_argument("--keep-work", default=None,
                    help="copy the LightGBM model files and the tl2cgen C here (benchmarks)")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    kinds = [k for k in a.models.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="gw-models-") as work:
        for kind in kinds:
            model_txt, rows, check = train(kind, a.seed, work, a.rounds)
            with open(os.path.join(out, f"{kind}.check.json"), "w") as f:
                json.dump(check, f)
            print(f"{kind}: rmse {check['rmse']:.3f} (predicting the mean: {check['rmse_predict_mean']:.3f})",
                  file=sys.stderr)
            cmd = [sys.executable, os.path.join(ROOT, "abi/build_model.py"), "--name", kind,
                   "--lightgbm", model_txt, "--rows", rows, "--out", out,
                   "--activate", "--fault", str(a.fault), "--abi", str(a.abi)]
            if a.git_sha:  # else build_model.py names it by commit and content
                cmd += ["--version", a.git_sha]
            if a.keep_work:
                os.makedirs(a.keep_work, exist_ok=True)
                shutil.copy(model_txt, a.keep_work)
                cmd += ["--keep-c", os.path.join(a.keep_work, f"{kind}-c")]
            r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if r.returncode != 0:
                sys.exit(f"build-models: {kind}: abi/build_model.py failed")
            print(r.stdout.strip())


if __name__ == "__main__":
    main()
