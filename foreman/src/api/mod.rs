//! The REST API: submit jobs, follow them, fetch their results; see and
//! drain workers; manage tokens; the dashboard's views, an event stream,
//! Prometheus metrics, and an OpenAPI document of all of it. Who may call
//! what is `auth`'s job (client tokens).

mod auth;
mod cors;
mod events;
mod jobs;
mod metrics;
mod params;
mod tokens;
mod views;
mod workers;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_stream;
#[cfg(test)]
mod tests_tokens;
#[cfg(test)]
mod tests_views;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use wasmgrid_jobspec::SubmitLimits;
use wasmgrid_worker::executor::Executor;

use crate::driver::Driver;
use crate::model::{JobId, Scheduler};
use crate::store::{Store, StoreError};

pub use auth::Caller;
pub use jobs::{JobOptions, SubmitRequest, Submitted};
pub use workers::{WorkerStatus, WorkerView};

/// Largest upload (module and args together) unless configured otherwise.
use wasmgrid_protocol::TaskLimits;

pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 256 << 20;

/// What a task may send back (`foreman serve --max-result-kib` and
/// `--max-output-kib`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// The largest result limit a job may ask for, and the default.
    pub result_bytes: u32,
    /// The most stdout (and stderr) a job may ask to keep per task.
    pub max_output_bytes: u32,
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits {
            result_bytes: TaskLimits::DEFAULT_RESULT_BYTES,
            max_output_bytes: TaskLimits::DEFAULT_OUTPUT_BYTES,
        }
    }
}

impl OutputLimits {
    /// Largest frame a worker needs: a batch's byte budget plus one report
    /// at the limits (lossy UTF-8 may triple output), plus slack.
    pub fn max_worker_frame(&self) -> usize {
        wasmgrid_protocol::wire::FINISHED_BATCH_BYTES
            + self.result_bytes as usize
            + 6 * self.max_output_bytes as usize
            + 4 * wasmgrid_protocol::Failure::MAX_MESSAGE_BYTES
            + (1 << 20)
    }
}

pub struct ApiState {
    pub store: Store,
    pub driver: Driver,
    /// Validates modules against the task world before a job is accepted.
    pub validator: Arc<Executor>,
    pub max_upload_bytes: usize,
    /// Caps on each job (`foreman serve --max-…`), whatever it asks.
    pub submit_limits: SubmitLimits,
    /// Modules stored and validated since start, with their sizes: a job
    /// naming one by hash skips both.
    pub validated: std::sync::Mutex<std::collections::HashMap<[u8; 32], u64>>,
    /// For jobs that name none (`foreman serve --scheduler`).
    pub default_scheduler: Scheduler,
    /// The foreman's (`foreman serve --heartbeat-timeout`): workers beat
    /// three times within it, which tells a healthy worker from a late one.
    pub heartbeat_timeout: Duration,
    /// Tokens and who needs one.
    pub security: Security,
    pub output_limits: OutputLimits,
}

/// The API's side of security (see `auth`).
pub struct Security {
    pub tokens: Arc<crate::tokens::Tokens>,
    /// The certificate fingerprint join tokens are handed out with.
    pub fingerprint: String,
    /// Reads need a token too (the API listens beyond loopback).
    pub protect_reads: bool,
    /// The one other origin allowed to call from a browser (`--cors-origin`); none by default.
    pub cors_origin: Option<axum::http::HeaderValue>,
}

impl ApiState {
    /// The size of a module stored and validated since start.
    fn validated_size(&self, hash: &[u8; 32]) -> Option<u64> {
        self.validated
            .lock()
            .ok()
            .and_then(|map| map.get(hash).copied())
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "wasmgrid foreman",
        description = "Jobs of wasm tasks on a grid of workers."
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The routes and the OpenAPI document, from one list.
fn routes() -> (Router<Arc<ApiState>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(jobs::submit, jobs::list_jobs))
        .routes(routes!(jobs::job, jobs::delete))
        .routes(routes!(jobs::results))
        .routes(routes!(jobs::wait))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::cancel))
        .routes(routes!(views::tasks))
        .routes(routes!(views::summary))
        .routes(routes!(views::stats))
        .routes(routes!(workers::workers))
        .routes(routes!(workers::worker))
        .routes(routes!(workers::failures))
        .routes(routes!(workers::drain))
        .routes(routes!(workers::all_failures))
        .routes(routes!(workers::failure_stats))
        .routes(routes!(events::events))
        .routes(routes!(metrics::metrics))
        .routes(routes!(tokens::create, tokens::list))
        .routes(routes!(tokens::revoke))
        .routes(routes!(tokens::whoami))
        .routes(routes!(limits))
        .routes(routes!(openapi))
        .split_for_parts()
}

/// The OpenAPI document (the routes' own list, so never out of date).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes().1
}

pub fn router(state: Arc<ApiState>) -> Router {
    let max_upload = state.max_upload_bytes;
    let (router, document) = routes();
    router
        .merge(crate::dashboard::router())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        // Outside auth: a preflight carries no token.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cors::allow_origin,
        ))
        .layer(Extension(Arc::new(document)))
        .layer(DefaultBodyLimit::max(max_upload))
        .with_state(state)
}

/// This API, as an OpenAPI 3 document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "meta",
    responses((status = 200, body = Object, description = "OpenAPI 3.1")))]
async fn openapi(Extension(document): Extension<Arc<utoipa::openapi::OpenApi>>) -> Response {
    Json(document.as_ref()).into_response()
}

/// The body of every error response.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ErrorBody {
    /// `{code, message}`; `code` is stable, `message` names the bad parameter.
    #[schema(value_type = Object)]
    error: serde_json::Value,
}

/// `{ "error": { "code", "message" } }` with a status.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn job_not_found(id: JobId) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job with id {id}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::TooManyUnfinishedJobs { .. } => {
                return Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "limit_exceeded",
                    error.to_string(),
                );
            }
            // Deleted with the last job that named it since it was validated.
            StoreError::UnknownModule(_) => {
                return Self::new(StatusCode::NOT_FOUND, "unknown_module", error.to_string());
            }
            _ => {}
        }
        tracing::error!("store: {error}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store",
            error.to_string(),
        )
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            error.to_string(),
        )
    }
}

/// What the foreman accepts, so a client can refuse an oversized upload
/// before sending it (a server that stops reading mid-upload can only reset
/// the connection, and the client would never see the 413).
#[utoipa::path(get, path = "/api/limits", tag = "meta",
    responses((status = 200, body = Object,
        description = "{max_upload_bytes, max_upload_mib, max_module_bytes, max_module_mib, max_args_bytes, max_args_mib, max_tasks_per_job, max_fuel, max_memory_mib, max_timeout_secs, defaults: {fuel, memory_mib, timeout_secs}}")))]
async fn limits(State(state): State<Arc<ApiState>>) -> Response {
    let caps = &state.submit_limits;
    Json(serde_json::json!({
        "max_upload_bytes": state.max_upload_bytes,
        "max_upload_mib": state.max_upload_bytes >> 20,
        "max_module_bytes": caps.max_module_bytes,
        "max_module_mib": caps.max_module_bytes >> 20,
        "max_args_bytes": caps.max_args_bytes,
        "max_args_mib": caps.max_args_bytes >> 20,
        "max_tasks_per_job": caps.max_tasks_per_job,
        "max_fuel": caps.max_fuel,
        "max_memory_mib": caps.max_memory_mib,
        "max_timeout_secs": caps.max_timeout_secs,
        "max_unfinished_jobs_per_token": caps.max_unfinished_jobs_per_token,
        "max_result_bytes": state.output_limits.result_bytes,
        "max_output_bytes": state.output_limits.max_output_bytes,
        // What a job that asks for none of these gets.
        "defaults": {
            "fuel": caps.default_fuel(),
            "memory_mib": caps.default_memory_mib(),
            "timeout_secs": caps.default_timeout_secs(),
        },
    }))
    .into_response()
}
