//! Compiles two tl2cgen models' C statically into the `models` benchmark when
//! `GW_MODEL_C_DIR_F64` and `GW_MODEL_C_DIR_F32` name them (bench/run.sh models
//! sets both): a float64 (LightGBM) and a float32 (XGBoost) model, so the
//! benchmark can call tl2cgen's `predict` directly beside the same models loaded
//! through the ABI. Each model's functions get a prefix (`gw_f64_`, `gw_f32_`) so
//! the two link side by side.

const TL2CGEN_FUNCTIONS: [&str; 7] = [
    "predict",
    "postprocess",
    "get_num_feature",
    "get_num_target",
    "get_num_class",
    "get_threshold_type",
    "get_leaf_output_type",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(gw_static_model)");
    let mut found = 0;
    for (var, prefix) in [
        ("GW_MODEL_C_DIR_F64", "gw_f64_"),
        ("GW_MODEL_C_DIR_F32", "gw_f32_"),
    ] {
        println!("cargo:rerun-if-env-changed={var}");
        let Ok(dir) = std::env::var(var) else {
            continue;
        };
        let main_c = std::path::Path::new(&dir).join("main.c");
        if !main_c.exists() {
            continue;
        }
        println!("cargo:rerun-if-changed={}", main_c.display());
        let mut b = cc::Build::new();
        b.file(&main_c).include(&dir).opt_level(3).warnings(false);
        for f in TL2CGEN_FUNCTIONS {
            b.define(f, Some(format!("{prefix}{f}").as_str()));
        }
        b.compile(&format!("{prefix}model"));
        found += 1;
    }
    if found == 2 {
        println!("cargo:rustc-cfg=gw_static_model");
    }
}
