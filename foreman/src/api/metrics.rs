//! `GET /metrics`: Prometheus text exposition (format 0.0.4).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use super::workers::{views, WorkerStatus};
use super::{ApiError, ApiState};
use crate::store::{RunTimeHistogram, Stats, LATENCY_BUCKETS_MS};

/// The grid's state for Prometheus.
#[utoipa::path(get, path = "/metrics", tag = "monitoring",
    responses((status = 200, content_type = "text/plain", body = String)))]
pub(super) async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let (stats, histogram, workers) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((
            store.stats()?,
            store.run_time_histogram()?,
            store.workers()?,
        ))
    })
    .await??;
    let statuses: Vec<WorkerStatus> = views(&state, workers)
        .into_iter()
        .map(|w| w.status)
        .collect();
    let body = render(&stats, &histogram, &statuses);
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub(super) fn render(
    stats: &Stats,
    histogram: &RunTimeHistogram,
    workers: &[WorkerStatus],
) -> String {
    let mut out = String::new();
    header(&mut out, "wasmgrid_jobs", "gauge", "Jobs by state.");
    for (state, n) in [
        ("queued", stats.queued_jobs),
        ("running", stats.running_jobs),
        ("completed", stats.completed_jobs),
        ("failed", stats.failed_jobs),
        ("cancelled", stats.cancelled_jobs),
    ] {
        let _ = writeln!(out, "wasmgrid_jobs{{state=\"{state}\"}} {n}");
    }
    header(&mut out, "wasmgrid_tasks", "gauge", "Tasks by state.");
    for (state, n) in [
        ("queued", stats.queued_tasks),
        ("running", stats.active_tasks),
        ("succeeded", stats.total_tasks_completed),
        ("failed", stats.total_tasks_failed),
        ("cancelled", stats.cancelled_tasks),
    ] {
        let _ = writeln!(out, "wasmgrid_tasks{{state=\"{state}\"}} {n}");
    }
    header(
        &mut out,
        "wasmgrid_workers",
        "gauge",
        "Registered workers by status.",
    );
    for (status, name) in [
        (WorkerStatus::Starting, "starting"),
        (WorkerStatus::Healthy, "healthy"),
        (WorkerStatus::Unhealthy, "unhealthy"),
        (WorkerStatus::CoolingDown, "cooling-down"),
        (WorkerStatus::Draining, "draining"),
        (WorkerStatus::Offline, "offline"),
    ] {
        let n = workers.iter().filter(|&&s| s == status).count();
        let _ = writeln!(out, "wasmgrid_workers{{status=\"{name}\"}} {n}");
    }
    header(
        &mut out,
        "wasmgrid_fuel_consumed_total",
        "counter",
        "Fuel used by every attempt of every job.",
    );
    let _ = writeln!(out, "wasmgrid_fuel_consumed_total {}", stats.fuel_consumed);
    header(
        &mut out,
        "wasmgrid_task_run_seconds",
        "histogram",
        "Run time of successful attempts.",
    );
    let mut cumulative = 0;
    for (i, count) in histogram.counts.iter().enumerate() {
        cumulative += count;
        let le = LATENCY_BUCKETS_MS
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |ms| (*ms as f64 / 1000.0).to_string());
        let _ = writeln!(
            out,
            "wasmgrid_task_run_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "wasmgrid_task_run_seconds_sum {}\nwasmgrid_task_run_seconds_count {cumulative}",
        histogram.sum_us as f64 / 1e6
    );
    header(
        &mut out,
        "wasmgrid_tasks_per_second",
        "gauge",
        "Attempts ended per second over the last minute.",
    );
    let _ = writeln!(out, "wasmgrid_tasks_per_second {}", stats.tasks_per_second);
    out
}
