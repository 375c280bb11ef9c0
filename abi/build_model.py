#!/usr/bin/env python3
"""Turns a trained tree model into a checked model library for the sidecar.

  build_model.py --name mev (--lightgbm FILE | --xgboost FILE | --sklearn FILE)
                 --rows ROWS --out DIR [--version SHA] [--activate]

Steps, each of which stops the build with a clear message when it fails:
 1. load the model with its own training library and score the golden rows
    (ROWS, plus copies with missing values) with it: predict() and, where the
    library has one, the margin (LightGBM raw_score, XGBoost output_margin);
 2. import it into Treelite (its LightGBM, XGBoost or scikit-learn frontend) and
    generate C with tl2cgen;
 3. write golden.h: the rows and the training library's outputs, compiled into
    the library (model_abi_v2.h: golden_rows, golden_outputs, golden_margins);
 4. build it with abi/CMakeLists.txt (-Wall -Wextra -Werror), load the result
    and compare its answers with the training library's: the same check the
    sidecar runs before it swaps a library in (tolerance below);
 5. install lib<name>_v<version>.so into DIR and, with --activate, point
    lib<name>_latest.so at it (abi/activate.sh); a running sidecar swaps it in.

ROWS: .npy (2-D float array) or .csv (one row per line, an empty cell or "nan" =
missing), at most 200 rows; rows that represent what the model will see.

--sklearn loads a pickle (joblib.dump of a fitted RandomForestRegressor,
RandomForestClassifier, ExtraTrees*, GradientBoosting*): loading a pickle runs
code from it, so give only files you made.

Tolerance (here and in the host): |served - reference| <= RTOL * max(|reference|,
FLOOR, magnitude) with RTOL = 1e-5 and FLOOR = 0.1: relative, except that values
below 0.1 (a small probability) are compared at 1e-6 absolute, and that a float32
model is held to 1e-5 of the numbers it adds up (the row's |base score| + sum of
|leaf values|, embedded as golden_scales): float32 sums of large leaves that cancel
are only that exact, in the training library as much as in tl2cgen's C.
"""
import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
FLOOR = 0.1
MAX_USER_ROWS = 200
MAX_FEATURES = 4096
MODEL_PREDICT_MARGIN = 1


class BuildError(Exception):
    pass


def load_rows(path):
    if path.endswith(".npy"):
        x = np.load(path, allow_pickle=False)
    else:
        x = np.genfromtxt(path, delimiter=",", dtype=np.float64, missing_values=("", "nan", "NaN"),
                          filling_values=np.nan, ndmin=2)
    if x.ndim != 2 or x.shape[0] == 0 or not 0 < x.shape[1] <= MAX_FEATURES:
        raise BuildError(f"{path}: want a 2-D array of rows, got shape {x.shape}")
    if x.shape[0] > MAX_USER_ROWS:
        x = x[:MAX_USER_ROWS]
    return np.ascontiguousarray(x, dtype=np.float32)


def golden_rows(rows):
    """ROWS, then copies of the first 16 with one feature missing each (cycling
    through the features) and one row with every feature missing: the default
    directions of the trees are checked whatever ROWS hold."""
    n, f = rows.shape
    extra = []
    for i in range(min(16, n)):
        r = rows[i].copy()
        r[i % f] = np.nan
        extra.append(r)
    extra.append(np.full(f, np.nan, dtype=np.float32))
    return np.ascontiguousarray(np.vstack([rows, np.array(extra, dtype=np.float32)]))


def as_2d(a, n):
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(n, -1)


def from_lightgbm(path, x):
    import lightgbm as lgb
    import treelite
    booster = lgb.Booster(model_file=path)
    objective = booster.dump_model(num_iteration=0).get("objective", "?").split(" ")[0]
    out = as_2d(booster.predict(x), len(x))
    margin = as_2d(booster.predict(x, raw_score=True), len(x))
    return (treelite.frontend.load_lightgbm_model(path), out, margin,
            f"lightgbm {lgb.__version__} {objective}")


def from_xgboost(path, x):
    import treelite
    import xgboost as xgb
    booster = xgb.Booster(model_file=path)
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    if objective in ("multi:softmax", "binary:hinge"):
        raise BuildError(f"{objective} predicts labels, not scores; train with multi:softprob "
                         "or binary:logistic and take the argmax/threshold in the strategy")
    d = xgb.DMatrix(x, missing=np.nan)
    out = as_2d(booster.predict(d), len(x))
    margin = as_2d(booster.predict(d, output_margin=True), len(x))
    return treelite.frontend.from_xgboost(booster), out, margin, f"xgboost {xgb.__version__} {objective}"


def from_sklearn(path, x):
    import joblib
    import sklearn
    import treelite
    est = joblib.load(path)
    kind = type(est).__name__
    out = as_2d(est.predict_proba(x) if hasattr(est, "predict_proba") else est.predict(x), len(x))
    model = treelite.sklearn.import_model(est)
    # Treelite 4.1.2's importer does not carry scikit-learn's missing-value
    # direction (tree_.missing_go_to_left: learnt where the training data had
    # missing values, else the child with more samples) and leaves default_left
    # at whatever it set; copy it node by node (Treelite keeps sklearn's node ids).
    trees = [t for stage in np.ravel(est.estimators_) for t in [stage]]
    if len(trees) != model.num_tree:
        raise BuildError(f"{kind}: {len(trees)} trees in the estimator, {model.num_tree} in Treelite")
    for i, t in enumerate(trees):
        acc = model.get_tree_accessor(i)
        dl = acc.get_field("default_left")
        go_left = np.asarray(t.tree_.missing_go_to_left)
        if dl.shape != go_left.shape:
            raise BuildError(f"{kind}: tree {i} has {go_left.shape[0]} nodes, Treelite {dl.shape[0]}")
        acc.set_field("default_left", go_left.astype(dl.dtype))
    return model, out, None, f"scikit-learn {sklearn.__version__} {kind}"


def magnitudes(model, rows):
    """Per row, |base score| + the sum of |leaf value| over the leaves the row
    reaches: the size of the numbers the model adds up. A float32 model's rounding
    error scales with this, not with the result (XGBoost adds a base score of 118.7
    and 120 leaves to reach 1.008: float32 sums in two orders differ by 3e-5). Zero
    where the model has leaf vectors (scikit-learn classifiers; float64 anyway)."""
    import treelite
    ids = np.asarray(treelite.gtil.predict_leaf(model, rows), dtype=np.int64)
    base = float(np.max(np.abs(model.get_header_accessor().get_field("base_scores"))))
    total = np.full(len(rows), base)
    for t in range(model.num_tree):
        leaf_value = model.get_tree_accessor(t).get_field("leaf_value")
        if leaf_value.size == 0:
            return np.zeros(len(rows))
        total += np.abs(leaf_value[ids[:, t]])
    return total


def within(got, want, scale):
    """The tolerance of the host (library.rs `compare`)."""
    bound = np.maximum(np.maximum(np.abs(want), FLOOR), scale[:, None])
    return np.abs(got - want) <= RTOL * bound


def c_floats(a, suffix):
    def one(v):
        v = float(v)
        if np.isnan(v):
            return "NAN"
        if np.isinf(v):
            return "INFINITY" if v > 0 else "-INFINITY"
        return v.hex() + suffix
    return ",\n  ".join(", ".join(one(v) for v in row) for row in a)


def c_string(s):
    # Octal escapes: at most three digits, so a following digit is not swallowed.
    return '"' + "".join(c if c.isascii() and (c.isalnum() or c in " ._:-+/") else
                         "".join(f"\\{b:03o}" for b in c.encode()) for c in s) + '"'


def write_golden_h(path, rows, out, margin, scales, trainer, postprocessor):
    n, f = rows.shape
    lines = [
        "/* Golden vectors written by abi/build_model.py: rows and the training",
        f" * library's own outputs for them ({trainer}). Do not edit. */",
        "#ifndef GW_GOLDEN_H", "#define GW_GOLDEN_H", "#include <math.h>",
        f"#define GW_GOLDEN_N {n}u",
        f"#define GW_GOLDEN_N_FEATURES {f}",
        f"#define GW_GOLDEN_N_OUTPUTS {out.shape[1]}",
        f"#define GW_GOLDEN_TRAINER {c_string(trainer)}",
        f"#define GW_GOLDEN_POSTPROCESSOR {c_string(postprocessor)}",
        f"const float gw_golden_rows[{n * f}] = {{\n  {c_floats(rows, 'f')}\n}};",
        f"const double gw_golden_outputs[{out.size}] = {{\n  {c_floats(out, '')}\n}};",
    ]
    lines.append(f"const double gw_golden_scales[{n}] = {{\n  {c_floats(scales[:, None], '')}\n}};")
    if margin is None:
        lines.append("#define GW_GOLDEN_MARGINS NULL")
    else:
        lines.append(f"const double gw_golden_margins[{margin.size}] = {{\n  {c_floats(margin, '')}\n}};")
        lines.append("#define GW_GOLDEN_MARGINS gw_golden_margins")
    lines.append("#endif")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


class AbiV2(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_uint32), ("struct_size", ctypes.c_uint32),
        ("name", ctypes.c_char_p), ("version", ctypes.c_char_p),
        ("n_features", ctypes.c_uint32), ("n_outputs", ctypes.c_uint32),
        ("n_targets", ctypes.c_uint32), ("max_n_class", ctypes.c_uint32),
        ("leaf_type", ctypes.c_char_p), ("postprocessor", ctypes.c_char_p),
        ("trainer", ctypes.c_char_p), ("init", ctypes.c_void_p),
        ("predict", ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                                     ctypes.c_uint32, ctypes.POINTER(ctypes.c_float))),
        ("release", ctypes.c_void_p), ("n_golden", ctypes.c_uint32),
        ("golden_rows", ctypes.c_void_p), ("golden_outputs", ctypes.c_void_p),
        ("golden_margins", ctypes.c_void_p), ("golden_scales", ctypes.c_void_p),
    ]


# The files under abi/ a library is built from (CMakeLists.txt builds the model's C
# with the adapter against the ABI headers).
BUILD_INPUTS = ("CMakeLists.txt", "tl2cgen_adapter.c", "model_abi_v1.h", "model_abi_v2.h")


def compiler_version():
    """The C compiler CMake picks (`$CC`, else `cc`), as it names itself."""
    try:
        cc = (os.environ.get("CC") or "cc").split()  # e.g. `ccache gcc`
        return subprocess.run([*cc, "--version"], capture_output=True, text=True,
                              check=False).stdout
    except OSError:
        return "no cc"


def verify_library(lib_path, rows, out, margin, scales):
    """Loads the built library and scores the golden rows with it, as the host will."""
    lib = ctypes.CDLL(lib_path)
    export = lib.model_abi_v2_export
    export.restype = ctypes.POINTER(AbiV2)
    t = export().contents
    if t.init:
        if ctypes.CFUNCTYPE(ctypes.c_int32)(t.init)() != 0:
            raise BuildError(f"{lib_path}: init failed")
    if t.leaf_type.decode() != "float32":
        scales = np.zeros(len(rows))  # the scale term is for float32 arithmetic (as in the host)
    if t.abi_version != 2 or t.n_features != rows.shape[1] or t.n_outputs != out.shape[1]:
        raise BuildError(f"{lib_path}: table says abi {t.abi_version}, {t.n_features} features, "
                         f"{t.n_outputs} outputs; want 2, {rows.shape[1]}, {out.shape[1]}")
    worst = []
    for flags, want in ((0, out), (MODEL_PREDICT_MARGIN, margin)):
        if want is None:
            continue
        got = np.zeros(want.shape, dtype=np.float32)
        s = t.predict(rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(rows), flags,
                      got.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if s != 0:
            raise BuildError(f"{lib_path}: predict returned {s}")
        ok = within(got.astype(np.float64), want, scales)
        if not ok.all():
            r, k = np.argwhere(~ok)[0]
            what = "margin" if flags else "output"
            raise BuildError(f"{lib_path}: row {r} {what} {k}: the library answers {got[r, k]!r}, "
                             f"the training library {want[r, k]!r} ({int((~ok).sum())} of {ok.size} differ)")
        bound = np.maximum(np.maximum(np.abs(want), FLOOR), scales[:, None])
        worst.append(float(np.max(np.abs(got - want) / bound)))
    return t.leaf_type.decode(), t.postprocessor.decode(), max(worst)


def git_sha():
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "dev"


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def build(a):
    if not a.name.isidentifier() or not a.name.isascii() or len(a.name) > 32:
        raise BuildError(f"--name {a.name!r}: letters, digits and _ (at most 32)")
    user_rows = load_rows(a.rows)
    rows = golden_rows(user_rows)
    source = a.lightgbm or a.xgboost or a.sklearn
    if not os.path.isfile(source):
        raise BuildError(f"{source}: no such file")
    loader = from_lightgbm if a.lightgbm else from_xgboost if a.xgboost else from_sklearn
    try:
        model, out, margin, trainer = loader(source, rows)
    except BuildError:
        raise
    except Exception as e:  # the training library's own error, e.g. a wrong row width
        raise BuildError(f"{source} with ROWS ({rows.shape[1]} features): {type(e).__name__}: {e}")
    if model.num_feature != rows.shape[1]:
        raise BuildError(f"the model takes {model.num_feature} features, ROWS have {rows.shape[1]}")
    import tl2cgen
    import treelite
    header = model.get_header_accessor()
    n_targets = int(header.get_field("num_target")[0])
    n_outputs = n_targets * int(np.max(header.get_field("num_class")))
    if out.shape[1] != n_outputs:
        raise BuildError(f"the training library answers {out.shape[1]} values per row, the "
                         f"Treelite model computes {n_outputs}")
    postprocessor = str(header.get_field("postprocessor"))
    scales = magnitudes(model, rows)
    with tempfile.TemporaryDirectory(prefix="gw-model-") as work:
        gen = os.path.join(work, "c")
        tl2cgen.generate_c_code(model, dirpath=gen, params={})
        write_golden_h(os.path.join(gen, "golden.h"), rows, out, margin, scales, trainer, postprocessor)
        if a.version is None:
            # The commit and everything the library is built from: the model's own
            # C, the ABI's sources, the options that change the build and the
            # compiler. A different build is a different file (one already there
            # under the name is this build, and is what --activate names).
            h = hashlib.sha256()
            for f in ("main.c", "golden.h"):
                with open(os.path.join(gen, f), "rb") as fh:
                    h.update(fh.read())
            for f in BUILD_INPUTS:
                with open(os.path.join(ROOT, "abi", f), "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read())
            h.update(f"abi={a.abi} fault={a.fault}".encode())
            h.update(compiler_version().encode())
            a.version = f"{git_sha()}.{h.hexdigest()[:10]}"
            content_named = True
        else:
            content_named = False
        lib = f"lib{a.name}_v{a.version}.so"
        if os.path.exists(os.path.join(a.out, lib)) and not content_named:
            raise BuildError(f"{os.path.join(a.out, lib)} exists: a library a sidecar may have "
                             "loaded is never replaced (the loader would keep the old one); "
                             "give another --version")
        if a.keep_c:
            shutil.copytree(gen, a.keep_c, dirs_exist_ok=True)
        b = os.path.join(work, "build")
        run(["cmake", "-S", os.path.join(ROOT, "abi"), "-B", b, f"-DGIT_SHA={a.version}",
             f"-DMODEL_NAME={a.name}", f"-DMODEL_DIR={gen}", f"-DMODEL_TEST_FAULT={a.fault}",
             f"-DGW_MODEL_ABI={a.abi}"])
        run(["cmake", "--build", b, "-j2"])
        staged = os.path.join(work, "install")
        run(["cmake", "--install", b, "--prefix", staged])
        if a.fault == 0 and a.abi == 2:
            leaf, post, worst = verify_library(os.path.join(staged, lib), rows, out, margin, scales)
        else:
            leaf, post, worst = "?", postprocessor, float("nan")
        os.makedirs(a.out, exist_ok=True)
        installed = os.path.join(a.out, lib)
        if not os.path.exists(installed):
            tmp = os.path.join(a.out, f".{lib}.{os.getpid()}")
            shutil.copy2(os.path.join(staged, lib), tmp)
            os.replace(tmp, installed)
        elif a.fault == 0 and a.abi == 2:
            # The same build, already there: what --activate names is checked too.
            verify_library(installed, rows, out, margin, scales)
    print(f"{lib}: {trainer}, treelite {treelite.__version__} + tl2cgen {tl2cgen.__version__}, "
          f"{leaf}, {rows.shape[1]} features, {out.shape[1]} outputs, {post}; {len(rows)} golden rows "
          f"match (largest relative difference {worst:.2e})", file=sys.stderr)
    if a.activate:
        run(["bash", os.path.join(ROOT, "abi/activate.sh"), a.out, a.name, lib])
    print(os.path.join(a.out, lib))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="library stem: mev, arb, ...")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--lightgbm", help="LightGBM model text (Booster.save_model)")
    src.add_argument("--xgboost", help="XGBoost model (Booster.save_model: .json or .ubj)")
    src.add_argument("--sklearn", help="scikit-learn estimator pickled with joblib.dump")
    ap.add_argument("--rows", required=True, help="golden rows: .npy or .csv")
    ap.add_argument("--out", required=True, help="models directory")
    ap.add_argument("--version", default=None,
                    help="stamped into the name (default: git SHA + a hash of everything the "
                         "library is built from); "
                         "an existing library is never replaced")
    ap.add_argument("--activate", action="store_true", help="point lib<name>_latest.so at it")
    ap.add_argument("--keep-c", default=None, help="copy the generated C here (benchmarks)")
    ap.add_argument("--abi", type=int, default=2, choices=(1, 2),
                    help="1: a v1 table for hosts that predate v2 (no golden vectors)")
    ap.add_argument("--fault", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        build(a)
    except BuildError as e:
        sys.exit(f"build_model: {e}")


if __name__ == "__main__":
    main()
