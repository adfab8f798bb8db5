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
    let busy = state.driver.busy_slots().await;
    let (stats, histogram, workers) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((
            store.stats(&busy)?,
            store.run_time_histogram()?,
            store.workers()?,
        ))
    })
    .await??;
    let statuses: Vec<WorkerStatus> = views(&state, workers)
        .await
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

#[cfg(test)]
mod tests {
    use super::super::tests::{app_state, call, get, worker_and_job};
    use crate::model::{JobState, Record, Scheduler, TaskState};
    use crate::store::LATENCY_BUCKETS_MS;
    use axum::http::StatusCode;
    use wasmgrid_protocol::{Failure, FailureKind, TaskReport, TaskTimings};

    /// `/metrics` and the job's summary read the same run-time buckets and
    /// give what the scan of the attempts gave: 3 µs and 1.5 ms succeeded,
    /// the trap's 7 µs is no success.
    #[tokio::test]
    async fn metrics_and_summary_share_the_run_time_histogram() {
        let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
        let store = state.store.clone();
        let (worker, job) = worker_and_job(&store, 3);
        let mut records = vec![Record::JobStateChanged {
            job,
            state: JobState::Running,
        }];
        let trap = Failure::new(FailureKind::Trap, "unreachable");
        for (task, outcome, run_us) in [
            (0, Ok("0".to_owned()), 1_500),
            (1, Err(trap), 7),
            (2, Ok("2".into()), 3),
        ] {
            let attempt = u64::from(task) + 1;
            let task_state = if outcome.is_ok() {
                TaskState::Succeeded
            } else {
                TaskState::Failed
            };
            let report = TaskReport {
                outcome,
                fuel_used: 10,
                cache: wasmgrid_protocol::CacheSource::Memory,
                timings: TaskTimings {
                    load_us: 1,
                    instantiate_us: 2,
                    run_us,
                },
                stdout: Default::default(),
                stderr: Default::default(),
            };
            records.push(Record::AttemptStarted {
                job,
                task,
                attempt,
                worker,
                at_ms: 0,
            });
            records.push(Record::AttemptEnded {
                job,
                task,
                attempt,
                worker,
                report: Box::new(report),
                task_state,
            });
        }
        store.record_all(records);
        store.flush().unwrap();
        let app = super::super::router(state);

        let response = tower::ServiceExt::oneshot(app.clone(), get("/metrics"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .map(str::to_owned)
        };
        let bucket = |le: &str| value(&format!("wasmgrid_task_run_seconds_bucket{{le=\"{le}\"}}"));
        assert_eq!(bucket("0.001").as_deref(), Some("1"));
        assert_eq!(bucket("0.002").as_deref(), Some("2"));
        assert_eq!(bucket("131.072").as_deref(), Some("2"));
        assert_eq!(bucket("+Inf").as_deref(), Some("2"));
        assert_eq!(
            value("wasmgrid_task_run_seconds_sum").as_deref(),
            Some("0.001503")
        );
        assert_eq!(
            value("wasmgrid_task_run_seconds_count").as_deref(),
            Some("2")
        );
        // One job: the grid's histogram is the job's.
        let (status, json) = call(app, get(&format!("/api/jobs/{job}/summary"))).await;
        assert_eq!(status, StatusCode::OK);
        let mut cumulative = 0;
        let bounds = LATENCY_BUCKETS_MS.iter().map(Some).chain([None]);
        for (b, le) in json["latency_ms"].as_array().unwrap().iter().zip(bounds) {
            cumulative += b["count"].as_u64().unwrap();
            let le = le.map_or_else(|| "+Inf".to_owned(), |ms| (*ms as f64 / 1000.0).to_string());
            assert_eq!(bucket(&le), Some(cumulative.to_string()), "le {le}");
        }
        assert_eq!(cumulative, 2);
    }
}
