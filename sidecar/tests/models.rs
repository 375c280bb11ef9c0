//! Tree models through the versioned C ABI, built for real: LightGBM trains them,
//! tl2cgen turns them into C, CMake builds the libraries (scripts/build-models.py),
//! and the sidecar's host loads, checks, serves and hot-swaps them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use gw_sidecar::models::{LoadError, Model, ModelHost};
use serde_json::{json, Value};

mod common;

/// Runs the model pipeline into `out`; panics with its output on failure.
fn build(out: &Path, sha: &str, seed: u64, fault: u32, models: &str) {
    let o = Command::new(testkit::python())
        .arg(testkit::workspace_root().join("scripts/build-models.py"))
        .args(["--out", out.to_str().unwrap(), "--git-sha", sha])
        .args(["--seed", &seed.to_string(), "--fault", &fault.to_string()])
        .args(["--models", models])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build-models: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Both models built once per test binary (seed 7, version `t1`).
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("gw-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        build(&d, "t1", 7, 0, "mev,arb");
        d
    })
}

fn check(dir: &Path, model: &str) -> (Vec<f32>, Vec<f64>) {
    let c: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{model}.check.json"))).unwrap())
            .unwrap();
    let rows = c["rows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .map(|v| v.as_f64().map_or(f32::NAN, |x| x as f32))
        .collect();
    let preds = c["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (rows, preds)
}

#[test]
fn predictions_equal_the_training_librarys_and_are_served_over_http() {
    let dir = built();
    for (stem, model) in [("mev", "mev"), ("arb", "arb")] {
        let m = Model::load(&dir.join(format!("lib{stem}_latest.so")), 8).unwrap();
        assert_eq!((m.name.as_str(), m.version.as_str()), (model, "t1"));
        assert_eq!((m.n_features, m.n_outputs), (8, 1));
        assert!(m.path.ends_with(format!("lib{stem}_vt1.so")));
        let (rows, want) = check(dir, model);
        assert_eq!(want.len(), 200);
        let got = m.predict(&rows).unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{model}: largest difference {worst}");
        assert!(
            rows.iter().any(|v| v.is_nan()),
            "the rows include missing values"
        );
        assert!(m.predict(&rows[..7]).is_err(), "not a whole row");
    }

    // Over the sidecar's HTTP API.
    let d = testkit::TempDir::new("models-http");
    let mut cfg = common::config(d.path(), true);
    cfg.file.models = Some(gw_sidecar::config::ModelsConfig {
        dir: dir.to_path_buf(),
        n_features: 8,
        poll_ms: 100,
    });
    let s = common::serve(cfg);
    let (rows, want) = check(dir, "mev");
    let first: Vec<Value> = rows[..16]
        .iter()
        .map(|v| if v.is_nan() { Value::Null } else { json!(v) })
        .collect();
    let (status, body) = s.post_json(
        "/api/models/mev/predict",
        &json!({"rows": [first[..8], first[8..]]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "t1");
    for (i, w) in want[..2].iter().enumerate() {
        let g = body["outputs"][i][0].as_f64().unwrap();
        assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
    }
    let models = s.get_json("/api/models");
    assert_eq!(models["mev"]["serving"]["version"], "t1", "{models}");
    assert_eq!(models["arbitrage"]["serving"]["name"], "arb", "{models}");
    let (status, body) = s.post_json("/api/models/mev/predict", &json!({"rows": [[1.0, 2.0]]}));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_args")),
        "{body}"
    );

    // The score gates sends: state from control commands, ev_min from POLICY.
    let post = |path: &str, body: Value| -> Value { s.post_json(path, &body).1 };
    let two = json!({"rows": [first[..8], first[8..]]});
    let stopped = post("/api/modules/mev/evaluate", two.clone());
    assert_eq!(stopped["decisions"][0]["reason"], "stopped", "{stopped}");
    assert_eq!(
        post("/api/control/module/mev:start", json!({}))["applied"],
        true
    );
    let (lo, hi) = (want[0].min(want[1]), want[0].max(want[1]));
    let ev_min = (lo + hi) / 2.0;
    let applied = post("/api/control/module/mev:policy", json!({"ev_min": ev_min}));
    assert_eq!(applied["applied"], true, "{applied}");
    let gated = post("/api/modules/mev/evaluate", two);
    let sends: Vec<bool> = gated["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["send"].as_bool().unwrap())
        .collect();
    assert_eq!(sends, vec![want[0] >= ev_min, want[1] >= ev_min], "{gated}");
    assert!(gated["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["reason"] == "below ev_min"));
}

fn activate(dir: &Path, stem: &str, lib: &str) {
    let o = Command::new("bash")
        .arg(testkit::workspace_root().join("abi/activate.sh"))
        .args([dir.to_str().unwrap(), stem, lib])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

#[test]
fn every_kind_of_bad_library_is_refused_while_the_old_one_serves() {
    let d = testkit::TempDir::new("models-bad");
    let dir = d.path();
    build(dir, "good1", 7, 0, "mev");
    let host = ModelHost::new(dir, 8);
    host.poll();
    let serving = || host.current("mev").map(|m| m.version.clone());
    assert_eq!(serving().as_deref(), Some("good1"));
    let row = [0.5f32; 8];
    let before = host.current("mev").unwrap().predict(&row).unwrap();

    // Built by the same CMake with MODEL_TEST_FAULT: 1 wrong ABI version, 2 predict
    // fails (self-test), 3 no export symbol, 4 init fails.
    let mut refused = Vec::new();
    for (fault, expect) in [
        (1, "ABI version 99"),
        (2, "self-test"),
        (3, "does not export"),
        (4, "init returned"),
    ] {
        build(dir, &format!("fault{fault}"), 7, fault, "mev");
        let log = host.poll();
        assert!(
            log.iter()
                .any(|l| l.contains("refused") && l.contains(expect)),
            "{fault}: {log:?}"
        );
        refused.push(fault);
        assert_eq!(serving().as_deref(), Some("good1"), "fault {fault}");
        assert_eq!(host.current("mev").unwrap().predict(&row).unwrap(), before);
        // Not retried while the link is unchanged.
        assert!(host.poll().is_empty());
    }
    // A corrupt file.
    std::fs::write(
        dir.join("libmev_vcorrupt.so"),
        b"\x7fELF this is not a library",
    )
    .unwrap();
    activate(dir, "mev", "libmev_vcorrupt.so");
    assert!(host.poll().iter().any(|l| l.contains("cannot open")));
    // Wrong feature count (a host feeding 9 features).
    activate(dir, "mev", "libmev_vgood1.so");
    let nine = ModelHost::new(dir, 9);
    assert!(nine
        .poll()
        .iter()
        .any(|l| l.contains("takes 8 features, the host feeds 9")));
    assert!(nine.current("mev").is_none());
    assert!(matches!(
        Model::load(&dir.join("libmev_vgood1.so"), 9),
        Err(LoadError::Features {
            got: 8,
            want: 9,
            ..
        })
    ));
    let slot = host.slot("mev").unwrap();
    assert_eq!(slot.rejected(), 5);

    // A good new build is swapped in.
    build(dir, "good2", 8, 0, "mev");
    host.poll();
    assert_eq!(serving().as_deref(), Some("good2"));
    assert_eq!(slot.loads(), 2);
}

#[test]
fn hot_swap_under_concurrent_predictions_loses_nothing() {
    let d = testkit::TempDir::new("models-swap");
    let dir = d.path();
    build(dir, "v1", 7, 0, "mev");
    build(dir, "v2", 11, 0, "mev");
    let (rows, _) = check(dir, "mev");
    let rows: Vec<f32> = rows[..16 * 8].to_vec();
    // Each version's own answers, from a direct load.
    let expected: Vec<(String, Vec<f32>)> = ["v1", "v2"]
        .iter()
        .map(|v| {
            let m = Model::load(&dir.join(format!("libmev_v{v}.so")), 8).unwrap();
            (v.to_string(), m.predict(&rows).unwrap())
        })
        .collect();
    assert_ne!(expected[0].1, expected[1].1, "the two builds differ");
    activate(dir, "mev", "libmev_vv1.so");
    let host = Arc::new(ModelHost::new(dir, 8));
    host.poll();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (host, stop, calls, rows, expected) = (
                host.clone(),
                stop.clone(),
                calls.clone(),
                rows.clone(),
                expected.clone(),
            );
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                let mut n = 0;
                while n < 3000 || !stop.load(Ordering::Relaxed) {
                    let m = host.current("mev").expect("a model is always serving");
                    let out = m.predict(&rows).expect("no prediction fails");
                    let (_, want) = expected
                        .iter()
                        .find(|(v, _)| *v == m.version)
                        .expect("a known version");
                    assert_eq!(&out, want, "answer of {} is that version's own", m.version);
                    seen.insert(m.version.clone());
                    n += 1;
                    if n > 200_000 {
                        break;
                    }
                }
                calls.fetch_add(n, Ordering::Relaxed);
                seen
            })
        })
        .collect();
    for i in 0..20 {
        let lib = if i % 2 == 0 {
            "libmev_vv2.so"
        } else {
            "libmev_vv1.so"
        };
        activate(dir, "mev", lib);
        host.poll();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for t in threads {
        seen.extend(t.join().expect("no thread panicked"));
    }
    assert!(calls.load(Ordering::Relaxed) >= 12_000);
    assert_eq!(seen.len(), 2, "both versions answered: {seen:?}");
    assert_eq!(host.slot("mev").unwrap().loads(), 21);
}

#[test]
fn the_hot_path_scores_opportunities_with_the_model_and_gates_by_ev_min() {
    use gw_core::module_state::{ModuleState, Modules, RunState};
    use gw_core::Module;
    use gw_sidecar::sender::strategy::{HotPath, Opportunity, SignedTx, StrategyConfig};
    use gw_sidecar::sender::{txwire, Sender, SenderConfig};

    let dir = built();
    let host = Arc::new(ModelHost::new(dir, 8));
    host.poll();
    let (rows, _) = check(dir, "mev");
    // The scores the strategy will see (equal to LightGBM's within 1e-5, tested above).
    let preds: Vec<f64> = host
        .current("mev")
        .unwrap()
        .predict(&rows)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    // ev_min halfway between two neighbouring scores: no row sits on the edge.
    let mut sorted = preds.clone();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let ev_min = (sorted[mid - 1] + sorted[mid]) / 2.0;
    let relay = testkit::relay::Relay::start(None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg: SenderConfig = serde_json::from_value(json!({"relay": {"url": relay.url}})).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[4u8; 32]);
    let sender = rt.block_on(async { Sender::new(&cfg, &key, None, None).unwrap() });
    let mut modules = Modules::new();
    modules.set(
        Module::Mev,
        ModuleState {
            state: RunState::Running,
            ev_min: Some(ev_min),
            ..ModuleState::default()
        },
    );
    let hot = HotPath::start(
        &StrategyConfig::default(),
        sender,
        gw_sidecar::control::ModuleTable::from(modules),
        Some(host),
        rt.handle().clone(),
    )
    .unwrap();
    let mut expected = Vec::new();
    let opps: Vec<Opportunity> = rows
        .chunks_exact(8)
        .zip(&preds)
        .enumerate()
        .map(|(i, (features, pred))| {
            let mut bh = [9u8; 32];
            bh[..4].copy_from_slice(&(i as u32).to_le_bytes());
            let wire = txwire::example_tx(&key, bh, 0);
            if *pred >= ev_min {
                expected.push(wire.clone());
            }
            let signature = txwire::parse(&wire, false).unwrap().signature_b58();
            Opportunity {
                module: Module::Mev,
                features: features.to_vec(),
                ev: None, // the model scores it
                txs: vec![SignedTx {
                    wire: wire.into(),
                    signature,
                }],
            }
        })
        .collect();
    let n = opps.len();
    assert_eq!(hot.offer(opps), n);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while relay.calls().len() < expected.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut got: Vec<Vec<u8>> = relay
        .calls()
        .into_iter()
        .map(|c| c.txs[0].clone())
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(
        got.len(),
        n / 2,
        "half the rows score at or above the median"
    );
    assert_eq!(
        got, expected,
        "exactly the opportunities the model scores >= ev_min"
    );
    assert_eq!(hot.stats.scored.load(Ordering::Relaxed), n as u64);
    drop(hot);
}
