//! The models' HTTP API: what serves each module, scoring a batch, and evaluating
//! opportunities against the module's state.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gw_core::{Code, Module};
use serde::Deserialize;
use serde_json::{json, Value};

use super::host::ModelHost;
use super::library::{Model, PredictError, MAX_ROWS};
use crate::control::ModuleTable;
use crate::error::ApiError;

/// Largest predict/evaluate body.
const MAX_SCORE_BODY: usize = 4 << 20;

/// Most values one `predict` may answer (rows × the model's outputs): a
/// one-feature model's 65 536 rows of 256 outputs would be about 16 M values,
/// some 200 MB of JSON and more than twice that as the answer's tree in memory.
/// About 12 MB of JSON at most. (`evaluate` answers one decision a row.)
pub const MAX_OUTPUT_VALUES: usize = 1 << 20;

/// What the API scores with.
#[derive(Clone)]
pub struct ModelsApi {
    host: Option<Arc<ModelHost>>,
    modules: ModuleTable,
    /// Scoring calls running at once (one per core).
    scoring: Arc<tokio::sync::Semaphore>,
}

/// What a call answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// Every output of every row; margins on request.
    Predict,
    /// One decision a row, from its first output; no margins.
    Evaluate,
}

/// Why a batch could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// No `models` section in the configuration.
    #[error("no models configured (models.dir)")]
    NotConfigured,
    /// The path names no model slot.
    #[error("no model slot `{0}` (mev, arbitrage)")]
    UnknownSlot(String),
    /// The body is not `{"rows": [[…]]}`.
    #[error("predict body: {0}")]
    Body(String),
    /// Nothing serves the slot yet.
    #[error("no model is serving `{0}` yet")]
    NotServing(String),
    /// More rows than one call takes.
    #[error("{0} rows; at most {MAX_ROWS}")]
    TooManyRows(usize),
    /// More values to answer than one call may.
    #[error("{rows} rows of {outputs} outputs; at most {MAX_OUTPUT_VALUES} values a call")]
    TooManyOutputs {
        /// Rows asked.
        rows: usize,
        /// The model's outputs per row.
        outputs: usize,
    },
    /// A row of the wrong width.
    #[error("row {row} has {got} features; the model takes {want}")]
    Width {
        /// Row index.
        row: usize,
        /// Its length.
        got: usize,
        /// The model's feature count.
        want: usize,
    },
    /// Margins asked of a call that answers with the model's outputs.
    #[error("evaluate gates on the model's output, not its margin: drop \"margin\"")]
    MarginRefused,
    /// The model failed.
    #[error("predict: {0}")]
    Predict(#[from] PredictError),
    /// The blocking task did not finish.
    #[error("predict task: {0}")]
    Task(String),
}

impl From<ScoreError> for ApiError {
    fn from(e: ScoreError) -> Self {
        let code = match &e {
            ScoreError::Predict(PredictError::NoMargin) | ScoreError::MarginRefused => {
                Code::BadArgs
            }
            ScoreError::NotConfigured
            | ScoreError::NotServing(_)
            | ScoreError::Predict(_)
            | ScoreError::Task(_) => Code::Unavailable,
            ScoreError::UnknownSlot(_) => Code::NotFound,
            ScoreError::Body(_) => Code::Malformed,
            ScoreError::TooManyRows(_) | ScoreError::TooManyOutputs { .. } => Code::TooLarge,
            ScoreError::Width { .. } => Code::BadArgs,
        };
        ApiError::with(code, e.to_string())
    }
}

/// `{"rows": [[…]], "margin": false}`; `null` is a missing value (so is a
/// number beyond `f32`'s range: [`super::feature`]); `margin: true`
/// asks for the raw sums of the trees instead of postprocessed outputs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody {
    rows: Vec<Vec<Option<f32>>>,
    #[serde(default)]
    margin: bool,
}

impl ModelsApi {
    /// The API over `host` (none: every call answers `unavailable`), gating
    /// evaluations with `modules`.
    pub fn new(host: Option<Arc<ModelHost>>, modules: ModuleTable) -> ModelsApi {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        ModelsApi {
            host,
            modules,
            scoring: Arc::new(tokio::sync::Semaphore::new(cores)),
        }
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/api/models", get(get_models))
            .route("/api/models/{module}/predict", post(predict))
            .route("/api/modules/{module}/evaluate", post(evaluate))
            .layer(DefaultBodyLimit::max(MAX_SCORE_BODY))
            .with_state(Arc::new(self))
    }

    fn host(&self) -> Result<&Arc<ModelHost>, ScoreError> {
        self.host.as_ref().ok_or(ScoreError::NotConfigured)
    }

    /// Parses a `{"rows": …}` body, scores it with the model serving `module`
    /// and makes the answer, `answer(model, outputs, margin)` (`n_outputs` per
    /// row; whether they are margins), as JSON bytes. Parsing, scoring and the
    /// answer all run off the runtime's workers, one call per core at a time: a
    /// flood of large bodies waits its turn rather than filling the blocking
    /// pool (which the ledger's shipping also uses), and the model is let go
    /// there. `call`: margins are scored for [`Call::Predict`] only (otherwise
    /// refused before the model runs); its answer is bounded by
    /// [`MAX_OUTPUT_VALUES`].
    async fn score(
        &self,
        module: &str,
        body: Bytes,
        call: Call,
        answer: impl FnOnce(&Model, &[f32], bool) -> Value + Send + 'static,
    ) -> Result<Vec<u8>, ScoreError> {
        let host = self.host()?.clone();
        if host.slot(module).is_none() {
            return Err(ScoreError::UnknownSlot(module.escape_debug().to_string()));
        }
        let module = module.to_owned();
        crate::blocking_turn(&self.scoring, move || {
            let (model, out, margin) = score_now(&host, &module, &body, call)?;
            serde_json::to_vec(&answer(&model, &out, margin))
                .map_err(|e| ScoreError::Task(format!("writing the answer: {e}")))
        })
        .await
        .map_err(ScoreError::Task)?
    }
}

/// [`ModelsApi::score`], on the calling thread.
fn score_now(
    host: &ModelHost,
    module: &str,
    body: &[u8],
    call: Call,
) -> Result<(Arc<Model>, Vec<f32>, bool), ScoreError> {
    let req: PredictBody =
        serde_json::from_slice(body).map_err(|e| ScoreError::Body(e.to_string()))?;
    if req.margin && call != Call::Predict {
        return Err(ScoreError::MarginRefused);
    }
    // Before whether a model serves: a refusal of what was asked (a row), not
    // an answer that nothing serves yet (503, the caller's to retry, no row).
    if req.rows.len() > MAX_ROWS {
        return Err(ScoreError::TooManyRows(req.rows.len()));
    }
    let model = host
        .current(module)
        .ok_or_else(|| ScoreError::NotServing(module.to_owned()))?;
    let n = model.n_features as usize;
    if call == Call::Predict {
        answer_fits(req.rows.len(), model.n_outputs as usize)?;
    }
    if let Some((i, row)) = req.rows.iter().enumerate().find(|(_, r)| r.len() != n) {
        return Err(ScoreError::Width {
            row: i,
            got: row.len(),
            want: n,
        });
    }
    // Sized only now: every row was checked to be what the body holds.
    let mut flat = Vec::with_capacity(req.rows.len() * n);
    for row in &req.rows {
        flat.extend(row.iter().map(|v| super::feature(*v)));
    }
    let out = if req.margin {
        model.predict_margin(&flat)
    } else {
        model.predict(&flat)
    }?;
    Ok((model, out, req.margin))
}

/// Whether `rows` of `outputs` values each fit one answer
/// ([`MAX_OUTPUT_VALUES`]).
fn answer_fits(rows: usize, outputs: usize) -> Result<(), ScoreError> {
    if rows.saturating_mul(outputs) > MAX_OUTPUT_VALUES {
        return Err(ScoreError::TooManyOutputs { rows, outputs });
    }
    Ok(())
}

type Api = State<Arc<ModelsApi>>;

/// The module the path names; 400 `malformed` in the API's shape when it is not
/// UTF-8 once decoded (axum's own answer is plain text).
fn slot(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(m)| m)
        .map_err(|e| ApiError::with(Code::Malformed, e.body_text()))
}

/// The body; beyond [`MAX_SCORE_BODY`] 413 `too_large`, one that did not arrive
/// whole 400 `malformed`, in the API's shape.
fn body_of(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        let code = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            Code::TooLarge
        } else {
            Code::Malformed
        };
        ApiError::with(code, e.body_text())
    })
}

/// What serves each module (`GET /api/models`).
async fn get_models(State(api): Api) -> Result<Json<Value>, ApiError> {
    let host = api.host()?;
    let view: serde_json::Map<String, Value> = host
        .view()
        .into_iter()
        .map(|(m, v)| (m.to_string(), json!(v)))
        .collect();
    Ok(Json(Value::Object(view)))
}

/// A JSON answer made off the runtime's workers ([`ModelsApi::score`]).
fn json_bytes(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Scores a batch with the module's serving model.
async fn predict(
    State(api): Api,
    module: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (module, body) = (slot(module)?, body_of(body)?);
    let named = module.clone();
    let answer = api
        .score(&module, body, Call::Predict, move |model, out, margin| {
            let outputs: Vec<&[f32]> = out.chunks(model.n_outputs as usize).collect();
            // JSON has no NaN or infinity (such a value is written `null`, which
            // a request's rows read as missing): the rows whose outputs are not
            // all finite are named.
            let non_finite: Vec<usize> = outputs
                .iter()
                .enumerate()
                .filter(|(_, o)| o.iter().any(|v| !v.is_finite()))
                .map(|(i, _)| i)
                .collect();
            json!({
                "module": named, "model": model.name, "version": model.version,
                "margin": margin, "postprocessor": model.postprocessor, "outputs": outputs,
                "non_finite_rows": non_finite
            })
        })
        .await?;
    Ok(json_bytes(answer))
}

/// `POST /api/modules/{module}/evaluate`: scores opportunities with the module's
/// model and says, per row, whether the module would send it now, as the hot path
/// decides (`strategy::decide`): the send gate (state, a throttle at 0 %,
/// `ev_min`), then the tip ladder — with the tip it would pay. The throttle's
/// rate is not consumed here (it counts sends, and this sends nothing).
async fn evaluate(
    State(api): Api,
    module: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (module, body) = (slot(module)?, body_of(body)?);
    let m = Module::parse(&module).ok_or_else(|| {
        ApiError::with(
            Code::NotFound,
            format!("unknown module `{}`", module.escape_debug()),
        )
    })?;
    let modules = api.modules.clone();
    let answer = api
        .score(m.as_str(), body, Call::Evaluate, move |model, out, _| {
            // The state once scored, as the hot path reads it after scoring.
            let state = modules.get(m);
            // The EV is each row's first output.
            let decisions: Vec<Value> = out
                .chunks(model.n_outputs as usize)
                .map(|o| {
                    let ev = o[0];
                    match state.may_send(Some(ev)) {
                        Err(why) => json!({"ev": ev, "send": false, "reason": why.as_str()}),
                        Ok(()) => match crate::sender::strategy::pick_rung(&state.tip_ladder, ev) {
                            Some((_, tip)) => json!({"ev": ev, "send": true, "tip": tip}),
                            None => json!({"ev": ev, "send": false, "reason": "below tip"}),
                        },
                    }
                })
                .collect();
            json!({
                "module": m.as_str(), "version": model.version, "ev_min": state.ev_min,
                "tip_ladder": state.tip_ladder,
                "state": state.state, "decisions": decisions
            })
        })
        .await?;
    Ok(json_bytes(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However wide the model, one answer holds at most a million values: the
    /// row limit alone let a 256-output model answer 16 M (about 0.5 GB of JSON).
    #[test]
    fn an_answer_holds_a_bounded_number_of_values() {
        assert!(answer_fits(MAX_ROWS, 1).is_ok());
        assert!(answer_fits(MAX_ROWS, 16).is_ok());
        let e = answer_fits(MAX_ROWS, 17).unwrap_err();
        assert!(matches!(
            e,
            ScoreError::TooManyOutputs {
                rows: MAX_ROWS,
                outputs: 17
            }
        ));
        assert_eq!(ApiError::from(e).code(), Code::TooLarge);
        assert!(answer_fits(4096, 256).is_ok());
        assert!(answer_fits(4097, 256).is_err());
        assert!(answer_fits(usize::MAX, 2).is_err(), "no overflow");
    }

    /// Too many rows is the caller's fault (413, a row) whether or not a model
    /// serves the slot yet: checked first, it was a 503 without a row while none did.
    #[test]
    fn too_many_rows_is_refused_before_anything_serves() {
        let d = testkit::TempDir::new("models-api-rows");
        let host = ModelHost::new(d.path(), |_| 8, crate::models::LoadPolicy::default());
        let one = |n: usize| {
            let rows = vec!["[]"; n].join(",");
            format!("{{\"rows\": [{rows}]}}").into_bytes()
        };
        let e = score_now(&host, "mev", &one(MAX_ROWS + 1), Call::Predict).unwrap_err();
        assert!(
            matches!(e, ScoreError::TooManyRows(n) if n == MAX_ROWS + 1),
            "{e}"
        );
        assert_eq!(ApiError::from(e).code(), Code::TooLarge);
        let e = score_now(&host, "mev", &one(1), Call::Predict).unwrap_err();
        assert!(matches!(e, ScoreError::NotServing(_)), "{e}");
    }
}
