//! Jobs: submit, list, follow, fetch results, cancel.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
pub use wasmgrid_jobspec::JobOptions;
use wasmgrid_jobspec::{parse_submission, ModuleRef, SubmitError};
use wasmgrid_protocol::{FailureKind, TaskLimits};
use wasmgrid_worker::executor::ModuleId;

use super::params::Params;
use super::{ApiError, ApiState, Caller, OutputLimits};
use crate::driver::Input;
use crate::model::{JobId, JobState, TaskState};
use crate::store::{Deletion, InsertCommit, JobRow, NewJob, StoreError, TaskOutcomeRow, TokenRole};
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
pub struct SubmitRequest {
    /// The module, base64; or `module_sha256` of one already stored.
    pub module_base64: Option<String>,
    pub module_sha256: Option<String>,
    /// One JSON value per task.
    #[schema(value_type = Vec<Object>)]
    pub args: Box<RawValue>,
    /// [`JobOptions`]; read apart from the rest so a bad option is named as one.
    #[serde(default)]
    #[schema(value_type = Option<JobOptions>)]
    pub options: Option<serde_json::Value>,
}

/// The stdout/stderr bytes a job keeps: what it asks, within the foreman's cap.
fn output_bytes(asked_kib: Option<u32>, limits: &OutputLimits) -> Result<u32, String> {
    let Some(kib) = asked_kib else {
        return Ok(TaskLimits::DEFAULT_OUTPUT_BYTES.min(limits.max_output_bytes));
    };
    let bytes = kib.saturating_mul(1024);
    if bytes > limits.max_output_bytes {
        return Err(format!(
            "output_kib {kib} is over this foreman's limit of {} KiB per stream (foreman serve --max-output-kib)",
            limits.max_output_bytes / 1024
        ));
    }
    Ok(bytes)
}

/// The result limit of a job: what it asks, within the foreman's cap.
fn result_bytes(asked_kib: Option<u32>, limits: &OutputLimits) -> Result<u32, String> {
    let Some(kib) = asked_kib else {
        return Ok(limits.result_bytes);
    };
    let bytes = kib.saturating_mul(1024);
    if kib == 0 || bytes > limits.result_bytes {
        return Err(format!(
            "result_kib {kib} is not between 1 and this foreman's limit of {} KiB (foreman serve --max-result-kib)",
            limits.result_bytes / 1024
        ));
    }
    Ok(bytes)
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    pub id: JobId,
    pub tasks: u32,
}

#[derive(Deserialize)]
pub(super) struct SubmitQuery {
    wait_ms: Option<u64>,
}

/// Accepts a job: its module (checked against the task world) and one argument
/// set per task, within the foreman's limits (`GET /api/limits`). With
/// `?wait_ms=N` the answer waits up to N ms for the job to finish and then
/// carries its `state`, `results` and `failures` too: a call in one request.
#[utoipa::path(post, path = "/api/jobs", tag = "jobs", request_body = SubmitRequest,
    params(("wait_ms" = Option<u64>, Query, description = "wait up to this long (at most 60000) and answer with the results")),
    responses((status = 201, body = Submitted, description = "the job; with wait_ms also its state, and results and failures once finished"),
        (status = 400, body = super::ErrorBody),
        (status = 404, description = "unknown_module"),
        (status = 413, description = "too_large, or limit_exceeded: module, args or tasks over a cap"),
        (status = 422, description = "invalid_module or wrong_world, or limit_exceeded: fuel, memory or timeout over a cap")))]
pub(super) async fn submit(
    State(state): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    Query(query): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the upload is larger than the foreman's limit of {} MiB (foreman serve --max-upload-mib)",
                    state.max_upload_bytes >> 20
                ),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", rejection.body_text())
        }
    })?;
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Expected request with `Content-Type: application/json`",
        ));
    }
    let submission = parse_submission(&body, &state.submit_limits).map_err(submit_error)?;
    // A module validated since start is taken by its hash, uploaded again or not.
    let known = match &submission.module {
        // Unless it went with the last job that named it: the upload is
        // then checked and stored again.
        ModuleRef::Inline {
            sha256: Some(hash), ..
        } => state
            .validated_size(hash)
            .filter(|_| state.store.name_module_if_known(hash))
            .map(|size| (*hash, size)),
        ModuleRef::Stored(hash) => state.validated_size(hash).map(|size| (*hash, size)),
        ModuleRef::Inline { sha256: None, .. } => None,
    };
    let hash = match (known, submission.module) {
        (Some((hash, size)), _) => {
            // Stored under an earlier, larger cap: today's cap still applies.
            SubmitError::check_module_size(size, &state.submit_limits).map_err(submit_error)?;
            hash
        }
        (None, ModuleRef::Inline { wasm, .. }) => validate_and_store(&state, wasm).await?,
        (None, ModuleRef::Stored(hash)) => {
            let store = state.store.clone();
            let wasm = tokio::task::spawn_blocking(move || store.module(&hash))
                .await??
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "unknown_module",
                        "no module with that sha256 is stored",
                    )
                })?;
            SubmitError::check_module_size(wasm.len() as u64, &state.submit_limits)
                .map_err(submit_error)?;
            validate_and_store(&state, wasm).await?
        }
    };
    let options = submission.options;
    let new_job = NewJob {
        module: hash,
        limits: TaskLimits {
            output_bytes: output_bytes(options.output_kib, &state.output_limits)
                .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "bad_options", m))?,
            result_bytes: result_bytes(options.result_kib, &state.output_limits)
                .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "bad_options", m))?,
            ..submission.task_limits
        },
        max_retries: options.retries,
        priority: options.priority,
        scheduler: options.scheduler.unwrap_or(state.default_scheduler),
        not_before_ms: options.not_before_ms,
        retry_deterministic: options.retry_deterministic,
        args: submission
            .args
            .iter()
            .map(|raw| raw.get().to_owned())
            .collect(),
    };
    let cap = state.submit_limits.max_unfinished_jobs_per_token;
    let quota = caller.map(|Extension(c)| (c.token_id, cap));
    let args: Vec<Arc<str>> = new_job.args.iter().map(|a| Arc::from(a.as_str())).collect();
    // A caller that waits for the end gets one commit for the job's whole
    // short life; one that does not gets its id as soon as the job is stored.
    let commit = if query.wait_ms.is_some() {
        InsertCommit::WithItsTasks
    } else {
        InsertCommit::AtOnce
    };
    let (spec, pending) = state.store.insert_job(new_job, quota, commit)?;
    let submitted = Submitted {
        id: spec.id,
        tasks: spec.task_count,
    };
    // Subscribed before the driver has the job, so its end cannot be missed.
    let changes = query.wait_ms.map(|_| state.store.job_events());
    // Dispatched while the insert commits: a short job's task runs meanwhile.
    state.driver.send(Input::Submit { spec, args });
    let stored = tokio::time::timeout(STORE_WAIT, state.store.job_stored(pending))
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::WriteFailed(format!(
                "the job was not stored within {} s (see the foreman's log)",
                STORE_WAIT.as_secs()
            )))
        });
    if let Err(error) = stored {
        // Not stored, so not accepted: stop what was dispatched.
        state.driver.cancel(submitted.id).await;
        return Err(error.into());
    }
    let (Some(wait_ms), Some(mut changes)) = (query.wait_ms, changes) else {
        return Ok((StatusCode::CREATED, Json(submitted)).into_response());
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms).min(MAX_WAIT);
    finished_event(&mut changes, submitted.id, deadline).await;
    let id = submitted.id;
    let row = job_row(&state, id).await?;
    let rows = if row.state.is_finished() {
        outcomes(&state, &row).await?
    } else {
        None
    };
    let mut body = format!(
        "{{\"id\":{},\"tasks\":{},\"state\":{}",
        submitted.id,
        submitted.tasks,
        serde_json::to_string(&row.state).unwrap_or_else(|_| "null".into())
    );
    if let Some(rows) = rows {
        body.push(',');
        push_outcomes(&mut body, &rows);
    }
    body.push('}');
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// A refused submission: caps on what is sent are 413, caps on what a task uses 422.
fn submit_error(error: SubmitError) -> ApiError {
    let status = match &error {
        SubmitError::LimitExceeded { limit, .. } if limit.is_size() => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        SubmitError::LimitExceeded { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, error.code(), error.to_string())
}

/// Checks a module against the task world and stores it; returns its sha256.
async fn validate_and_store(state: &Arc<ApiState>, wasm: Vec<u8>) -> Result<[u8; 32], ApiError> {
    let validator = state.validator.clone();
    let checked =
        tokio::task::spawn_blocking(move || validator.load(&wasm).map(|(task, _)| (task.id, wasm)))
            .await?;
    let (ModuleId(hash), wasm) = checked.map_err(|failure| {
        let code = if failure.kind == FailureKind::WrongWorld {
            "wrong_world"
        } else {
            "invalid_module"
        };
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, failure.to_string())
    })?;
    let size = wasm.len() as u64;
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.put_module(&hash, &wasm)).await??;
    if let Ok(mut validated) = state.validated.lock() {
        validated.insert(hash, size);
    }
    Ok(hash)
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/api/jobs", tag = "jobs",
    params(("status" = Option<JobState>, Query, description = "queued, running, completed, failed or cancelled"),
        ("skip" = Option<u64>, Query), ("limit" = Option<u64>, Query, description = "default 100, at most 1000")),
    responses((status = 200, body = Vec<JobRow>), (status = 400, body = super::ErrorBody)))]
pub(super) async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    params: Params,
) -> Result<Response, ApiError> {
    let page = params.page()?;
    let status = params.parsed(
        "status",
        "queued, running, completed, failed or cancelled",
        parse_job_state,
    )?;
    let store = state.store.clone();
    let jobs =
        tokio::task::spawn_blocking(move || store.jobs(page.skip, page.limit, status)).await??;
    Ok(Json(jobs).into_response())
}

fn parse_job_state(text: &str) -> Option<JobState> {
    [
        JobState::Queued,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
}

/// One job and its task counters.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = JobRow), (status = 404, body = super::ErrorBody)))]
pub(super) async fn job(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
) -> Result<Response, ApiError> {
    Ok(Json(job_row(&state, id).await?).into_response())
}

#[derive(Serialize)]
struct TaskFailure {
    index: u32,
    kind: FailureKind,
    message: String,
}

/// Every task's result in argument order (null where none), and the failures by index.
#[utoipa::path(get, path = "/api/jobs/{id}/results", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = Object, description = "{results: [...], failures: [{index, kind, message}]}"),
        (status = 404, body = super::ErrorBody)))]
pub(super) async fn results(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
) -> Result<Response, ApiError> {
    let row = job_row(&state, id).await?;
    let rows = outcomes(&state, &row)
        .await?
        .ok_or_else(|| ApiError::job_not_found(id))?;
    let mut body = String::from("{");
    push_outcomes(&mut body, &rows);
    body.push('}');
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// Appends `"results":[...],"failures":[...]` for `rows` in argument order.
/// Results are JSON already: spliced in rather than parsed and re-encoded.
fn push_outcomes(body: &mut String, rows: &[TaskOutcomeRow]) {
    body.push_str("\"results\":[");
    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        match (&row.result, row.state) {
            (Some(json), TaskState::Succeeded) => body.push_str(json),
            _ => body.push_str("null"),
        }
        if let Some(failure) = &row.failure {
            failures.push(TaskFailure {
                index: row.index,
                kind: failure.kind,
                message: failure.message.clone(),
            });
        }
    }
    body.push_str("],\"failures\":");
    body.push_str(&serde_json::to_string(&failures).unwrap_or_else(|_| "[]".into()));
}

/// Cancels the job's queued and running tasks.
#[utoipa::path(post, path = "/api/jobs/{id}/cancel", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = Object, description = "{cancelled: bool, state}"),
        (status = 403, body = super::ErrorBody, description = "a user token cancels only its own jobs"),
        (status = 404, body = super::ErrorBody)))]
pub(super) async fn cancel(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
    caller: Option<Extension<Caller>>,
) -> Result<Response, ApiError> {
    if let Some(Extension(caller)) = caller.filter(|c| c.role == TokenRole::User) {
        let store = state.store.clone();
        let owner = tokio::task::spawn_blocking(move || store.job_token(id)).await??;
        if let Some(why) = caller.may_not_touch(id, owner, "cancels") {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why));
        }
    }
    let cancelled = state.driver.cancel(id).await;
    let store = state.store.clone();
    // The driver answers once the cancellation's records are queued: flush them before reading.
    let row = tokio::task::spawn_blocking(move || {
        if let Err(error) = store.flush() {
            tracing::warn!("flushing before reading a cancelled job: {error}");
        }
        store.job(id)
    })
    .await??
    .ok_or_else(|| ApiError::job_not_found(id))?;
    Ok(Json(serde_json::json!({ "cancelled": cancelled, "state": row.state })).into_response())
}

/// Deletes a finished job with its tasks, attempts and failures.
#[utoipa::path(delete, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = Object, description = "{id, deleted: true, tasks}"),
        (status = 403, body = super::ErrorBody, description = "a user token deletes only its own jobs"),
        (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody, description = "not_finished: cancel the job first")))]
pub(super) async fn delete(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
    caller: Option<Extension<Caller>>,
) -> Result<Response, ApiError> {
    let store = state.store.clone();
    if let Some(Extension(caller)) = caller.filter(|c| c.role == TokenRole::User) {
        let owner = tokio::task::spawn_blocking(move || store.job_token(id)).await??;
        if let Some(why) = caller.may_not_touch(id, owner, "deletes") {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why));
        }
    }
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.delete_job(id)).await?? {
        Deletion::Deleted { tasks } => {
            tracing::info!(job = id, tasks, "job deleted");
            Ok(Json(serde_json::json!({ "id": id, "deleted": true, "tasks": tasks })).into_response())
        }
        Deletion::NotFound => Err(ApiError::job_not_found(id)),
        Deletion::NotFinished(job_state) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_finished",
            format!(
                "job {id} is {}: only a finished job can be deleted; cancel it first (foreman cancel {id})",
                job_state.as_str()
            ),
        )),
    }
}

#[derive(Deserialize)]
pub(super) struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// Longest a `wait` holds the request open.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long a submission waits for its job to be stored: the store retries
/// a failing commit (a full disk) for ever, the submitter should not.
const STORE_WAIT: Duration = Duration::from_secs(30);

/// Jobs of up to this many tasks have their results read on the request's
/// own thread: a few rows take less than the two thread hops of
/// `spawn_blocking`, and reads in WAL mode never wait for the writer.
const READ_INLINE_TASKS: u32 = 256;

/// One row, read on the request's thread (see [`READ_INLINE_TASKS`]).
async fn job_row(state: &ApiState, id: JobId) -> Result<JobRow, ApiError> {
    state
        .store
        .job(id)?
        .ok_or_else(|| ApiError::job_not_found(id))
}

/// The job's task outcomes in argument order; `None` if the job is gone.
async fn outcomes(state: &ApiState, job: &JobRow) -> Result<Option<Vec<TaskOutcomeRow>>, ApiError> {
    if job.total <= READ_INLINE_TASKS {
        return Ok(state.store.results(job.id)?);
    }
    let store = state.store.clone();
    let id = job.id;
    Ok(tokio::task::spawn_blocking(move || store.results(id)).await??)
}

/// The job once it has finished, or as it is when `timeout_ms` runs out
/// (default 30 s): lets a client learn of completion without polling.
#[utoipa::path(get, path = "/api/jobs/{id}/wait", tag = "jobs",
    params(("id" = u64, Path, description = "job id"),
        ("timeout_ms" = Option<u64>, Query, description = "default 30000, at most 60000")),
    responses((status = 200, body = JobRow), (status = 404, body = super::ErrorBody)))]
pub(super) async fn wait(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
    Query(query): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let timeout = query
        .timeout_ms
        .map_or(Duration::from_secs(30), Duration::from_millis)
        .min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribe before reading, so a change between the two is not missed.
    let mut changes = state.store.job_events();
    loop {
        let row = job_row(&state, id).await?;
        if row.state.is_finished() {
            return Ok(Json(row).into_response());
        }
        if !finished_event(&mut changes, id, deadline).await {
            return Ok(Json(job_row(&state, id).await?).into_response());
        }
    }
}

/// Waits until `changes` says job `id` finished (true), or may have (true,
/// when events were missed), or `deadline` passed (false).
async fn finished_event(
    changes: &mut tokio::sync::broadcast::Receiver<(JobId, JobState)>,
    id: JobId,
    deadline: tokio::time::Instant,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Err(_) | Ok(Err(RecvError::Closed)) => return false,
            Ok(Ok((job, job_state))) if job == id && job_state.is_finished() => return true,
            Ok(Ok(_)) => continue,
            Ok(Err(RecvError::Lagged(_))) => return true,
        }
    }
}

/// Server-sent events: the job's row every 250 ms while it changes, ending
/// with its final state.
#[utoipa::path(get, path = "/api/jobs/{id}/events", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, content_type = "text/event-stream", body = String,
        description = "`progress` events carrying a JobRow"), (status = 404, body = super::ErrorBody)))]
pub(super) async fn events(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<JobId>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError>
{
    let first = job_row(&state, id).await?;
    let stream = futures_util::stream::unfold(
        (state, Some(first), None::<String>),
        move |(state, next, last)| async move {
            let row = match next {
                Some(row) => row,
                None => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    job_row(&state, id).await.ok()?
                }
            };
            let json = serde_json::to_string(&row).ok()?;
            if last.as_deref() == Some(json.as_str()) && !row.state.is_finished() {
                let event = Event::default().comment("unchanged");
                return Some((Ok(event), (state, None, last)));
            }
            if last.as_deref() == Some(json.as_str()) {
                return None;
            }
            let event = Event::default().event("progress").data(json.clone());
            Some((Ok(event), (state, None, Some(json))))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
