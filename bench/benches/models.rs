//! Model prediction cost per row, same run, same models, for a float64 model
//! (`mev`: LightGBM, 120 trees × 31 leaves) and a float32 model of the same size
//! (XGBoost reg:squarederror, 120 trees of depth 5, on the same rows):
//! - direct: tl2cgen's `predict` compiled statically into this binary (the
//!   baseline), fed exactly as the adapter feeds it;
//! - ABI: the same model as a library built by abi/build_model.py, loaded and
//!   checked by the sidecar's host (`ModelHost::current` + `Model::predict`);
//! - LightGBM's own `Booster.predict` on one row and on the batch (Python), for
//!   comparison (float64 model only).
//!
//! Run with `bash bench/run.sh models` (it builds the models, then this benchmark
//! with `GW_MODEL_C_DIR_F64` / `GW_MODEL_C_DIR_F32` so build.rs can compile the C
//! statically).

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

#[cfg(gw_static_model)]
fn main() {
    use std::hint::black_box;
    use std::path::Path;
    use std::time::Instant;

    use gw_bench::direct;
    use gw_sidecar::models::{LoadPolicy, ModelHost};

    /// Rows of `file` (`rows`: arrays with null = missing).
    fn rows(file: &Path) -> Vec<f32> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(file).expect("rows file")).expect("json");
        v["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .flat_map(|r| r.as_array().expect("row").clone())
            .map(|v| v.as_f64().map_or(f32::NAN, |x| x as f32))
            .collect()
    }

    /// Direct and ABI timed in alternating order, 21 rounds of 30 calls each:
    /// the medians of each (seconds per call) and the median of the per-round
    /// ratios ABI / direct (a round's two timings share the machine's state).
    fn paired(direct: &mut dyn FnMut(), abi: &mut dyn FnMut()) -> (f64, f64, f64) {
        let mut t = |f: &mut dyn FnMut()| {
            let start = Instant::now();
            for _ in 0..30 {
                f();
            }
            start.elapsed().as_secs_f64() / 30.0
        };
        let (mut d, mut a, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..21 {
            let (td, ta) = if round % 2 == 0 {
                let td = t(direct);
                (td, t(abi))
            } else {
                let ta = t(abi);
                (t(direct), ta)
            };
            d.push(td);
            a.push(ta);
            r.push(ta / td);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        (median(&mut d), median(&mut a), median(&mut r))
    }

    let dir = std::path::PathBuf::from(std::env::var("GW_BENCH_MODELS").expect("GW_BENCH_MODELS"));
    let n = 8usize;
    let cases: [(&str, &str, Vec<f32>, &dyn Fn(&[f32], &mut [f32])); 2] = [
        (
            "float64 (LightGBM mev, 120 trees × 31 leaves)",
            "f64",
            rows(&dir.join("f64/mev.check.json")),
            &|r: &[f32], o: &mut [f32]| direct::score(direct::gw_f64_predict, r, n, o),
        ),
        (
            "float32 (XGBoost reg:squarederror, 120 trees, depth 5)",
            "f32",
            rows(&dir.join("f32/rows.json")),
            &|r: &[f32], o: &mut [f32]| direct::score(direct::gw_f32_predict, r, n, o),
        ),
    ];
    // SAFETY: plain getters of the static models.
    unsafe {
        assert_eq!(direct::gw_f64_get_num_feature() as usize, n);
        assert_eq!(direct::gw_f32_get_num_feature() as usize, n);
    }
    println!("\n## model predict, ns per row (medians of 21 alternating rounds, same run; ratio = median of per-round ratios)");
    println!("| model | path | one row per call | whole batch | vs direct (row / batch) |");
    println!("|---|---|---:|---:|---:|");
    let mut f64_direct = (0.0, 0.0);
    for (label, sub, rows, direct_score) in &cases {
        let n_rows = rows.len() / n;
        let host = ModelHost::new(&dir.join(sub), |_| n as u32, LoadPolicy::default());
        host.poll();
        let model = host
            .current("mev")
            .expect("the model passed the host's checks");

        // Same answers first.
        let mut want = vec![0.0f32; n_rows];
        direct_score(rows, &mut want);
        assert_eq!(
            model.predict(rows).expect("predict"),
            want,
            "ABI and direct agree"
        );
        let mut out = vec![0.0f32; n_rows];
        let mut out2 = vec![0.0f32; n_rows];
        let (direct_row, abi_row, ratio_row) = paired(
            &mut || {
                for r in rows.chunks_exact(n) {
                    direct_score(black_box(r), &mut out[..1]);
                }
            },
            &mut || {
                for (r, o) in rows.chunks_exact(n).zip(out2.chunks_exact_mut(1)) {
                    host.predict_into("mev", black_box(r), o).expect("predict");
                }
            },
        );
        let (direct_batch, abi_batch, ratio_batch) =
            paired(&mut || direct_score(black_box(rows), &mut out), &mut || {
                host.predict_into("mev", black_box(rows), &mut out2)
                    .expect("predict")
            });
        let per_row = |t: f64| t / n_rows as f64 * 1e9;
        println!(
            "| {label} | tl2cgen predict, statically linked (baseline) | {:.0} | {:.0} ({n_rows} rows) | 1.00x / 1.00x |",
            per_row(direct_row),
            per_row(direct_batch)
        );
        println!(
            "| {label} | through the ABI host (`ModelHost::predict_into`: arc-swap guard + C ABI call) | {:.0} | {:.0} | {ratio_row:.2}x / {ratio_batch:.2}x |",
            per_row(abi_row),
            per_row(abi_batch),
        );
        if *sub == "f64" {
            f64_direct = (direct_row / n_rows as f64, direct_batch / n_rows as f64);
        }
    }

    // LightGBM's own predict, for comparison (Python, same rows as the f64 model).
    let py = format!(
        "import json,timeit,numpy as np,lightgbm as lgb\n\
         b=lgb.Booster(model_file={model:?})\n\
         c=json.load(open({check:?}))\n\
         x=np.array([[np.nan if v is None else v for v in r] for r in c['rows']],dtype=np.float32)\n\
         one=x[:1]\n\
         t1=min(timeit.repeat(lambda: b.predict(one),number=200,repeat=5))/200\n\
         tb=min(timeit.repeat(lambda: b.predict(x),number=20,repeat=5))/20/len(x)\n\
         print(t1*1e9, tb*1e9)\n",
        model = dir.join("f64/work/mev.txt").display().to_string(),
        check = dir.join("f64/mev.check.json").display().to_string(),
    );
    let o = std::process::Command::new(testkit::models_python())
        .args(["-c", &py])
        .output()
        .expect("python");
    let lgb: Vec<f64> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if let [one, batch] = lgb[..] {
        println!(
            "| float64 | LightGBM Booster.predict (Python) | {one:.0} | {batch:.0} | {:.1}x / {:.1}x |",
            one / (f64_direct.0 * 1e9),
            batch / (f64_direct.1 * 1e9)
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
    println!("models benchmark: run `bash bench/run.sh models` (it builds the models' C first)");
}
