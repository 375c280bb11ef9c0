//! Development block-engine relay: answers Jito's `sendTransaction` and `sendBundle`
//! JSON-RPC like a real engine would (signature / bundle id) and logs each call, so
//! the local run has a second route to hedge to. Usage: `gw-dev-relay [ADDR]`
//! (default 127.0.0.1:8010).

use std::time::Duration;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8010".into());
    let addr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gw-dev-relay: `{addr}` is not an address: {e}");
            std::process::exit(2);
        }
    };
    let relay = testkit::relay::Relay::start_on(addr, None);
    println!("gw-dev-relay: listening on {}", relay.url);
    let mut seen = 0;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let calls = relay.calls();
        for c in calls.iter().skip(seen) {
            let sigs: Vec<String> = c
                .txs
                .iter()
                .map(|t| testkit::relay::bs58_encode(&t[1..65]))
                .collect();
            println!("{} {}", c.method, sigs.join(","));
        }
        seen = calls.len();
    }
}
