//! Compiles a tl2cgen model's C statically into the `models` benchmark when
//! `GW_MODEL_C_DIR` names one (bench/run.sh models sets it), so the benchmark can
//! call tl2cgen's `predict` directly beside the same model loaded through the ABI.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(gw_static_model)");
    println!("cargo:rerun-if-env-changed=GW_MODEL_C_DIR");
    let Ok(dir) = std::env::var("GW_MODEL_C_DIR") else {
        return;
    };
    let main_c = std::path::Path::new(&dir).join("main.c");
    if !main_c.exists() {
        return;
    }
    println!("cargo:rerun-if-changed={}", main_c.display());
    cc::Build::new()
        .file(&main_c)
        .include(&dir)
        .opt_level(3)
        .warnings(false)
        .compile("gw_static_model");
    println!("cargo:rustc-cfg=gw_static_model");
}
