//! Workers: list them, read a worker's failures, drain one.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::model::WorkerId;
use crate::store::StoreError;

/// Failures returned when the request names no `limit`.
const DEFAULT_FAILURES: u64 = 100;

/// How long a drained worker may finish its running tasks unless told.
const DEFAULT_GRACE_SECS: f64 = 30.0;

pub(super) async fn workers(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.workers()).await??;
    Ok(Json(rows).into_response())
}

fn unknown_worker(id: WorkerId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_worker",
        format!("no worker with id {id}"),
    )
}

/// The worker id from the path, as an `ApiError` when it is not one.
fn worker_id(path: Result<Path<WorkerId>, PathRejection>) -> Result<WorkerId, ApiError> {
    path.map(|Path(id)| id).map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_parameter",
            format!("worker id: {}", rejection.body_text()),
        )
    })
}

#[derive(Deserialize)]
pub(super) struct FailuresQuery {
    limit: Option<u64>,
}

/// The worker's failed attempts, newest first (`limit`: default 100, at most 1000).
pub(super) async fn failures(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<WorkerId>, PathRejection>,
    query: Result<Query<FailuresQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = worker_id(path)?;
    let Query(query) = query.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_parameter",
            format!("limit: {}", rejection.body_text()),
        )
    })?;
    let limit = query.limit.unwrap_or(DEFAULT_FAILURES);
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.worker_failures(id, limit)).await? {
        Ok(rows) => Ok(Json(rows).into_response()),
        Err(StoreError::UnknownWorker(id)) => Err(unknown_worker(id)),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    #[serde(default = "default_grace")]
    grace_secs: f64,
}

fn default_grace() -> f64 {
    DEFAULT_GRACE_SECS
}

/// Asks a connected worker to finish what runs within `grace_secs`, hand
/// back the rest and leave. The body is optional.
pub(super) async fn drain(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<WorkerId>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = worker_id(path)?;
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message);
    // An empty body (as from `curl -X POST`) means the defaults.
    let grace_secs = if body.iter().all(u8::is_ascii_whitespace) {
        DEFAULT_GRACE_SECS
    } else {
        serde_json::from_slice::<DrainRequest>(&body)
            .map_err(|e| bad(format!("drain request: {e}")))?
            .grace_secs
    };
    if !(grace_secs.is_finite() && grace_secs >= 0.0) {
        return Err(bad(
            "grace_secs must be a number of seconds, 0 or more".into()
        ));
    }
    // Float to int casts saturate, so an absurd grace is merely very long.
    let grace_ms = (grace_secs * 1000.0).round() as u64;
    if state.driver.drain(id, grace_ms).await {
        state.store.set_worker_draining(id, true);
        tracing::info!(worker = id, grace_ms, "worker asked to drain");
        return Ok(Json(serde_json::json!({ "draining": true })).into_response());
    }
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.worker(id)).await?? {
        None => Err(unknown_worker(id)),
        Some(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_connected",
            format!("worker {id} is not connected, so there is nothing to drain"),
        )),
    }
}
