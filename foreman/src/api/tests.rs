use super::*;
use crate::driver::Driver;
use crate::model::{Scheduler, TaskState, WorkerId};
use crate::store::{NewJob, Store};
use axum::body::Body;
use axum::http::Request;
use std::time::Duration;
use tower::ServiceExt;
use wasmgrid_protocol::{FailureKind, TaskLimits};
use wasmgrid_worker::executor::Executor;

async fn app(max_upload_bytes: usize) -> (tempfile::TempDir, Router) {
    let (dir, state) = app_state(max_upload_bytes, Scheduler::Fifo).await;
    (dir, router(state))
}

pub(super) async fn app_state(
    max_upload_bytes: usize,
    default_scheduler: Scheduler,
) -> (tempfile::TempDir, Arc<ApiState>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("foreman.db")).unwrap();
    let driver = Driver::spawn(crate::core::Core::new(1), store.clone());
    let tokens = Arc::new(crate::tokens::Tokens::new(store.clone()));
    let client = tokens
        .issue(crate::store::TokenKind::Client, "tests", None)
        .unwrap();
    FIXTURE_TOKEN.with(|t| *t.borrow_mut() = Some(client.token));
    let state = ApiState {
        store,
        driver,
        validator: Arc::new(Executor::new(None).unwrap()),
        max_upload_bytes,
        submit_limits: wasmgrid_jobspec::SubmitLimits::default(),
        validated: Default::default(),
        default_scheduler,
        heartbeat_timeout: Duration::from_secs(3),
        security: Security {
            tokens,
            fingerprint: "ab".repeat(32),
            protect_reads: false,
            cors_origin: None,
        },
        output_limits: Default::default(),
    };
    (dir, Arc::new(state))
}

thread_local! {
    /// The client token of the fixture made last on this thread (each test has its own).
    static FIXTURE_TOKEN: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The fixture's client token (made by [`app_state`]).
pub(super) fn fixture_token() -> String {
    FIXTURE_TOKEN
        .with(|t| t.borrow().clone())
        .expect("app_state made a token")
}

/// Sends a request, as the fixture's client unless it names its own `Authorization`.
pub(super) async fn call(
    app: Router,
    mut request: Request<Body>,
) -> (StatusCode, serde_json::Value) {
    if let Some(token) = FIXTURE_TOKEN.with(|t| t.borrow().clone()) {
        if !request
            .headers()
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            request.headers_mut().insert(
                axum::http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
        }
    }
    send(app, request).await
}

/// Sends a request as it is.
pub(super) async fn send(app: Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn an_oversized_upload_is_413_naming_the_limit() {
    let (_dir, app) = app(1 << 20).await;
    let body = format!("{{\"args\": [\"{}\"]}}", "x".repeat(2 << 20));
    let request = Request::post("/api/jobs")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let (status, json) = call(app, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json["error"]["code"], "too_large");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 1 MiB"),
        "{json}"
    );
}

#[tokio::test]
async fn unknown_jobs_and_bad_parameters_are_named() {
    let (_dir, app) = app(1 << 20).await;
    let (status, json) = call(
        app.clone(),
        Request::get("/api/jobs/77").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (status, json["error"]["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("no job with id 77"))
    );
    let (status, json) = call(
        app.clone(),
        Request::get("/api/jobs?status=done")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("status:"),
        "{json}"
    );
    let request = Request::post("/api/jobs")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"module_base64": "AAAA", "args": {"a": 1}}"#))
        .unwrap();
    let (status, json) = call(app, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must be a JSON array"),
        "{json}"
    );
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// A GET as the fixture's client (see [`call`]).
pub(super) fn get(uri: &str) -> Request<Body> {
    let request = Request::get(uri);
    match FIXTURE_TOKEN.with(|t| t.borrow().clone()) {
        Some(token) => request.header(axum::http::header::AUTHORIZATION, format!("Bearer {token}")),
        None => request,
    }
    .body(Body::empty())
    .unwrap()
}

pub(super) fn error_of(json: &serde_json::Value) -> (&str, &str) {
    (
        json["error"]["code"].as_str().unwrap_or(""),
        json["error"]["message"].as_str().unwrap_or(""),
    )
}

/// A registered worker "w" and a stored fifo job of `tasks` tasks (`[0]`, `[1]`, ...).
pub(super) fn worker_and_job(store: &crate::store::Store, tasks: u32) -> (WorkerId, JobId) {
    let worker = store
        .upsert_worker(&crate::store::WorkerRow::joining(&worker_info("w")))
        .unwrap();
    store.put_module(&[9; 32], b"wasm").unwrap();
    let job = store
        .create_job(NewJob {
            module: [9; 32],
            limits: TaskLimits::default(),
            max_retries: 0,
            priority: 0,
            scheduler: Scheduler::Fifo,
            not_before_ms: None,
            retry_deterministic: false,
            args: (0..tasks).map(|i| format!("[{i}]")).collect(),
        })
        .unwrap()
        .id;
    (worker, job)
}

pub(super) fn worker_info(name: &str) -> wasmgrid_protocol::wire::WorkerInfo {
    wasmgrid_protocol::wire::WorkerInfo {
        name: name.into(),
        hostname: "pc".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        cores: 2,
        memory_bytes: 1 << 30,
        slots: 2,
        wasmtime_version: "48".into(),
        engine_hash: "e".into(),
        cpu_model: "cpu".into(),
        benchmark_fuel_per_sec: 1,
        cpu_limit_percent: 100,
        priority: wasmgrid_protocol::wire::SlotPriority::Low,
    }
}

/// A module stored and marked validated, so a job can name it by hash
/// without a real component.
pub(super) fn known_module(state: &ApiState) -> String {
    let hash = [9u8; 32];
    state.store.put_module(&hash, b"wasm").unwrap();
    state.validated.lock().unwrap().insert(hash, 4);
    hex::encode(hash)
}

/// A one-task job of the stored `module` with these options.
fn submit_one(module: &str, options: &str) -> Request<Body> {
    post_json(
        "/api/jobs",
        &format!(r#"{{"module_sha256": "{module}", "args": [[1]], "options": {options}}}"#),
    )
}

#[tokio::test]
async fn jobs_take_the_named_scheduler_or_the_foremans_default_and_not_before() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Performance).await;
    let module = known_module(&state);
    let app = router(state);
    let submit = |options: &str| submit_one(&module, options);
    let mut ids = Vec::new();
    for options in [
        "{}",
        r#"{"scheduler": "round-robin", "not_before_ms": 1900000000000}"#,
        r#"{"scheduler": null}"#,
    ] {
        let (status, json) = call(app.clone(), submit(options)).await;
        assert_eq!(status, StatusCode::CREATED, "{options}: {json}");
        ids.push(json["id"].as_u64().unwrap());
    }
    let mut seen = Vec::new();
    for id in ids {
        let (status, json) = call(app.clone(), get(&format!("/api/jobs/{id}"))).await;
        assert_eq!(status, StatusCode::OK);
        seen.push((json["scheduler"].clone(), json["not_before_ms"].clone()));
    }
    let null = serde_json::Value::Null;
    assert_eq!(
        seen,
        [
            ("performance".into(), null.clone()),
            ("round-robin".into(), 1_900_000_000_000u64.into()),
            ("performance".into(), null),
        ]
    );

    for (options, wanted) in [
        (
            r#"{"scheduler": "fastest"}"#,
            "unknown scheduler `fastest` (expected fifo, round-robin, least-loaded, performance or priority)",
        ),
        (r#"{"not_before_ms": "tomorrow"}"#, "expected u64"),
        (r#"{"not_before_ms": -5}"#, "options:"),
    ] {
        let (status, json) = call(app.clone(), submit(options)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{options}");
        let (code, message) = error_of(&json);
        assert_eq!(code, "bad_options", "{json}");
        assert!(message.contains(wanted), "{options}: {message}");
    }
}

#[tokio::test]
async fn output_and_result_limits_come_from_the_foremans_caps() {
    let (_dir, mut state) = app_state(1 << 20, Scheduler::Fifo).await;
    Arc::get_mut(&mut state).unwrap().output_limits = super::OutputLimits {
        result_bytes: 4096,
        max_output_bytes: 32 * 1024,
    };
    let module = known_module(&state);
    let app = router(state);
    let submit = |options: &str| submit_one(&module, options);
    let mut limits = Vec::new();
    for options in ["{}", r#"{"output_kib": 8, "result_kib": 2}"#] {
        let (status, json) = call(app.clone(), submit(options)).await;
        assert_eq!(status, StatusCode::CREATED, "{options}: {json}");
        let id = json["id"].as_u64().unwrap();
        let (_, job) = call(app.clone(), get(&format!("/api/jobs/{id}"))).await;
        let l = &job["limits"];
        limits.push((l["output_bytes"].clone(), l["result_bytes"].clone()));
    }
    // The default output (64 KiB) is cut to the cap; a job may ask for less.
    assert_eq!(
        limits,
        [(32768.into(), 4096.into()), (8192.into(), 2048.into())]
    );
    for (options, wanted) in [
        (
            r#"{"output_kib": 33}"#,
            "output_kib 33 is over this foreman's limit of 32 KiB per stream (foreman serve --max-output-kib)",
        ),
        (
            r#"{"result_kib": 5}"#,
            "result_kib 5 is not between 1 and this foreman's limit of 4 KiB (foreman serve --max-result-kib)",
        ),
    ] {
        let (status, json) = call(app.clone(), submit(options)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_of(&json), ("bad_options", wanted));
    }
}

#[tokio::test]
async fn worker_failures_are_listed_newest_first_and_bad_requests_named() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let store = state.store.clone();
    let (worker, job) = worker_and_job(&store, 2);
    for (attempt, task) in [(1u64, 0u32), (2, 1)] {
        store.record_all([
            crate::model::Record::AttemptStarted {
                job,
                task,
                attempt,
                worker,
                at_ms: 0,
            },
            crate::model::Record::AttemptAbandoned {
                job,
                task,
                attempt,
                worker,
                failure: wasmgrid_protocol::Failure::new(FailureKind::WorkerLost, "gone"),
                task_state: TaskState::Failed,
            },
        ]);
        store.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let app = router(state);

    let (status, json) = call(app.clone(), get(&format!("/api/workers/{worker}/failures"))).await;
    assert_eq!(status, StatusCode::OK);
    let attempts: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [2, 1]);
    assert_eq!(json[0]["kind"], "WorkerLost");
    assert_eq!(
        (json[0]["job"].as_u64(), json[0]["task"].as_u64()),
        (Some(job), Some(1))
    );

    let (status, json) = call(
        app.clone(),
        get(&format!("/api/workers/{worker}/failures?limit=1")),
    )
    .await;
    assert_eq!(
        (status, json.as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );

    let (status, json) = call(app.clone(), get("/api/workers/77/failures")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&json), ("unknown_worker", "no worker with id 77"));

    for uri in [
        format!("/api/workers/{worker}/failures?limit=many"),
        format!("/api/workers/{worker}/failures?limit=-1"),
        "/api/workers/w1/failures".to_owned(),
    ] {
        let (status, json) = call(app.clone(), get(&uri)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(error_of(&json).0, "bad_parameter", "{uri}: {json}");
    }
}

#[tokio::test]
async fn drain_reaches_a_connected_worker_and_names_the_others() {
    use wasmgrid_protocol::wire::ToWorker;

    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let store = state.store.clone();
    let row = crate::store::WorkerRow::joining(&worker_info("connected"));
    let connected = store.upsert_worker(&row).unwrap();
    let row = crate::store::WorkerRow::joining(&worker_info("away"));
    let away = store.upsert_worker(&row).unwrap();
    let (link, mut to_worker) = crate::driver::WorkerLink::new(Box::new(|_| {}));
    state.driver.send(crate::driver::Input::WorkerJoined {
        worker: connected,
        spec: crate::core::WorkerSpec::with_slots(2),
        link,
    });
    // A worker that joins while nothing waits hears so; waiting for it
    // also orders the join before the drain (one driver round could hold
    // both, and then the drain, sent as it is applied, goes first).
    assert_eq!(to_worker.recv().await, Some(ToWorker::Backlog(false)));
    let app = router(state);
    let drain =
        |worker: WorkerId, body: &str| post_json(&format!("/api/workers/{worker}/drain"), body);

    let (status, json) = call(app.clone(), drain(connected, r#"{"grace_secs": 1.5}"#)).await;
    assert_eq!(
        (status, json),
        (StatusCode::OK, serde_json::json!({ "draining": true }))
    );
    assert_eq!(
        to_worker.recv().await,
        Some(ToWorker::Drain { grace_ms: 1500 })
    );
    // No body: the default grace.
    let request = Request::post(format!("/api/workers/{connected}/drain"))
        .body(Body::empty())
        .unwrap();
    let (status, _) = call(app.clone(), request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        to_worker.recv().await,
        Some(ToWorker::Drain { grace_ms: 30_000 })
    );
    store.flush().unwrap();
    assert!(store.worker(connected).unwrap().unwrap().draining);

    let (status, json) = call(app.clone(), drain(away, "{}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_of(&json).0, "not_connected");
    assert!(error_of(&json).1.contains("not connected"), "{json}");
    let (status, json) = call(app.clone(), drain(99, "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&json), ("unknown_worker", "no worker with id 99"));
    store.flush().unwrap();
    assert!(!store.worker(away).unwrap().unwrap().draining);

    for body in [
        r#"{"grace_secs": -1}"#,
        r#"{"grace_secs": "soon"}"#,
        r#"{"grace": 5}"#,
        "not json",
    ] {
        let (status, json) = call(app.clone(), drain(connected, body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&json).0, "bad_request", "{body}: {json}");
    }
    assert!(
        to_worker.try_recv().is_err(),
        "a refused drain reached the worker"
    );
}

#[tokio::test]
async fn a_connected_workers_busy_slots_are_counted_as_tasks_go_out() {
    use wasmgrid_protocol::wire::ToWorker;

    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let module = known_module(&state);
    let row = crate::store::WorkerRow::joining(&worker_info("busy"));
    let worker = state.store.upsert_worker(&row).unwrap();
    let (link, mut to_worker) = crate::driver::WorkerLink::new(Box::new(|_| {}));
    state.driver.send(crate::driver::Input::WorkerJoined {
        worker,
        spec: crate::core::WorkerSpec::with_slots(2),
        link,
    });
    assert_eq!(to_worker.recv().await, Some(ToWorker::Backlog(false)));
    let app = router(state.clone());
    let busy = |app: Router| async move {
        let (_, view) = call(app.clone(), get(&format!("/api/workers/{worker}"))).await;
        let (_, stats) = call(app, get("/api/stats")).await;
        (view["slots_used"].as_u64(), stats["busy_slots"].as_u64())
    };
    assert_eq!(busy(app.clone()).await, (Some(0), Some(0)));
    // Credit for three tasks: two run, one waits in its prefetch queue. No
    // heartbeat has said so; the foreman knows from what it sent.
    state
        .driver
        .send(crate::driver::Input::Credit { worker, n: 3 });
    let body = serde_json::json!({ "module_sha256": module, "args": [[1], [2], [3], [4]] });
    let (status, json) = call(app.clone(), post_json("/api/jobs", &body.to_string())).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let mut sent = 0;
    while sent < 3 {
        match to_worker.recv().await {
            Some(ToWorker::Run(assignments)) => sent += assignments.len(),
            Some(_) => {}
            None => panic!("the worker's link closed"),
        }
    }
    assert_eq!(busy(app.clone()).await, (Some(2), Some(2)));
}
