//! Answers from the HTTP upstreams the sender is configured with — the RPC node
//! (landing calls and the leader schedule) and the relay — read within a size
//! bound, with their URLs kept out of errors and logs.
//!
//! A client's timeout bounds how long an answer takes, not how large it is: an
//! upstream that streams without end (a broken proxy, a hostile node on a plain
//! `http://` URL) would otherwise be read into memory until the deadline. And a
//! provider's key often rides in the URL itself (`https://…/?api-key=…`, or a
//! token as the path), while reqwest's errors name the URL: those errors reach
//! JSON-RPC callers, audit rows and the logs.

use std::error::Error as _;

/// A client builder for an upstream: redirects are not followed and no
/// `Referer` is sent. reqwest follows up to 10 redirects by default and, to
/// another host, drops only the standard credential headers: the relay's
/// `x-jito-auth` would go to wherever a `307` points, and `Referer` would carry
/// a key in the URL's query. An upstream that redirects is answered as an error.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
}

/// The largest answer read from the RPC node's landing calls: a simulation's
/// (its logs are at most 10 000 bytes in Agave) and 256 signatures' statuses
/// are a few tens of KiB; up to 1 024 of them may be read at once.
pub const MAX_ANSWER_BYTES: usize = 512 << 10;

/// The largest answer read from the relay: its answers are a signature or a
/// bundle id (an error page is shown by its first 200 characters only).
pub const MAX_RELAY_ANSWER_BYTES: usize = 64 << 10;

/// The largest answer read while following the leader schedule: mainnet's
/// `getLeaderSchedule` is ≈ 3 MB (432 000 slot indexes), `getClusterNodes` ≈ 2 MB.
pub const MAX_SCHEDULE_BYTES: usize = 16 << 20;

/// Why an answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The upstream did not answer in time.
    #[error("no answer within the deadline")]
    Timeout,
    /// No connection could be made (refused, no route, a name that does not
    /// resolve, TLS refused): nothing was sent. (A connection still being made
    /// when the whole call's deadline passes is a [`ReadError::Timeout`]: no
    /// client here sets a connect timeout of its own.)
    #[error("{0}")]
    Connect(String),
    /// Transport failure once connected (the URL left out).
    #[error("{0}")]
    Transport(String),
    /// The answer is over the bound.
    #[error("an answer larger than {0} bytes")]
    TooLarge(usize),
}

impl From<reqwest::Error> for ReadError {
    fn from(e: reqwest::Error) -> Self {
        // Before the timeout: a connect timeout would be both, and nothing went.
        if e.is_connect() {
            ReadError::Connect(describe(e))
        } else if e.is_timeout() {
            ReadError::Timeout
        } else {
            ReadError::Transport(describe(e))
        }
    }
}

/// The body of `resp`, refused as soon as it is larger than `cap` bytes (by its
/// `Content-Length` before reading, or while reading).
pub async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(ReadError::TooLarge(cap));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len().saturating_add(chunk.len()) > cap {
            return Err(ReadError::TooLarge(cap));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// POSTs `body` as JSON to `url` and reads the answer as JSON, within `cap` bytes.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    cap: usize,
) -> Result<serde_json::Value, ReadError> {
    let resp = http.post(url).json(body).send().await?;
    let status = resp.status();
    let bytes = read_capped(resp, cap).await?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v) if status.is_success() || v.get("error").is_some() => Ok(v),
        Ok(_) => Err(ReadError::Transport(format!("HTTP {status}"))),
        Err(_) if !status.is_success() => Err(ReadError::Transport(format!("HTTP {status}"))),
        Err(e) => Err(ReadError::Transport(format!(
            "an answer that is not JSON: {e}"
        ))),
    }
}

/// reqwest's error and its causes, without the URL it names.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `url` as it may be shown: its scheme, host and port only (`https://host:port/…`).
/// The path, query and credentials are left out: providers put keys in each.
pub fn redact(url: &str) -> String {
    let Ok(u) = reqwest::Url::parse(url) else {
        return "(an unparsable URL)".to_owned();
    };
    let mut out = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
    if let Some(p) = u.port() {
        out.push_str(&format!(":{p}"));
    }
    if u.path() != "/" || u.query().is_some() || !u.username().is_empty() || u.password().is_some()
    {
        out.push_str("/…");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_keeps_the_host_and_drops_what_may_be_a_key() {
        assert_eq!(
            redact("https://mainnet.example-rpc.com/?api-key=SECRET"),
            "https://mainnet.example-rpc.com/…"
        );
        assert_eq!(
            redact("https://user:pw@node.example:8899/TOKEN/"),
            "https://node.example:8899/…"
        );
        assert_eq!(redact("http://127.0.0.1:8899"), "http://127.0.0.1:8899");
        assert_eq!(redact("https://:pw@h.example/"), "https://h.example/…");
        assert_eq!(redact("http://[::1]:8899/?k=SECRET"), "http://[::1]:8899/…");
        assert_eq!(redact("not a url SECRET"), "(an unparsable URL)");
    }
}
