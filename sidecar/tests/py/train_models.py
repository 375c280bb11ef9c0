#!/usr/bin/env python3
"""Trains one model per supported training library and objective, as an operator
would, for sidecar/tests/models.rs:

  train_models.py OUT_DIR

For each model NAME it writes OUT_DIR/NAME.{txt,json,pkl} (the model as the
library saves it), OUT_DIR/NAME.rows.npy (rows for the golden vectors) and
OUT_DIR/NAME.expect.json: other rows, with missing values, and the training
library's own predict() (and margin, where it has one) for them. The test puts
each model through abi/build_model.py into a running sidecar and compares what
the sidecar serves with NAME.expect.json. Deterministic (fixed seeds).
"""
import json
import os
import sys

import joblib
import lightgbm as lgb
import numpy as np
import xgboost as xgb
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor


def data(seed, n, n_features):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features)).astype(np.float32)
    a, b, c = x[:, 0], x[:, 1], x[:, 2]
    y_reg = (3 * a + np.sin(2 * b) * 4 - c * c + rng.normal(0, 0.3, n)).astype(np.float32)
    y_bin = (a + 0.5 * b > 0.2).astype(np.float32)
    y_multi = np.digitize(a + 0.8 * c, [-0.6, 0.6]).astype(np.float32)  # 3 classes
    # ~4 % missing everywhere, training included: default directions are learnt.
    x[rng.uniform(size=x.shape) < 0.04] = np.nan
    return x, y_reg, y_bin, y_multi


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    x, y_reg, y_bin, y_multi = data(11, 3000, 8)
    train, golden, test = slice(0, 2600), slice(2600, 2700), slice(2700, 2800)
    xt = x[test].copy()
    # Rows the golden set never saw, each with at least one missing value.
    rng = np.random.default_rng(5)
    for i in range(len(xt)):
        xt[i, rng.integers(0, 5)] = np.nan  # within the first 5: the 5-feature model too
    lgb_p = {"verbose": -1, "num_leaves": 15, "learning_rate": 0.1, "seed": 1, "deterministic": True}
    models = {}

    def save(name, path, predict, margin, cols=8):
        models[name] = path
        np.save(os.path.join(out, f"{name}.rows.npy"), x[golden, :cols])
        r = xt[:, :cols]
        expect = {
            "rows": [[None if np.isnan(v) else float(v) for v in row] for row in r],
            "outputs": np.asarray(predict(r), dtype=np.float64).reshape(len(r), -1).tolist(),
        }
        if margin is not None:
            expect["margins"] = np.asarray(margin(r), dtype=np.float64).reshape(len(r), -1).tolist()
        with open(os.path.join(out, f"{name}.expect.json"), "w") as f:
            json.dump(expect, f)

    # LightGBM: regression and binary (float64 models).
    for name, obj, y in (("lgb_reg", "regression", y_reg), ("lgb_bin", "binary", y_bin)):
        b = lgb.train({**lgb_p, "objective": obj}, lgb.Dataset(x[train], y[train]), num_boost_round=60)
        path = os.path.join(out, f"{name}.txt")
        b.save_model(path)
        save(name, path, b.predict, lambda r, b=b: b.predict(r, raw_score=True))

    # XGBoost: reg:squarederror, binary:logistic, multi:softprob (float32 models).
    xgb_p = {"max_depth": 4, "eta": 0.2, "seed": 1, "nthread": 1}
    for name, extra, y in (("xgb_reg", {"objective": "reg:squarederror"}, y_reg),
                           ("xgb_bin", {"objective": "binary:logistic"}, y_bin),
                           ("xgb_multi", {"objective": "multi:softprob", "num_class": 3}, y_multi)):
        b = xgb.train({**xgb_p, **extra}, xgb.DMatrix(x[train], label=y[train], missing=np.nan), 40)
        path = os.path.join(out, f"{name}.json")
        b.save_model(path)
        save(name, path, lambda r, b=b: b.predict(xgb.DMatrix(r, missing=np.nan)),
             lambda r, b=b: b.predict(xgb.DMatrix(r, missing=np.nan), output_margin=True))

    # scikit-learn random forests (Treelite's sklearn frontend): a 3-class
    # classifier (probabilities), a regressor with two targets, and a regressor on
    # 5 features (the arb slot of the test is configured for 5).
    rf = RandomForestClassifier(n_estimators=20, max_depth=7, random_state=1, n_jobs=1)
    rf.fit(x[train], y_multi[train].astype(int))
    path = os.path.join(out, "rf_cls.pkl")
    joblib.dump(rf, path)
    save("rf_cls", path, rf.predict_proba, None)

    # Two targets (Treelite: num_target 2): two outputs per row.
    rf2 = RandomForestRegressor(n_estimators=20, max_depth=7, random_state=1, n_jobs=1)
    rf2.fit(x[train], np.column_stack([y_reg[train], y_bin[train]]))
    path = os.path.join(out, "rf_multi.pkl")
    joblib.dump(rf2, path)
    save("rf_multi", path, rf2.predict, None)

    rf5 = RandomForestRegressor(n_estimators=20, max_depth=7, random_state=1, n_jobs=1)
    rf5.fit(x[train, :5], y_reg[train])
    path = os.path.join(out, "rf_reg5.pkl")
    joblib.dump(rf5, path)
    save("rf_reg5", path, rf5.predict, None, cols=5)

    with open(os.path.join(out, "models.json"), "w") as f:
        json.dump(models, f)


if __name__ == "__main__":
    main()
