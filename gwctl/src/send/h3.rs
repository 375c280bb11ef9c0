//! HTTP/3 over QUIC with quinn + h3.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::{Buf, Bytes};

use super::{tls, Answer, Request, Unanswered};

/// Sends the request over HTTP/3 and reads the whole answer.
pub async fn send(req: &Request<'_>) -> Result<Answer> {
    let host = req.url.host().context("URL has no host")?;
    let port = req.url.port_u16().unwrap_or(443);
    let host_for_lookup = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host_for_lookup, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "{host} resolves to no address");
    let server_name = req
        .tls
        .server_name
        .clone()
        .unwrap_or_else(|| host_for_lookup.to_owned());

    let tls = tls::client_config(&req.tls, &[b"h3"])?;
    let quic = Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .context("TLS config is not usable for QUIC")?,
    );
    // Each address in turn (`localhost` is often ::1 first, where a gateway
    // listening on 127.0.0.1 never answers a UDP packet): the first handshake
    // that completes, each tried for a few seconds when there are others.
    let per_try = (addrs.len() > 1).then_some(std::time::Duration::from_secs(3));
    let mut failed = Vec::new();
    let mut connected = None;
    for addr in &addrs {
        match handshake(*addr, &server_name, quic.clone(), per_try).await {
            Ok(c) => {
                connected = Some(c);
                break;
            }
            Err(e) => failed.push(format!("{addr}: {e:#}")),
        }
    }
    let (endpoint, conn) = connected
        .with_context(|| format!("QUIC handshake with {host} failed ({})", failed.join("; ")))?;
    let (mut driver, mut sender) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .context("HTTP/3 connection setup failed")?;
    let drive = tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });

    let mut builder = http::Request::builder()
        .method(http::Method::POST)
        .uri(req.url.clone())
        .header(http::header::CONTENT_TYPE, req.content_type)
        .header(http::header::CONTENT_LENGTH, req.body.len());
    if let Some(t) = req.token {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = builder.body(()).context("cannot build the request")?;
    let mut stream = sender
        .send_request(request)
        .await
        .context("cannot send HTTP/3 request")?;
    // From the body on, the request may have arrived whole whatever fails next.
    req.sent.store(true, std::sync::atomic::Ordering::Relaxed);
    let (resp, body) = async {
        stream
            .send_data(Bytes::from(req.body.clone()))
            .await
            .context("cannot send the body")?;
        stream.finish().await.context("cannot finish the request")?;
        let resp = stream.recv_response().await.context("no HTTP/3 response")?;
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.context("response body")? {
            while chunk.has_remaining() {
                let c = chunk.chunk();
                super::push_bounded(&mut body, c)?;
                let n = c.len();
                chunk.advance(n);
            }
        }
        anyhow::Ok((resp, body))
    }
    .await
    .context(Unanswered)?;
    drop(stream);
    drop(sender);
    conn.close(0u32.into(), b"done");
    drive.abort();
    Ok(Answer {
        proto: "HTTP/3",
        status: resp.status().as_u16(),
        location: super::location(resp.headers()),
        body,
        // The close goes out after the answer is taken, outside its deadline.
        closing: Some(endpoint),
    })
}

/// A QUIC connection to `addr` from an endpoint of its own, within `limit` when
/// given.
async fn handshake(
    addr: SocketAddr,
    server_name: &str,
    quic: Arc<quinn::crypto::rustls::QuicClientConfig>,
    limit: Option<std::time::Duration>,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .context("bind address")?;
    let mut endpoint = quinn::Endpoint::client(bind).context("cannot open a UDP socket")?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(quic));
    let connecting = endpoint
        .connect(addr, server_name)
        .context("cannot start QUIC connection")?;
    let conn = match limit {
        Some(t) => tokio::time::timeout(t, connecting)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {} s", t.as_secs()))?,
        None => connecting.await,
    }
    .context("handshake failed")?;
    Ok((endpoint, conn))
}
