//! HTTP/2 (TLS with ALPN h2, or h2c for http:// URLs) with reqwest.

use anyhow::{Context, Result};

use super::{tls, Answer, Request, Unanswered};

/// Sends the request over HTTP/2 and reads the whole answer.
pub async fn send(req: &Request<'_>) -> Result<Answer> {
    // A redirect is an answer, not followed: the command goes where it was sent.
    // No proxy from the environment (`HTTPS_PROXY`, `ALL_PROXY`…): the command
    // and the bearer token go to the URL given, and nowhere else.
    let mut b = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    if req.tls.insecure {
        b = b.danger_accept_invalid_certs(true);
    }
    if let Some(ca) = &req.tls.ca {
        // Pinned: that CA alone (as over HTTP/3).
        b = b.tls_built_in_root_certs(false);
        for c in tls::read_pem_certs(ca)? {
            b = b.add_root_certificate(
                reqwest::Certificate::from_der(&c).context("CA certificate")?,
            );
        }
    }
    let port = req.url.port_u16().unwrap_or(match req.url.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    if let (Some(name), Some(host)) = (&req.tls.server_name, req.url.host()) {
        // Connect to the URL's address while presenting and verifying `name`.
        let ip: std::net::IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .context("--server-name with HTTP/2 needs an IP address in the URL")?;
        b = b.resolve(name, (ip, port).into());
    }
    let client = b.build().context("cannot build HTTP/2 client")?;
    let url = match (&req.tls.server_name, req.url.host()) {
        (Some(name), Some(host)) => req.url.to_string().replacen(host, name, 1),
        _ => req.url.to_string(),
    };
    let mut rb = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, req.content_type)
        .body(req.body.clone());
    if let Some(t) = req.token {
        rb = rb.bearer_auth(t);
    }
    // Once connected, the request may have arrived whole whatever failed next
    // (reqwest does not say when it is connected: from here on, a timeout is
    // taken as after the body went).
    req.sent.store(true, std::sync::atomic::Ordering::Relaxed);
    let resp = rb.send().await.map_err(|e| {
        let connected = !e.is_connect() && !e.is_builder();
        let e = anyhow::Error::new(e).context("HTTP/2 request failed");
        if connected {
            e.context(Unanswered)
        } else {
            e
        }
    })?;
    let status = resp.status().as_u16();
    let location = super::location(resp.headers());
    let mut resp = resp;
    let mut body = Vec::new();
    while let Some(c) = resp
        .chunk()
        .await
        .context("HTTP/2 response body")
        .context(Unanswered)?
    {
        super::push_bounded(&mut body, &c).context(Unanswered)?;
    }
    Ok(Answer {
        proto: "HTTP/2",
        status,
        body,
        location,
        closing: None,
    })
}
