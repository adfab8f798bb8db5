//! `GET /api/events`: one server-sent event stream of what changes, for the
//! dashboard. `job` events carry a JobRow, `job_deleted` events `{id}`,
//! `worker` events a worker as `/api/workers/{id}` shows it, `stats` events
//! the `/api/stats` body.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::workers::views;
use super::{views::read_stats, ApiState};
use crate::model::{JobId, WorkerId};

/// Counter changes of one job are sent at most this often; state changes at once.
const JOB_THROTTLE: Duration = Duration::from_millis(250);
const STATS_EVERY: Duration = Duration::from_secs(1);

/// Job, worker and stats changes as server-sent events.
#[utoipa::path(get, path = "/api/events", tag = "dashboard",
    responses((status = 200, content_type = "text/event-stream", body = String,
        description = "events `job` (JobRow), `job_deleted` ({id}), `worker` (WorkerView), `stats` (Stats, every second)")))]
pub(super) async fn events(
    State(state): State<Arc<ApiState>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(follow(state, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Reads what changed and sends it until the client goes away.
async fn follow(state: Arc<ApiState>, tx: mpsc::Sender<Event>) {
    let mut changes = state.store.changes();
    let mut jobs = BTreeSet::new();
    let mut workers = BTreeSet::new();
    let mut flush = tokio::time::interval(JOB_THROTTLE);
    let mut stats = tokio::time::interval(STATS_EVERY);
    loop {
        let sent = tokio::select! {
            change = changes.recv() => match change {
                Ok(change) => {
                    jobs.extend(change.jobs.iter().copied());
                    workers.extend(change.workers.iter().copied());
                    for id in change.job_states.iter().chain(&change.deleted_jobs) {
                        jobs.remove(id);
                    }
                    send_deleted(&tx, &change.deleted_jobs).await
                        && (change.job_states.is_empty()
                            || send_jobs(&state, &tx, change.job_states.iter().copied().collect())
                                .await)
                }
                // Missed changes: the next stats event still tells the totals.
                Err(RecvError::Lagged(_)) => true,
                Err(RecvError::Closed) => return,
            },
            _ = flush.tick() => {
                send_jobs(&state, &tx, std::mem::take(&mut jobs)).await
                    && send_workers(&state, &tx, std::mem::take(&mut workers)).await
            }
            _ = stats.tick() => match read_stats(&state).await {
                Ok(stats) => send(&tx, "stats", &stats).await,
                Err(_) => true,
            },
            () = tx.closed() => return,
        };
        if !sent {
            return;
        }
    }
}

/// Whether the client is still there.
async fn send(tx: &mpsc::Sender<Event>, name: &str, value: &impl serde::Serialize) -> bool {
    match serde_json::to_string(value) {
        Ok(json) => tx
            .send(Event::default().event(name).data(json))
            .await
            .is_ok(),
        Err(_) => true,
    }
}

async fn send_deleted(tx: &mpsc::Sender<Event>, ids: &[JobId]) -> bool {
    for id in ids {
        if !send(tx, "job_deleted", &serde_json::json!({ "id": id })).await {
            return false;
        }
    }
    true
}

async fn send_jobs(state: &ApiState, tx: &mpsc::Sender<Event>, ids: BTreeSet<JobId>) -> bool {
    if ids.is_empty() {
        return true;
    }
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .filter_map(|id| store.job(id).ok().flatten())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for row in rows {
        if !send(tx, "job", &row).await {
            return false;
        }
    }
    true
}

async fn send_workers(state: &ApiState, tx: &mpsc::Sender<Event>, ids: BTreeSet<WorkerId>) -> bool {
    if ids.is_empty() {
        return true;
    }
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .filter_map(|id| store.worker(id).ok().flatten())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for view in views(state, rows).await {
        if !send(tx, "worker", &view).await {
            return false;
        }
    }
    true
}
