//! Model prediction latency, same run, same model (`mev`, LightGBM → tl2cgen):
//! - direct: tl2cgen's `predict` compiled statically into this binary (the
//!   baseline), fed exactly as the adapter feeds it;
//! - ABI: the same model as a CMake-built library through `model_abi_v1`, loaded by
//!   the sidecar's host (`ModelHost::current` + `Model::predict`);
//! - LightGBM's own `Booster.predict` on one row and on the batch (Python), for
//!   comparison.
//!
//! Run with `bash bench/run.sh models` (it builds the model, then this benchmark
//! with `GW_MODEL_C_DIR` so build.rs can compile the C statically).

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

#[cfg(gw_static_model)]
use gw_bench::direct;

#[cfg(gw_static_model)]
fn main() {
    use std::hint::black_box;
    use std::time::Instant;

    use gw_sidecar::models::ModelHost;

    let dir = std::path::PathBuf::from(std::env::var("GW_BENCH_MODELS").expect("GW_BENCH_MODELS"));
    let check: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("mev.check.json")).expect("check"))
            .expect("json");
    let rows: Vec<f32> = check["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| r.as_array().expect("row").clone())
        .map(|v| v.as_f64().map_or(f32::NAN, |x| x as f32))
        .collect();
    let n = 8usize;
    let n_rows = rows.len() / n;
    // SAFETY: plain getter of the static model.
    assert_eq!(unsafe { direct::get_num_feature() } as usize, n);
    let host = ModelHost::new(&dir, n as u32);
    host.poll();
    let model = host.current("mev").expect("mev model");

    // Same answers first.
    let mut want = vec![0.0f32; n_rows];
    direct::score(&rows, n, &mut want);
    assert_eq!(
        model.predict(&rows).expect("predict"),
        want,
        "ABI and direct agree"
    );

    // Best of 7 rounds, each long enough to be stable.
    let time = |f: &mut dyn FnMut()| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..50 {
                f();
            }
            best = best.min(t.elapsed().as_secs_f64() / 50.0);
        }
        best
    };
    let mut out = vec![0.0f32; n_rows];
    let direct_row = time(&mut || {
        for r in rows.chunks_exact(n) {
            direct::score(black_box(r), n, &mut out[..1]);
        }
    }) / n_rows as f64;
    let abi_row = time(&mut || {
        for r in rows.chunks_exact(n) {
            let m = host.current("mev").expect("model");
            black_box(m.predict(black_box(r)).expect("predict"));
        }
    }) / n_rows as f64;
    let direct_batch = time(&mut || direct::score(black_box(&rows), n, &mut out)) / n_rows as f64;
    let abi_batch = time(&mut || {
        let m = host.current("mev").expect("model");
        black_box(m.predict(black_box(&rows)).expect("predict"));
    }) / n_rows as f64;

    // LightGBM's own predict, for comparison (Python, same rows).
    let py = format!(
        "import json,timeit,numpy as np,lightgbm as lgb\n\
         b=lgb.Booster(model_file={model:?})\n\
         c=json.load(open({check:?}))\n\
         x=np.array([[np.nan if v is None else v for v in r] for r in c['rows']],dtype=np.float32)\n\
         one=x[:1]\n\
         t1=min(timeit.repeat(lambda: b.predict(one),number=200,repeat=5))/200\n\
         tb=min(timeit.repeat(lambda: b.predict(x),number=20,repeat=5))/20/len(x)\n\
         print(t1*1e9, tb*1e9)\n",
        model = dir.join("work/mev.txt").display().to_string(),
        check = dir.join("mev.check.json").display().to_string(),
    );
    let o = std::process::Command::new(testkit::python())
        .args(["-c", &py])
        .output()
        .expect("python");
    let lgb: Vec<f64> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();

    println!("\n## model predict, ns per row (mev: LightGBM 120 trees × 31 leaves, {n_rows} rows, best of 7)");
    println!("| path | one row per call | batch of {n_rows} | vs direct (row / batch) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| tl2cgen predict, statically linked (baseline) | {:.0} | {:.0} | 1.00x / 1.00x |",
        direct_row * 1e9,
        direct_batch * 1e9
    );
    println!(
        "| through the ABI host (arc-swap load + C ABI call) | {:.0} | {:.0} | {:.2}x / {:.2}x |",
        abi_row * 1e9,
        abi_batch * 1e9,
        abi_row / direct_row,
        abi_batch / direct_batch
    );
    if let [one, batch] = lgb[..] {
        println!(
            "| LightGBM Booster.predict (Python) | {one:.0} | {batch:.0} | {:.1}x / {:.1}x |",
            one / (direct_row * 1e9),
            batch / (direct_batch * 1e9)
        );
    } else {
        println!(
            "LightGBM timing failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[cfg(not(gw_static_model))]
fn main() {
    println!("models benchmark: run `bash bench/run.sh models` (it builds the model C first)");
}
