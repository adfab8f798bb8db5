//! Workers: list them with their health, read failures, drain one.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use wasmgrid_protocol::FailureKind;

use super::params::{bad_parameter, Params};
use super::{ApiError, ApiState};
use crate::model::WorkerId;
use crate::store::{FailureRow, FailureStats, StoreError, WorkerRow};

/// How long a drained worker may finish its running tasks unless told.
const DEFAULT_GRACE_SECS: f64 = 30.0;

/// What a worker is doing, as the dashboard shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerStatus {
    /// Connected, no heartbeat yet.
    Starting,
    Healthy,
    /// Connected, but its last heartbeat is older than two heartbeat periods.
    Unhealthy,
    /// Gets no tasks until `cooldown_until_ms`, after too many failures.
    CoolingDown,
    Draining,
    Offline,
}

/// A worker row as the API shows it: the stored row and what follows from it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkerView {
    #[serde(flatten)]
    pub row: WorkerRow,
    pub status: WorkerStatus,
    /// Slots running a task: for a connected worker, as dispatch counts
    /// them (the tasks it holds, up to its slots) and current to its last
    /// report; 0 for an offline one.
    pub slots_used: u32,
    /// Fuel per second on one slot (its benchmark at join).
    pub speed: u64,
}

impl WorkerView {
    /// `heartbeat_timeout`: the foreman's; workers beat three times within
    /// it. `busy`: its busy slots as the core counts them, if connected
    /// (else the last heartbeat's figure is shown while it is online).
    pub fn new(
        row: WorkerRow,
        now_ms: u64,
        heartbeat_timeout: Duration,
        busy: Option<u32>,
    ) -> WorkerView {
        let period_ms = (heartbeat_timeout.as_millis() / 3).max(1) as u64;
        let status = if !row.online {
            WorkerStatus::Offline
        } else if row.draining {
            WorkerStatus::Draining
        } else if row.cooldown_until_ms.is_some_and(|until| until > now_ms) {
            WorkerStatus::CoolingDown
        } else {
            match row.last_heartbeat_ms {
                None => WorkerStatus::Starting,
                Some(at) if now_ms.saturating_sub(at) > 2 * period_ms => WorkerStatus::Unhealthy,
                Some(_) => WorkerStatus::Healthy,
            }
        };
        let slots_used = match (row.online, busy) {
            (false, _) => 0,
            (true, Some(busy)) => busy,
            (true, None) => row.load.running,
        };
        WorkerView {
            status,
            slots_used,
            speed: row.info.benchmark_fuel_per_sec,
            row,
        }
    }
}

pub(super) async fn views(state: &ApiState, rows: Vec<WorkerRow>) -> Vec<WorkerView> {
    let busy = state.driver.busy_slots().await;
    let now = crate::driver::unix_ms();
    rows.into_iter()
        .map(|row| {
            let busy = busy.get(&row.id).copied();
            WorkerView::new(row, now, state.heartbeat_timeout, busy)
        })
        .collect()
}

/// Every worker ever registered, by id.
#[utoipa::path(get, path = "/api/workers", tag = "workers",
    responses((status = 200, body = Vec<WorkerView>)))]
pub(super) async fn workers(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.workers()).await??;
    Ok(Json(views(&state, rows).await).into_response())
}

/// One worker.
#[utoipa::path(get, path = "/api/workers/{id}", tag = "workers",
    params(("id" = u64, Path, description = "worker id")),
    responses((status = 200, body = WorkerView), (status = 404, description = "unknown_worker")))]
pub(super) async fn worker(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<WorkerId>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = worker_id(path)?;
    let store = state.store.clone();
    let row = tokio::task::spawn_blocking(move || store.worker(id))
        .await??
        .ok_or_else(|| unknown_worker(id))?;
    let view = views(&state, vec![row])
        .await
        .pop()
        .ok_or_else(|| unknown_worker(id))?;
    Ok(Json(view).into_response())
}

pub(super) fn unknown_worker(id: WorkerId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_worker",
        format!("no worker with id {id}"),
    )
}

/// The worker id from the path, as an `ApiError` when it is not one.
fn worker_id(path: Result<Path<WorkerId>, PathRejection>) -> Result<WorkerId, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|rejection| bad_parameter("worker id", rejection.body_text()))
}

fn parse_kind(text: &str) -> Option<FailureKind> {
    FailureKind::ALL.into_iter().find(|k| k.as_str() == text)
}

fn kind_names() -> String {
    FailureKind::ALL.map(FailureKind::as_str).join(", ")
}

async fn failure_rows(
    state: &ApiState,
    worker: Option<WorkerId>,
    params: &Params,
) -> Result<Vec<FailureRow>, ApiError> {
    let page = params.page()?;
    let kind = params.parsed("kind", &kind_names(), parse_kind)?;
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.failures(worker, kind, page.skip, page.limit))
        .await?
    {
        Ok(rows) => Ok(rows),
        Err(StoreError::UnknownWorker(id)) => Err(unknown_worker(id)),
        Err(e) => Err(e.into()),
    }
}

/// The worker's failed attempts, newest first.
#[utoipa::path(get, path = "/api/workers/{id}/failures", tag = "workers",
    params(("id" = u64, Path, description = "worker id"),
        ("kind" = Option<FailureKind>, Query, description = "only failures of this FailureKind"),
        ("skip" = Option<u64>, Query), ("limit" = Option<u64>, Query, description = "default 100, at most 1000")),
    responses((status = 200, body = Vec<FailureRow>), (status = 400), (status = 404)))]
pub(super) async fn failures(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<WorkerId>, PathRejection>,
    params: Params,
) -> Result<Response, ApiError> {
    let id = worker_id(path)?;
    Ok(Json(failure_rows(&state, Some(id), &params).await?).into_response())
}

/// Failed attempts on every worker (or `worker`'s), newest first.
#[utoipa::path(get, path = "/api/worker-failures", tag = "workers",
    params(("worker" = Option<u64>, Query), ("kind" = Option<FailureKind>, Query, description = "a FailureKind"),
        ("skip" = Option<u64>, Query), ("limit" = Option<u64>, Query, description = "default 100, at most 1000")),
    responses((status = 200, body = Vec<FailureRow>), (status = 400), (status = 404)))]
pub(super) async fn all_failures(
    State(state): State<Arc<ApiState>>,
    params: Params,
) -> Result<Response, ApiError> {
    let worker = params.u64("worker")?;
    Ok(Json(failure_rows(&state, worker, &params).await?).into_response())
}

/// Failed attempts counted by worker and by kind.
#[utoipa::path(get, path = "/api/worker-failure-stats", tag = "workers",
    responses((status = 200, body = FailureStats)))]
pub(super) async fn failure_stats(
    State(state): State<Arc<ApiState>>,
) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let stats = tokio::task::spawn_blocking(move || store.failure_stats()).await??;
    Ok(Json(stats).into_response())
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
#[utoipa::path(post, path = "/api/workers/{id}/drain", tag = "workers",
    params(("id" = u64, Path, description = "worker id")),
    request_body(content = Object, description = "optional: {\"grace_secs\": 30}"),
    responses((status = 200, description = "{\"draining\": true}"), (status = 400), (status = 404), (status = 409, description = "not_connected")))]
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
