//! Generates the prost types from `control.proto` with `protox` (pure Rust), so no
//! system `protoc` is needed. Map fields become `BTreeMap`, so our own encoder writes
//! map entries sorted by key: the deterministic form that signatures cover.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=control.proto");
    let fds = protox::compile(["control.proto"], ["."])?;
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
