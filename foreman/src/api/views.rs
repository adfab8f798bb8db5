//! The dashboard's reads: grid totals, a page of a job's tasks, a job's summary.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::params::Params;
use super::{ApiError, ApiState};
use crate::model::{JobId, TaskState};
use crate::store::{JobSummary, Stats, TaskPage};

pub(super) async fn read_stats(state: &ApiState) -> Result<Stats, ApiError> {
    let busy = state.driver.busy_slots().await;
    let store = state.store.clone();
    Ok(tokio::task::spawn_blocking(move || store.stats(&busy)).await??)
}

/// Jobs, tasks, workers and throughput at a glance.
#[utoipa::path(get, path = "/api/stats", tag = "dashboard",
    responses((status = 200, body = Stats)))]
pub(super) async fn stats(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    Ok(Json(read_stats(&state).await?).into_response())
}

fn parse_task_state(text: &str) -> Option<TaskState> {
    [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
}

/// A page of the job's tasks in index order, with their last attempt's report.
#[utoipa::path(get, path = "/api/jobs/{id}/tasks", tag = "jobs",
    params(("id" = u64, Path, description = "job id"),
        ("status" = Option<TaskState>, Query, description = "queued, running, succeeded, failed or cancelled"),
        ("skip" = Option<u64>, Query), ("limit" = Option<u64>, Query, description = "default 100, at most 1000")),
    responses((status = 200, body = TaskPage), (status = 400), (status = 404)))]
pub(super) async fn tasks(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
    params: Params,
) -> Result<Response, ApiError> {
    let page = params.page()?;
    let status = params.parsed(
        "status",
        "queued, running, succeeded, failed or cancelled",
        parse_task_state,
    )?;
    let store = state.store.clone();
    let tasks = tokio::task::spawn_blocking(move || store.tasks(id, page.skip, page.limit, status))
        .await??
        .ok_or_else(|| ApiError::job_not_found(id))?;
    Ok(Json(tasks).into_response())
}

/// Failures by kind, attempts by worker, and a run-time histogram.
#[utoipa::path(get, path = "/api/jobs/{id}/summary", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = JobSummary), (status = 404)))]
pub(super) async fn summary(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let summary = tokio::task::spawn_blocking(move || store.job_summary(id))
        .await??
        .ok_or_else(|| ApiError::job_not_found(id))?;
    Ok(Json(summary).into_response())
}
