//! Generates the prost types from `control.proto` with `protox` (pure Rust), so no
//! system `protoc` is needed. Map fields become `BTreeMap`, so our own encoder writes
//! map entries sorted by key: the deterministic form that signatures cover. The
//! compiled descriptor is kept too, so tests can hold hand-written wire tables
//! against the schema.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=control.proto");
    println!("cargo:rerun-if-changed=opportunity.proto");
    let fds = protox::compile(["control.proto"], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("control.fds"), fds.encode_to_vec())?;
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(fds)?;
    // The hot path's opportunity frame (sender ingest): no maps, plain prost types.
    prost_build::Config::new().compile_fds(protox::compile(["opportunity.proto"], ["."])?)?;
    Ok(())
}
