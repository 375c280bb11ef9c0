//! Ed25519 command verification cost, in µs per call and as a ratio against one
//! native `ed25519-dalek` `verify_strict` measured in the same run:
//!   - raw signature vs the whole `verify_command` (wire scan, key ring, checks);
//!   - `ed25519-dalek` vs the core's per-key tables (`gw_core::edverify`, what
//!     the edge filter uses);
//!   - native vs wasm32-wasip1 in wasmtime vs the same wasm in V8 (Node.js).
//!
//! The wasm guest is built by `bench/run.sh` (or pass its path in `GW_WASM_VERIFY`).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{black_box, Criterion};
use ed25519_dalek::{Signature, SigningKey};
use gw_core::edverify::PrecomputedKey;
use gw_core::keyring::CommandKey;
use gw_core::{sign_command, signing_payload, verify_command, Command, KeyRing};
use wasmtime::{Engine, Instance, Linker, Memory, Module, Store, TypedFunc};

fn command() -> Command {
    wasm_verify::bench_command()
}

fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GW_WASM_VERIFY") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("wasm32-wasip1/release/wasm_verify.wasm")
}

struct Guest {
    store: Store<()>,
    verify_command: TypedFunc<(u32, u32, i32), i32>,
    verify_raw: TypedFunc<(u32, u32, u32, i32), i32>,
    body: (u32, u32),
    payload: (u32, u32),
    sig: u32,
}

impl Guest {
    fn load(pk: &[u8; 32], body: &[u8], payload: &[u8], sig: &[u8; 64]) -> Guest {
        let path = wasm_path();
        let engine = Engine::default();
        let module = Module::from_file(&engine, &path).unwrap_or_else(|e| {
            panic!("load {}: {e} (build it with bench/run.sh)", path.display())
        });
        let mut linker: Linker<()> = Linker::new(&engine);
        linker
            .define_unknown_imports_as_traps(&module)
            .expect("stub imports");
        let mut store = Store::new(&engine, ());
        let instance: Instance = linker
            .instantiate(&mut store, &module)
            .expect("instantiate");
        let memory: Memory = instance
            .get_memory(&mut store, "memory")
            .expect("memory export");
        let alloc = instance
            .get_typed_func::<u32, u32>(&mut store, "bench_alloc")
            .expect("bench_alloc");
        let put = |store: &mut Store<()>, bytes: &[u8]| -> u32 {
            let p = alloc.call(&mut *store, bytes.len() as u32).expect("alloc");
            memory.write(&mut *store, p as usize, bytes).expect("write");
            p
        };
        let pk_ptr = put(&mut store, pk);
        let body_ptr = put(&mut store, body);
        let payload_ptr = put(&mut store, payload);
        let sig_ptr = put(&mut store, sig);
        let set_key = instance
            .get_typed_func::<u32, i32>(&mut store, "bench_set_key")
            .expect("bench_set_key");
        assert_eq!(set_key.call(&mut store, pk_ptr).expect("set key"), 0);
        Guest {
            verify_command: instance
                .get_typed_func(&mut store, "bench_verify_command")
                .expect("bench_verify_command"),
            verify_raw: instance
                .get_typed_func(&mut store, "bench_verify_raw")
                .expect("bench_verify_raw"),
            store,
            body: (body_ptr, body.len() as u32),
            payload: (payload_ptr, payload.len() as u32),
            sig: sig_ptr,
        }
    }

    fn command(&mut self, tables: i32) -> i32 {
        let (p, l) = self.body;
        self.verify_command
            .call(&mut self.store, (p, l, tables))
            .expect("call")
    }

    fn raw(&mut self, tables: i32) -> i32 {
        let (p, l) = self.payload;
        self.verify_raw
            .call(&mut self.store, (p, l, self.sig, tables))
            .expect("call")
    }
}

/// Mean time per iteration of a finished benchmark, from criterion's estimates.
fn mean_ns(dir: &std::path::Path, group: &str, id: &str) -> f64 {
    let p = dir.join(group).join(id).join("new/estimates.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("estimates json");
    v["mean"]["point_estimate"].as_f64().expect("mean")
}

/// Times the same guest in V8 through Node.js (bench/v8_verify.mjs), if Node is
/// there: µs per call for each of `VARIANTS`, and Node's version.
fn v8_times(pk: &[u8], body: &[u8], payload: &[u8], sig: &[u8; 64]) -> Option<(Vec<f64>, String)> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("v8_verify.mjs");
    let out = std::process::Command::new("node")
        .arg(script)
        .arg(wasm_path())
        .args([hex(pk), hex(body), hex(payload), hex(sig)])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("v8_verify.mjs: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let times = VARIANTS
        .iter()
        .map(|(id, _, _)| v[*id].as_f64())
        .collect::<Option<Vec<_>>>()?;
    Some((times, v["node"].as_str()?.to_owned()))
}

/// Times the same guest inside Envoy's V8 (`GW_ENVOY`: the envoy binary): loaded
/// as a bootstrap wasm service, it measures itself when the VM starts and logs
/// `gw-verify-bench {json}`. Returns µs per call for each of `VARIANTS` and the
/// time to build the key's tables (ms).
fn envoy_times() -> Option<(Vec<f64>, f64)> {
    let envoy = std::env::var_os("GW_ENVOY").filter(|e| !e.is_empty())?;
    let dir = std::env::temp_dir().join(format!("gw-verify-envoy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let cfg = serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
            "singleton": true,
            "config": {"name": "verify_bench", "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm_path()}}}}}}]
    });
    let cfg_path = dir.join("envoy.json");
    std::fs::write(&cfg_path, cfg.to_string()).ok()?;
    let log_path = dir.join("envoy.log");
    let mut child = std::process::Command::new(envoy)
        .arg("-c")
        .arg(&cfg_path)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "warn",
            "--log-path",
        ])
        .arg(&log_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut found = None;
    while found.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        found = log
            .lines()
            .find_map(|l| l.split_once("gw-verify-bench ").map(|(_, j)| j.to_owned()));
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let v: serde_json::Value = serde_json::from_str(&found?).ok()?;
    let times = VARIANTS
        .iter()
        .map(|(id, _, _)| v[*id].as_f64())
        .collect::<Option<Vec<_>>>()?;
    Some((times, v["set_key_ms"].as_f64()?))
}

/// (id, raw signature or whole command, table verifier).
const VARIANTS: [(&str, bool, bool); 4] = [
    ("raw_dalek", true, false),
    ("raw_tables", true, true),
    ("command_dalek", false, false),
    ("command_tables", false, true),
];

fn main() {
    let sk = SigningKey::from_bytes(&[42; 32]);
    let pk = sk.verifying_key();
    let cmd = command();
    let body = sign_command(&cmd, &sk, "op-admin-1");
    let payload = signing_payload(&cmd);
    let decoded = <Command as prost::Message>::decode(&body[..]).expect("decode");
    let sig_bytes: [u8; 64] = decoded.sig.as_slice().try_into().expect("sig");
    let sig = Signature::from_bytes(&sig_bytes);
    let mut ring = KeyRing::new();
    ring.insert(CommandKey::unrestricted("op-admin-1", pk))
        .expect("ring");
    let mut table_ring = ring.clone();
    table_ring.precompute_tables().expect("tables");
    let table_key = PrecomputedKey::new(pk.as_bytes()).expect("table key");
    assert!(verify_command(&body, &ring, None).is_ok());
    assert!(verify_command(&body, &table_ring, None).is_ok());
    assert!(table_key.verify_strict(&payload, &sig_bytes));

    let mut guest = Guest::load(pk.as_bytes(), &body, &payload, &sig_bytes);
    for t in [0, 1] {
        assert_eq!(guest.command(t), 0);
        assert_eq!(guest.raw(t), 0);
    }

    let out_dir = std::env::temp_dir().join(format!("gw-criterion-{}", std::process::id()));
    let mut c = Criterion::default()
        .output_directory(&out_dir)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("verify");
        g.bench_function("native_raw_dalek", |b| {
            b.iter(|| {
                pk.verify_strict(black_box(&payload), black_box(&sig))
                    .is_ok()
            });
        });
        g.bench_function("native_raw_tables", |b| {
            b.iter(|| table_key.verify_strict(black_box(&payload), black_box(&sig_bytes)));
        });
        g.bench_function("native_command_dalek", |b| {
            b.iter(|| verify_command(black_box(&body), &ring, None).is_ok());
        });
        g.bench_function("native_command_tables", |b| {
            b.iter(|| verify_command(black_box(&body), &table_ring, None).is_ok());
        });
        for (id, raw, tables) in VARIANTS {
            let t = i32::from(tables);
            g.bench_function(format!("wasmtime_{id}"), |b| {
                if raw {
                    b.iter(|| guest.raw(t));
                } else {
                    b.iter(|| guest.command(t));
                }
            });
        }
        g.finish();
    }
    c.final_summary();

    let us = |id: String| mean_ns(&out_dir, "verify", &id) / 1e3;
    let native: Vec<f64> = VARIANTS
        .iter()
        .map(|(id, _, _)| us(format!("native_{id}")))
        .collect();
    let wasmtime: Vec<f64> = VARIANTS
        .iter()
        .map(|(id, _, _)| us(format!("wasmtime_{id}")))
        .collect();
    let v8 = v8_times(pk.as_bytes(), &body, &payload, &sig_bytes);
    let envoy = envoy_times();
    let baseline = native[0];
    println!();
    println!("== verify: {} byte command, 3 args; µs per call (× native raw ed25519-dalek verify_strict) ==", body.len());
    let node = match &v8 {
        Some((_, node)) => format!("V8 (Node {node})"),
        None => "V8 (Node)".to_string(),
    };
    println!(
        "{:<16} {:>17} {:>17} {node:>17} {:>17}",
        "", "native", "wasmtime", "V8 (Envoy)"
    );
    let cell = |v: f64| format!("{v:8.1} ({:5.2}x)", v / baseline);
    let column =
        |t: Option<&Vec<f64>>, i: usize| t.map_or_else(|| "skipped".into(), |t| cell(t[i]));
    for (i, (id, _, _)) in VARIANTS.iter().enumerate() {
        println!(
            "{id:<16} {:>17} {:>17} {:>17} {:>17}",
            cell(native[i]),
            cell(wasmtime[i]),
            column(v8.as_ref().map(|(t, _)| t), i),
            column(envoy.as_ref().map(|(t, _)| t), i),
        );
    }
    let ratio = |t: Option<&Vec<f64>>, name: &str| {
        t.map(|t| format!(", {name} {:.2}x", t[2] / t[3]))
            .unwrap_or_default()
    };
    println!(
        "tables vs dalek, verify_command: native {:.2}x, wasmtime {:.2}x{}{}",
        native[2] / native[3],
        wasmtime[2] / wasmtime[3],
        ratio(v8.as_ref().map(|(t, _)| t), "V8 (Node)"),
        ratio(envoy.as_ref().map(|(t, _)| t), "V8 (Envoy)"),
    );
    if v8.is_none() {
        println!("V8 (Node): skipped (node not found, or bench/v8_verify.mjs failed)");
    }
    match &envoy {
        Some((_, ms)) => println!("in Envoy, building the base point's and one key's tables: {ms:.1} ms"),
        None => println!("V8 (Envoy): skipped (set GW_ENVOY to the envoy binary; bench/run.sh does when the venv exists)"),
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}
