//! The sidecar's one API error: a stable [`Code`] (its HTTP status comes from the
//! code's table), a detail for operators, and one [`IntoResponse`]. Each capability
//! keeps its own typed errors and says here which code each one answers with.

use std::borrow::Cow;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use gw_core::{Code, Reject};

/// An error answer: `{"error": "<code>", "detail": "...", ...}` with the code's
/// status (and, for some, more fields: a replay says what became of the command).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError(Reject, Option<serde_json::Map<String, serde_json::Value>>);

impl ApiError {
    /// An error with a fixed detail.
    pub const fn new(code: Code, detail: &'static str) -> ApiError {
        ApiError(Reject::new(code, detail), None)
    }

    /// An error with a formatted detail.
    pub fn with(code: Code, detail: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError(
            Reject {
                code,
                detail: detail.into(),
            },
            None,
        )
    }

    /// The same error with `fields` added to its body.
    #[must_use]
    pub fn with_fields(mut self, fields: serde_json::Map<String, serde_json::Value>) -> ApiError {
        self.1 = Some(fields);
        self
    }

    /// The extra fields of its body.
    pub fn fields(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.1.as_ref()
    }

    /// The stable code.
    pub fn code(&self) -> Code {
        self.0.code
    }

    /// The detail.
    pub fn detail(&self) -> &str {
        &self.0.detail
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ApiError {}

impl From<Reject> for ApiError {
    fn from(r: Reject) -> Self {
        ApiError(r, None)
    }
}

impl From<ApiError> for Reject {
    fn from(e: ApiError) -> Self {
        e.0
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = match self.1 {
            None => self.0.to_json(),
            Some(mut fields) => {
                fields.insert("error".into(), self.0.code.as_str().into());
                fields.insert("detail".into(), self.0.detail.to_string().into());
                serde_json::Value::Object(fields).to_string()
            }
        };
        let mut r = (
            status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response();
        r.extensions_mut().insert(Answered(self.0.code));
        r
    }
}

/// The code an [`ApiError`] answered with, on its response: for a layer that
/// records the refusals of routes that write no row themselves
/// (`serve::record_refusals_of_reads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered(pub Code);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_body_follow_the_code() {
        for code in Code::ALL {
            let r = ApiError::with(*code, "why").into_response();
            assert_eq!(r.status().as_u16(), code.http_status(), "{code}");
            assert_eq!(
                r.headers()[header::CONTENT_TYPE],
                "application/json",
                "{code}"
            );
            assert_eq!(r.extensions().get(), Some(&Answered(*code)), "{code}");
        }
    }
}
