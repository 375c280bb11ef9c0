//! `gwctl send`: POST a signed command to the gateway over HTTP/3 (quinn + h3), or
//! HTTP/2 with `--http2`.

mod h2;
mod h3;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

/// `gwctl send` arguments.
#[derive(Args)]
pub struct SendArgs {
    /// Target URL, e.g. https://127.0.0.1:8443/api/control/commands.
    url: String,
    /// The signed command file (from `gwctl sign`).
    file: PathBuf,
    /// Bearer token (JWT). On a shared host prefer --token-file: a process's
    /// arguments are visible to every local user.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the bearer token (JWT), e.g. .run/admin.jwt.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Use HTTP/2 over TLS (h2 ALPN), or h2c for http:// URLs, instead of HTTP/3.
    #[arg(long)]
    http2: bool,
    /// PEM file of the CA to trust, alone: the public web roots are then not trusted
    /// (e.g. the dev CA from envoy/gen-dev-certs.sh).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Do not verify the server certificate (development only; not with --ca).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// TLS server name, when it differs from the URL's host.
    #[arg(long)]
    server_name: Option<String>,
    /// Request timeout: 15s, 1m (longer than the gateway's own 10 s, whose 504
    /// says more than no answer at all).
    #[arg(long, default_value = "15s")]
    timeout: String,
    /// Content type of the body.
    #[arg(long, default_value = "application/x-protobuf")]
    content_type: String,
}

/// What the server answered.
pub struct Answer {
    /// Protocol label printed before the status (`HTTP/3`, `HTTP/2`).
    pub proto: &'static str,
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
    /// The `location` header of a redirect (not followed).
    pub location: Option<String>,
    /// An HTTP/3 endpoint whose connection was closed: waited for (briefly) once
    /// the answer is in, so that the close reaches the server.
    pub closing: Option<quinn::Endpoint>,
}

/// The longest answer read: the gateway's are a few KiB; a longer one is not
/// its (the outcome stays unknown: exit 3).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Appends `chunk` to an answer's `body`, refusing one beyond
/// [`MAX_ANSWER_BYTES`].
fn push_bounded(body: &mut Vec<u8>, chunk: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(
        body.len() + chunk.len() <= MAX_ANSWER_BYTES,
        "an answer longer than {MAX_ANSWER_BYTES} bytes: not the gateway's"
    );
    body.extend_from_slice(chunk);
    Ok(())
}

/// A redirect's `location`, as text, cut to 512 bytes' worth of characters (and
/// `…` then).
fn location(h: &http::HeaderMap) -> Option<String> {
    let v = String::from_utf8_lossy(h.get(http::header::LOCATION)?.as_bytes()).into_owned();
    let mut cut: String = v
        .chars()
        .scan(0, |n, c| {
            *n += c.len_utf8();
            (*n <= 512).then_some(c)
        })
        .collect();
    if cut.len() < v.len() {
        cut.push('…');
    }
    Some(cut)
}

/// `text` as it may go to a terminal: control characters but newlines and tabs
/// escaped (`\u{1b}`), so an answer cannot move the cursor, rewrite the lines
/// above it or retitle the window. A JSON answer is unchanged (JSON escapes its
/// control characters itself).
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The request may have reached the gateway whole, and no answer came (the
/// timeout once the body was being sent, a connection lost after that): whether
/// the command was accepted is not known. `gwctl send` exits 3, as for a 5xx (a
/// timeout during the QUIC handshake exits 2: nothing was sent; over HTTP/2
/// reqwest does not say when it connected, and any timeout is 3).
#[derive(Debug)]
pub struct Unanswered;

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no answer after the request was sent")
    }
}

/// A request, independent of the protocol.
pub struct Request<'a> {
    pub url: &'a http::Uri,
    pub body: Vec<u8>,
    pub token: Option<&'a str>,
    pub content_type: &'a str,
    pub tls: tls::TlsOptions,
    /// Set once the request may reach the server whole (its body is being
    /// sent; over HTTP/2, once reqwest has it): before, a timeout means that
    /// nothing was sent.
    pub sent: std::sync::atomic::AtomicBool,
}

/// `gwctl send`.
pub fn run(a: &SendArgs) -> Result<ExitCode> {
    let url: http::Uri = a
        .url
        .parse()
        .with_context(|| format!("`{}` is not a URL", a.url))?;
    if url.host().is_none() {
        bail!("URL `{}` has no host", a.url);
    }
    let body =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let timeout = Duration::from_secs(crate::duration::parse_secs(&a.timeout)?);
    let token = match &a.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => a.token.clone(),
    };
    if token.as_deref().is_some_and(str::is_empty) {
        bail!("the bearer token is empty (--token, or --token-file's file)");
    }
    if token.is_some()
        && gw_core::transport::plain_beyond_loopback(
            url.scheme_str().unwrap_or_default(),
            url.host().unwrap_or_default(),
        )
    {
        eprintln!("gwctl: warning: the URL is plain http:// to a host that is not loopback: the bearer token crosses the network in clear (use https://)");
    }
    if a.insecure {
        eprintln!("gwctl: warning: --insecure: the server's certificate is not checked: whoever answers is believed (and gets the bearer token, if any); use --ca");
    }
    let req = Request {
        url: &url,
        body,
        token: token.as_deref(),
        content_type: &a.content_type,
        tls: tls::TlsOptions {
            ca: a.ca.clone(),
            insecure: a.insecure,
            server_name: a.server_name.clone(),
        },
        sent: std::sync::atomic::AtomicBool::new(false),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let answer = rt.block_on(async {
        let fut = async {
            if a.http2 {
                h2::send(&req).await
            } else {
                h3::send(&req).await
            }
        };
        let answer = match tokio::time::timeout(timeout, fut).await {
            Ok(answer) => answer?,
            Err(_) if !req.sent.load(std::sync::atomic::Ordering::Relaxed) => {
                // Still connecting: nothing was sent (exit 2). Over HTTP/3 this is
                // mostly UDP that does not get through.
                let hint = if a.http2 {
                    ""
                } else {
                    " (HTTP/3 is QUIC over UDP: is UDP to that port let through? --http2 goes over TCP)"
                };
                bail!(
                    "no connection to {} within {}: nothing was sent{hint}",
                    url.authority().map_or("the server", |h| h.as_str()),
                    a.timeout
                );
            }
            Err(_) => {
                return Err(anyhow::anyhow!("none within {}", a.timeout).context(Unanswered))
            }
        };
        if let Some(ep) = &answer.closing {
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        }
        anyhow::Ok(answer)
    });
    let answer = match answer {
        Ok(a) => a,
        Err(e) if e.downcast_ref::<Unanswered>().is_some() => {
            eprintln!("gwctl: error: {e:#}");
            eprintln!("gwctl: the command is not known to be accepted: send the same file again to learn the outcome (do not sign it again)");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e),
    };
    println!("{} {}", answer.proto, answer.status);
    println!("{}", printable(&String::from_utf8_lossy(&answer.body)));
    let verdict = verdict(answer.status, &answer.body);
    if let Some(note) = verdict.note() {
        eprintln!("gwctl: {note}");
    }
    if verdict == Verdict::Redirected {
        let to = answer.location.as_deref().unwrap_or("nowhere named");
        // The location is the server's: printed as text, never followed.
        eprintln!(
            "gwctl: the gateway redirected the command to {}; gwctl follows no redirect, so it was not sent there: send it to the right URL if that is one you trust",
            to.escape_debug()
        );
    }
    Ok(verdict.exit_code())
}

/// What an answer means for the command sent, as the exit code says it.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Applied (2xx, `"applied": true`).
    Done,
    /// A 2xx that does not say the command was applied (not the gateway's
    /// answer: a proxy's page, another URL): nothing is known of the command.
    Unconfirmed,
    /// These bytes were sent before and applied then (`409 replay`, `"applied":
    /// true`): the command is in effect; nothing was applied twice.
    AlreadyApplied,
    /// Accepted durably, not applied yet (`"pending": true`, or a `409 replay`
    /// of these bytes with `"applied": false`): resend the same bytes later to
    /// learn the outcome — never re-sign.
    Pending,
    /// Accepted, and its module's agent refused to apply it (`apply_error`, also
    /// in a `409 replay` of these bytes).
    NotApplied,
    /// Refused as too old (`stale`): when these bytes were sent before, this
    /// says nothing of that send (its outcome is in the ledger).
    Stale,
    /// A 5xx: the gateway or a component behind it failed; the command is not
    /// known to be accepted (a failing journal disk may have kept it): send the
    /// same bytes again, which tells — never re-sign.
    Retry,
    /// A 3xx: the command went nowhere else (redirects are not followed) and was
    /// not applied where it was sent.
    Redirected,
    /// Refused (any other status).
    Refused,
}

impl Verdict {
    /// 0 done or already applied; 1 refused or not applied; 3 pending, a 5xx or
    /// no answer ([`Unanswered`]): send the same file again (2 is gwctl's own
    /// error, or a request that was never sent).
    fn exit_code(&self) -> ExitCode {
        match self {
            Verdict::Done | Verdict::AlreadyApplied => ExitCode::SUCCESS,
            Verdict::NotApplied | Verdict::Stale | Verdict::Redirected | Verdict::Refused => {
                ExitCode::from(1)
            }
            Verdict::Pending | Verdict::Retry | Verdict::Unconfirmed => ExitCode::from(3),
        }
    }

    fn note(&self) -> Option<&'static str> {
        match self {
            Verdict::AlreadyApplied => Some("already applied: an earlier send of these bytes was applied"),
            Verdict::Pending => Some("accepted, not applied yet: send the same file again later to learn the outcome (do not sign it again)"),
            Verdict::NotApplied => Some("accepted, but its module refused to apply it (apply_error)"),
            Verdict::Stale => Some("refused as stale: if this file was sent before, this answer says nothing of that send; find its request_id in the ledger before signing the command again"),
            Verdict::Retry => Some("not known to be accepted (the gateway failed): send the same file again to learn the outcome (do not sign it again)"),
            Verdict::Unconfirmed => Some("a 2xx answer that does not say the command was applied (is the URL the gateway's command route?): send the same file again to learn the outcome (do not sign it again)"),
            Verdict::Done | Verdict::Redirected | Verdict::Refused => None,
        }
    }
}

fn verdict(status: u16, body: &[u8]) -> Verdict {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| json.as_ref().and_then(|j| j.get(k));
    let applied = field("applied").and_then(serde_json::Value::as_bool);
    let error = field("error").and_then(serde_json::Value::as_str);
    match status {
        200..=299 if field("apply_error").is_some() => Verdict::NotApplied,
        200..=299 if field("pending").and_then(serde_json::Value::as_bool) == Some(true) => {
            Verdict::Pending
        }
        200..=299 if applied == Some(true) => Verdict::Done,
        200..=299 => Verdict::Unconfirmed,
        409 if error == Some("replay") => {
            match applied {
                Some(true) => Verdict::AlreadyApplied,
                Some(false) if field("apply_error").is_some() => Verdict::NotApplied,
                Some(false) => Verdict::Pending,
                // Another command used the nonce.
                None => Verdict::Refused,
            }
        }
        _ if error == Some("stale") => Verdict::Stale,
        500..=599 => Verdict::Retry,
        300..=399 => Verdict::Redirected,
        _ => Verdict::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::{verdict, Verdict};

    #[test]
    fn each_answer_has_its_verdict() {
        let cases: [(u16, &str, Verdict); 17] = [
            (
                200,
                r#"{"ok":true,"applied":true,"state":{}}"#,
                Verdict::Done,
            ),
            (
                200,
                r#"{"ok":true,"applied":false,"pending":true}"#,
                Verdict::Pending,
            ),
            (
                200,
                r#"{"ok":true,"applied":false,"apply_error":{"error":"x"}}"#,
                Verdict::NotApplied,
            ),
            (200, "not json", Verdict::Unconfirmed),
            (200, "<html>welcome</html>", Verdict::Unconfirmed),
            (204, "", Verdict::Unconfirmed),
            (
                409,
                r#"{"error":"replay","applied":true,"request_id":"r"}"#,
                Verdict::AlreadyApplied,
            ),
            (
                409,
                r#"{"error":"replay","applied":false,"request_id":"r"}"#,
                Verdict::Pending,
            ),
            (
                409,
                r#"{"error":"replay","applied":false,"apply_error":{"error":"x"}}"#,
                Verdict::NotApplied,
            ),
            (
                409,
                r#"{"error":"replay","detail":"nonce used"}"#,
                Verdict::Refused,
            ),
            (409, r#"{"error":"other","applied":true}"#, Verdict::Refused),
            (503, r#"{"error":"unavailable"}"#, Verdict::Retry),
            // Envoy's own answer with the sidecar away.
            (503, "upstream connect error", Verdict::Retry),
            (429, r#"{"error":"replay_capacity"}"#, Verdict::Refused),
            (307, "", Verdict::Redirected),
            (308, r#"{"error":"moved"}"#, Verdict::Redirected),
            (
                401,
                r#"{"error":"stale","detail":"too old"}"#,
                Verdict::Stale,
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(verdict(status, body.as_bytes()), want, "{status} {body}");
        }
    }

    /// An answer printed cannot drive the terminal; JSON and plain lines are
    /// printed as they came.
    #[test]
    fn answers_are_printed_without_their_control_characters() {
        use super::printable;
        let json = "{\"error\":\"x\",\"detail\":\"a\\u001b[2J\"}\n\tok";
        assert_eq!(printable(json), json);
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b\rc"),
            "a\\u{1b}]0;pwned\\u{7}b\\rc"
        );
    }

    #[test]
    fn a_long_location_is_cut_and_says_so() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::LOCATION,
            http::HeaderValue::from_str(&format!("https://x/{}", "a".repeat(600))).unwrap(),
        );
        let l = super::location(&h).unwrap();
        assert!(l.ends_with('…') && l.len() == 512 + '…'.len_utf8(), "{l}");
        h.insert(
            http::header::LOCATION,
            http::HeaderValue::from_static("/short"),
        );
        assert_eq!(super::location(&h).as_deref(), Some("/short"));
    }
}
