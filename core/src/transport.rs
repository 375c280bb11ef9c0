//! How a connection travels, for the warnings an operator reads.

/// Whether a request with URL scheme `scheme` to `host` (as in a URL: a name, an
/// IPv4 address, or an IPv6 address in brackets) crosses a network in plain
/// text: `http` to a host that is not a loopback address (`localhost` is).
pub fn plain_beyond_loopback(scheme: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<core::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    scheme.eq_ignore_ascii_case("http") && !loopback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_beyond_loopback_is_in_clear() {
        for (scheme, host, clear) in [
            ("http", "127.0.0.1", false),
            ("http", "127.0.0.7", false),
            ("http", "LOCALHOST", false),
            ("http", "[::1]", false),
            ("http", "clickhouse", true),
            ("http", "10.0.0.5", true),
            ("http", "[fd00::5]", true),
            ("https", "clickhouse", false),
            ("HTTP", "clickhouse", true),
        ] {
            assert_eq!(
                plain_beyond_loopback(scheme, host),
                clear,
                "{scheme}://{host}"
            );
        }
    }
}
