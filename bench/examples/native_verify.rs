//! One native Ed25519 `verify_strict` (ed25519-dalek) of a signed command's payload,
//! timed call by call: the baseline `bench/edge.py` measures the in-Envoy cost
//! against, in the same run. Prints JSON: p50/p99/mean in µs.
//!
//!   cargo run --release -p gw-bench --example native_verify [N]

use std::hint::black_box;
use std::time::Instant;

use ed25519_dalek::{Signature, SigningKey};
use gw_core::{sign_command, signing_payload, Command};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let sk = SigningKey::from_bytes(&[42; 32]);
    let pk = sk.verifying_key();
    let cmd = wasm_verify::bench_command();
    let body = sign_command(&cmd, &sk, "op-admin-1");
    let payload = signing_payload(&cmd);
    let decoded = <Command as prost::Message>::decode(&body[..]).expect("decode");
    let sig = Signature::from_bytes(decoded.sig.as_slice().try_into().expect("64-byte sig"));
    assert!(pk.verify_strict(&payload, &sig).is_ok());
    for _ in 0..n / 10 {
        black_box(
            pk.verify_strict(black_box(&payload), black_box(&sig))
                .is_ok(),
        );
    }
    let mut us: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            black_box(
                pk.verify_strict(black_box(&payload), black_box(&sig))
                    .is_ok(),
            );
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    us.sort_by(f64::total_cmp);
    let pct = |q: f64| us[((q * us.len() as f64) as usize).min(us.len() - 1)];
    println!(
        "{{\"p50_us\": {:.2}, \"p99_us\": {:.2}, \"mean_us\": {:.2}, \"n\": {n}}}",
        pct(0.50),
        pct(0.99),
        us.iter().sum::<f64>() / us.len() as f64
    );
}
