//! The operator console: static assets served at `/` (built into the binary, no
//! CDN, no build step) and the live stream at `/api/realtime` ([`realtime`]).
//! The page reads the same APIs as `gwctl` through the edge, with the operator's
//! JWT; commands are signed in the browser (WebCrypto Ed25519) and posted to
//! the edge's command path (the configured `command_path`, written into the page)
//! like any other. See `docs/console.md`.

pub mod realtime;

use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page's assets: path, media type, bytes.
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../console/index.html"),
    ),
    (
        "/console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/console.js"),
    ),
    (
        "/console.css",
        "text/css; charset=utf-8",
        include_str!("../../console/console.css"),
    ),
    (
        "/favicon.svg",
        "image/svg+xml",
        include_str!("../../console/favicon.svg"),
    ),
];

/// Same-origin only: no inline script, no third-party anything, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(media: &'static str, body: Bytes) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(media)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ],
        body,
    )
        .into_response()
}

/// The page's placeholder for where signed commands go.
const COMMAND_PATH_META: &str = r#"<meta name="gw-command-path" content="/api/control/commands">"#;

/// `GET /`, `/console.js`, `/console.css`, `/favicon.svg`; the page posts signed
/// commands to `command_path` (the edge's; checked by the configuration: no
/// character HTML would read as markup).
pub fn router(command_path: &str) -> Router {
    let mut r = Router::new();
    for (path, media, body) in ASSETS {
        // Shared by every answer (a clone counts a reference).
        let body = if path == "/" {
            let meta = format!(r#"<meta name="gw-command-path" content="{command_path}">"#);
            Bytes::from(body.replacen(COMMAND_PATH_META, &meta, 1))
        } else {
            Bytes::from_static(body.as_bytes())
        };
        r = r.route(path, get(move || async move { asset(media, body.clone()) }));
    }
    r
}
