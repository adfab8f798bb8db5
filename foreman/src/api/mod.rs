//! The REST API: submit jobs, follow them, fetch their results; see and
//! drain workers.

mod jobs;
mod workers;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use wasmgrid_worker::executor::Executor;

use crate::driver::Driver;
use crate::model::{JobId, Scheduler};
use crate::store::{Store, StoreError};

pub use jobs::{JobOptions, SubmitRequest, Submitted};

/// Largest upload (module and args together) unless configured otherwise.
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 256 << 20;

pub struct ApiState {
    pub store: Store,
    pub driver: Driver,
    /// Validates modules against the task world before a job is accepted.
    pub validator: Arc<Executor>,
    pub max_upload_bytes: usize,
    /// Modules stored and validated since start: a job naming one by hash skips both.
    pub validated: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    /// For jobs that name none (`foreman serve --scheduler`).
    pub default_scheduler: Scheduler,
}

impl ApiState {
    fn is_validated(&self, hash: &[u8; 32]) -> bool {
        self.validated
            .lock()
            .map(|set| set.contains(hash))
            .unwrap_or(false)
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    let max_upload = state.max_upload_bytes;
    Router::new()
        .route("/api/jobs", post(jobs::submit).get(jobs::list_jobs))
        .route("/api/jobs/{id}", get(jobs::job))
        .route("/api/jobs/{id}/results", get(jobs::results))
        .route("/api/jobs/{id}/wait", get(jobs::wait))
        .route("/api/jobs/{id}/events", get(jobs::events))
        .route("/api/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/workers", get(workers::workers))
        .route("/api/workers/{id}/failures", get(workers::failures))
        .route("/api/workers/{id}/drain", post(workers::drain))
        .route("/api/limits", get(limits))
        .merge(crate::dashboard::router())
        .layer(DefaultBodyLimit::max(max_upload))
        .with_state(state)
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
async fn limits(State(state): State<Arc<ApiState>>) -> Response {
    Json(serde_json::json!({
        "max_upload_bytes": state.max_upload_bytes,
        "max_upload_mib": state.max_upload_bytes >> 20,
    }))
    .into_response()
}
