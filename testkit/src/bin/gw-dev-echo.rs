//! Development upstream: answers every request with a JSON echo of what the gateway
//! forwarded (headers included), so the local run shows what the edge verified.
//! Usage: `gw-dev-echo [ADDR]` (default 127.0.0.1:8080).

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let addr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gw-dev-echo: `{addr}` is not an address: {e}");
            std::process::exit(2);
        }
    };
    let server = testkit::echo::EchoServer::start_on(addr);
    eprintln!(
        "gw-dev-echo: listening on {} (HTTP/1.1 and h2c)",
        server.addr
    );
    loop {
        std::thread::park();
    }
}
