#!/usr/bin/env python3
"""Smoke step of run-gateway.sh: a model from each training library goes through
the README's pipeline (abi/build_model.py --activate) into the running gateway,
and what the gateway serves through Envoy equals the training library's answer.

  smoke-models.py RUN_DIR TOKEN_FILE

Trains with sidecar/tests/py/train_models.py into RUN_DIR/trained, then for a
LightGBM binary model, an XGBoost multi:softprob model and a scikit-learn random
forest: build + activate into RUN_DIR/models as `mev`, wait until
GET /api/models (through Envoy) shows it serving, score 20 rows with missing values
through Envoy and compare. Puts the gateway's own mev model back at the end.
Runs in the model toolchain's venv.
"""
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "https://localhost:8443"
CASES = (("lgb_bin", "lightgbm"), ("xgb_multi", "xgboost"), ("rf_cls", "sklearn"))


def main():
    run, token_file = sys.argv[1], sys.argv[2]
    token = open(token_file).read().strip()
    ctx = ssl.create_default_context(cafile=os.path.join(run, "certs/ca.pem"))

    def call(path, body=None):
        req = urllib.request.Request(BASE + path, method="POST" if body is not None else "GET",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {token}",
                                              "content-type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return json.load(r)

    models_dir = os.path.join(run, "models")
    own = os.readlink(os.path.join(models_dir, "libmev_latest.so"))
    trained = os.path.join(run, "trained")
    subprocess.run([sys.executable, os.path.join(ROOT, "sidecar/tests/py/train_models.py"), trained],
                   check=True, stdout=subprocess.DEVNULL)
    paths = json.load(open(os.path.join(trained, "models.json")))
    try:
        for name, lib in CASES:
            version = f"smoke-{name.replace('_', '-')}-{int(time.time())}"  # never an existing file
            b = subprocess.run([sys.executable, os.path.join(ROOT, "abi/build_model.py"), "--name", "mev",
                                f"--{lib}", paths[name], "--rows", os.path.join(trained, f"{name}.rows.npy"),
                                "--out", models_dir, "--version", version, "--activate"],
                               capture_output=True, text=True)
            if b.returncode != 0 or "Treelite version" in b.stderr:
                sys.exit(f"smoke-models: {name}: build_model failed or warned:\n{b.stderr}")
            deadline = time.time() + 15
            while call("/api/models")["mev"].get("serving", {}).get("version") != version:
                if time.time() > deadline:
                    sys.exit(f"smoke-models: {name} not serving: {call('/api/models')['mev']}")
                time.sleep(0.1)
            expect = json.load(open(os.path.join(trained, f"{name}.expect.json")))
            got = call("/api/models/mev/predict", {"rows": expect["rows"][:20]})
            for r, (g, w) in enumerate(zip(got["outputs"], expect["outputs"][:20])):
                for gv, wv in zip(g, w):
                    if abs(gv - wv) > 1e-5 * max(abs(wv), 0.1):
                        sys.exit(f"smoke-models: {name} row {r}: served {gv}, {lib} says {wv}")
            print(f"smoke: {lib} model {name} built by abi/build_model.py, hot-swapped in, "
                  f"20 rows through Envoy equal {lib}'s own", file=sys.stderr)
    finally:
        subprocess.run(["bash", os.path.join(ROOT, "abi/activate.sh"), models_dir, "mev", own], check=True)


if __name__ == "__main__":
    main()
