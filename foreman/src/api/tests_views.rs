//! The dashboard's endpoints: stats, task pages, summaries, workers' status,
//! failures across workers, and their parameters.

use super::tests::{app_state, call, error_of, get, worker_and_job, worker_info};
use super::*;
use crate::model::{JobState, Record, TaskState, WorkerId};
use crate::store::WorkerRow;
use wasmgrid_protocol::wire::Load;
use wasmgrid_protocol::{
    CacheSource, CapturedOutput, Failure, FailureKind, TaskReport, TaskTimings,
};

fn report(outcome: Result<String, Failure>, run_us: u64) -> Box<TaskReport> {
    Box::new(TaskReport {
        outcome,
        fuel_used: 10,
        cache: CacheSource::Memory,
        timings: TaskTimings {
            load_us: 1,
            instantiate_us: 2,
            run_us,
        },
        stdout: CapturedOutput {
            text: "hello".into(),
            truncated: false,
        },
        stderr: CapturedOutput {
            text: "oops".into(),
            truncated: true,
        },
    })
}

/// A worker "w" and a job of four tasks: 0 succeeded in 1.5 ms, 1 trapped,
/// 2 succeeded in 3 µs, 3 still queued.
struct Grid {
    _dir: tempfile::TempDir,
    app: Router,
    state: Arc<ApiState>,
    worker: WorkerId,
    job: JobId,
}

async fn grid() -> Grid {
    let (dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let store = state.store.clone();
    let (worker, job) = worker_and_job(&store, 4);
    let trap = Failure::new(FailureKind::Trap, "unreachable");
    let outcomes = [
        (0, Ok("{\"n\": 0}".to_owned()), 1_500),
        (1, Err(trap), 7),
        (2, Ok("2".into()), 3),
    ];
    let mut records = vec![Record::JobStateChanged {
        job,
        state: JobState::Running,
    }];
    for (task, outcome, run_us) in outcomes {
        let attempt = u64::from(task) + 1;
        let task_state = if outcome.is_ok() {
            TaskState::Succeeded
        } else {
            TaskState::Failed
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
            report: report(outcome, run_us),
            task_state,
        });
    }
    store.record_all(records);
    store.flush().unwrap();
    Grid {
        _dir: dir,
        app: router(state.clone()),
        state,
        worker,
        job,
    }
}

fn assert_bad(json: &serde_json::Value, parameter: &str) {
    let (code, message) = error_of(json);
    assert_eq!(code, "bad_parameter", "{json}");
    assert!(message.starts_with(&format!("{parameter}:")), "{json}");
}

#[tokio::test]
async fn stats_count_jobs_tasks_workers_and_fuel() {
    let g = grid().await;
    let load = Load {
        running: 1,
        ..Load::default()
    };
    g.state
        .store
        .worker_heartbeat(g.worker, load, crate::driver::unix_ms());
    g.state.store.flush().unwrap();
    let (status, json) = call(g.app.clone(), get("/api/stats")).await;
    assert_eq!(status, StatusCode::OK);
    for (field, wanted) in [
        ("total_jobs", 1),
        ("running_jobs", 1),
        ("pending_jobs", 1),
        ("completed_jobs", 0),
        ("connected_workers", 1),
        ("total_slots", 2),
        ("active_tasks", 0),
        ("busy_slots", 1),
        ("total_tasks_completed", 2),
        ("total_tasks_failed", 1),
        ("queued_tasks", 1),
        ("fuel_consumed", 30),
    ] {
        assert_eq!(json[field], wanted, "{field}: {json}");
    }
    assert_eq!(json["tasks_per_second"], 3.0 / 60.0, "{json}");
}

#[tokio::test]
async fn tasks_come_in_pages_in_index_order_with_their_last_report() {
    let g = grid().await;
    let (status, json) = call(g.app.clone(), get(&format!("/api/jobs/{}/tasks", g.job))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["total"], 4);
    let tasks = json["tasks"].as_array().unwrap();
    let indexes: Vec<_> = tasks.iter().map(|t| t["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    let first = &tasks[0];
    assert_eq!(first["state"], "succeeded");
    assert_eq!(first["result"], serde_json::json!({"n": 0}));
    assert_eq!(
        (first["worker"].as_u64(), first["worker_name"].as_str()),
        (Some(g.worker), Some("w"))
    );
    assert_eq!(
        first["timings"],
        serde_json::json!({"load_us": 1, "instantiate_us": 2, "run_us": 1500})
    );
    assert_eq!(
        (first["stdout"].as_str(), first["stderr"].as_str()),
        (Some("hello"), Some("oops"))
    );
    assert_eq!(
        (
            first["stdout_truncated"].as_bool(),
            first["stderr_truncated"].as_bool()
        ),
        (Some(false), Some(true))
    );
    assert_eq!(
        (first["attempts"].as_u64(), first["fuel_used"].as_u64()),
        (Some(1), Some(10))
    );
    assert!(first["failure"].is_null());
    assert_eq!(
        tasks[1]["failure"],
        serde_json::json!({"kind": "Trap", "message": "unreachable"})
    );
    assert!(tasks[1]["result"].is_null());
    let queued = &tasks[3];
    assert_eq!(queued["state"], "queued");
    for field in ["worker", "worker_name", "timings", "result", "failure"] {
        assert!(queued[field].is_null(), "{field}: {queued}");
    }

    let page = |query: &str| get(&format!("/api/jobs/{}/tasks?{query}", g.job));
    let (_, json) = call(g.app.clone(), page("status=succeeded&skip=1&limit=1")).await;
    assert_eq!(json["total"], 2);
    assert_eq!(json["tasks"][0]["index"], 2);
    assert_eq!(json["tasks"].as_array().map(Vec::len), Some(1));
    // Past the end, and limit 0: empty pages. Above 1000: capped, not refused.
    for query in ["skip=4", "skip=99999999999", "limit=0"] {
        let (status, json) = call(g.app.clone(), page(query)).await;
        assert_eq!(status, StatusCode::OK, "{query}");
        assert_eq!(json["tasks"], serde_json::json!([]), "{query}");
        assert_eq!(json["total"], 4, "{query}");
    }
    let (status, json) = call(g.app.clone(), page("limit=5000")).await;
    assert_eq!(
        (status, json["tasks"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(4))
    );

    for (query, parameter) in [
        ("status=done", "status"),
        ("limit=-1", "limit"),
        ("limit=many", "limit"),
        ("skip=-3", "skip"),
    ] {
        let (status, json) = call(g.app.clone(), page(query)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_bad(&json, parameter);
    }
    let (status, json) = call(g.app.clone(), get("/api/jobs/999/tasks")).await;
    assert_eq!(
        (status, error_of(&json).0),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[tokio::test]
async fn a_summary_counts_failures_workers_and_run_times() {
    let g = grid().await;
    let (status, json) = call(g.app.clone(), get(&format!("/api/jobs/{}/summary", g.job))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["failures_by_kind"], serde_json::json!({"Trap": 1}));
    assert_eq!(
        json["by_worker"],
        serde_json::json!([{
            "worker": g.worker, "name": "w", "tasks": 3, "fuel_used": 30,
            // Instantiating 2 µs each, running 1500 + 7 + 3 µs.
            "busy_us": 1516
        }])
    );
    let buckets = json["latency_ms"].as_array().unwrap();
    assert_eq!(buckets.len(), crate::store::LATENCY_BUCKETS_MS.len() + 1);
    assert_eq!(buckets[0], serde_json::json!({"le": 1, "count": 1}));
    assert_eq!(buckets[1], serde_json::json!({"le": 2, "count": 1}));
    assert!(buckets.last().unwrap()["le"].is_null());
    let total: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 2, "successes only");
    let (status, _) = call(g.app.clone(), get("/api/jobs/999/summary")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn jobs_list_names_a_bad_parameter_and_pages() {
    let g = grid().await;
    for (query, parameter) in [
        ("skip=x", "skip"),
        ("limit=1.5", "limit"),
        ("status=RUNNING", "status"),
    ] {
        let (status, json) = call(g.app.clone(), get(&format!("/api/jobs?{query}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_bad(&json, parameter);
    }
    let (_, json) = call(g.app.clone(), get("/api/jobs?status=running&limit=5000")).await;
    assert_eq!(json.as_array().map(Vec::len), Some(1));
    let (_, json) = call(g.app.clone(), get("/api/jobs?skip=1")).await;
    assert_eq!(json, serde_json::json!([]));
}

#[tokio::test]
async fn workers_show_their_status_load_and_fuel() {
    let g = grid().await;
    let (status, json) = call(g.app.clone(), get(&format!("/api/workers/{}", g.worker))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "starting", "{json}");
    assert_eq!(
        (json["name"].as_str(), json["fuel_used"].as_u64()),
        (Some("w"), Some(30))
    );
    assert_eq!(
        (json["speed"].as_u64(), json["slots_used"].as_u64()),
        (Some(1), Some(0))
    );

    let store = &g.state.store;
    let load = wasmgrid_protocol::wire::Load {
        running: 2,
        ..Default::default()
    };
    store.worker_heartbeat(g.worker, load, crate::driver::unix_ms());
    store.flush().unwrap();
    let (_, json) = call(g.app.clone(), get("/api/workers")).await;
    assert_eq!(
        (json[0]["status"].as_str(), json[0]["slots_used"].as_u64()),
        (Some("healthy"), Some(2))
    );
    // Two periods (a third of the 3 s timeout each) without a beat.
    store.worker_heartbeat(g.worker, load, crate::driver::unix_ms() - 2_500);
    store.flush().unwrap();
    let (_, json) = call(g.app.clone(), get("/api/workers")).await;
    assert_eq!(json[0]["status"], "unhealthy");
    store.set_worker_draining(g.worker, true);
    store.flush().unwrap();
    let (_, json) = call(g.app.clone(), get("/api/workers")).await;
    assert_eq!(json[0]["status"], "draining");
    store.set_worker_online(g.worker, false).unwrap();
    let (_, json) = call(g.app.clone(), get("/api/workers")).await;
    assert_eq!(json[0]["status"], "offline");

    let (status, json) = call(g.app.clone(), get("/api/workers/77")).await;
    assert_eq!(
        (status, error_of(&json)),
        (
            StatusCode::NOT_FOUND,
            ("unknown_worker", "no worker with id 77")
        )
    );
    let (status, json) = call(g.app.clone(), get("/api/workers/w")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_bad(&json, "worker id");
}

#[test]
fn a_cooling_down_worker_is_named_so_until_its_cooldown_ends() {
    let mut row = WorkerRow::joining(&worker_info("w"));
    row.last_heartbeat_ms = Some(1_000);
    row.cooldown_until_ms = Some(5_000);
    let status = |now| WorkerView::new(row.clone(), now, Duration::from_secs(3), None).status;
    assert_eq!(status(1_500), WorkerStatus::CoolingDown);
    assert_eq!(status(5_000), WorkerStatus::Unhealthy);
}

#[tokio::test]
async fn failures_across_workers_filter_by_worker_and_kind() {
    let g = grid().await;
    let (status, json) = call(g.app.clone(), get("/api/worker-failures")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json.as_array().map(Vec::len), Some(1));
    assert_eq!(
        (json[0]["worker"].as_u64(), json[0]["kind"].as_str()),
        (Some(g.worker), Some("Trap"))
    );
    assert_eq!(
        (json[0]["job"].as_u64(), json[0]["task"].as_u64()),
        (Some(g.job), Some(1))
    );
    for query in ["kind=OutOfFuel", "skip=1", "limit=0"] {
        let (_, json) = call(g.app.clone(), get(&format!("/api/worker-failures?{query}"))).await;
        assert_eq!(json, serde_json::json!([]), "{query}");
    }
    let (_, json) = call(
        g.app.clone(),
        get(&format!(
            "/api/worker-failures?worker={}&kind=Trap",
            g.worker
        )),
    )
    .await;
    assert_eq!(json.as_array().map(Vec::len), Some(1));
    let (_, json) = call(
        g.app.clone(),
        get(&format!("/api/workers/{}/failures?kind=Trap", g.worker)),
    )
    .await;
    assert_eq!(json.as_array().map(Vec::len), Some(1));

    for (query, parameter) in [
        ("kind=Boom", "kind"),
        ("worker=me", "worker"),
        ("limit=-1", "limit"),
    ] {
        let (status, json) =
            call(g.app.clone(), get(&format!("/api/worker-failures?{query}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_bad(&json, parameter);
    }
    let (status, json) = call(g.app.clone(), get("/api/worker-failures?worker=77")).await;
    assert_eq!(
        (status, error_of(&json).0),
        (StatusCode::NOT_FOUND, "unknown_worker")
    );

    let (status, json) = call(g.app.clone(), get("/api/worker-failure-stats")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json,
        serde_json::json!({
            "by_worker": [{"worker": g.worker, "name": "w", "failures": 1}],
            "by_kind": {"Trap": 1},
        })
    );
}
