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
    /// Bearer token (JWT).
    #[arg(long)]
    token: Option<String>,
    /// Use HTTP/2 over TLS (h2 ALPN), or h2c for http:// URLs, instead of HTTP/3.
    #[arg(long)]
    http2: bool,
    /// PEM file of a CA to trust (e.g. the dev CA from envoy/gen-dev-certs.sh).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Do not verify the server certificate (development only).
    #[arg(long)]
    insecure: bool,
    /// TLS server name, when it differs from the URL's host.
    #[arg(long)]
    server_name: Option<String>,
    /// Request timeout: 10s, 1m.
    #[arg(long, default_value = "10s")]
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
}

/// A request, independent of the protocol.
pub struct Request<'a> {
    pub url: &'a http::Uri,
    pub body: Vec<u8>,
    pub token: Option<&'a str>,
    pub content_type: &'a str,
    pub tls: tls::TlsOptions,
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
    let req = Request {
        url: &url,
        body,
        token: a.token.as_deref(),
        content_type: &a.content_type,
        tls: tls::TlsOptions {
            ca: a.ca.clone(),
            insecure: a.insecure,
            server_name: a.server_name.clone(),
        },
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
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {}", a.timeout))?
    })?;
    println!("{} {}", answer.proto, answer.status);
    println!("{}", String::from_utf8_lossy(&answer.body));
    Ok(if (200..300).contains(&answer.status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
