//! The per-job caps (`foreman serve --max-…`) through the real router.

use super::tests::{app_state, call, error_of, get};
use super::*;
use axum::body::Body;
use axum::http::Request;
use base64::Engine as _;
use serde_json::json;
use sha2::Digest as _;
use wasmgrid_jobspec::SubmitLimits;

const CAPS: SubmitLimits = SubmitLimits {
    max_module_bytes: 300 << 10,
    max_args_bytes: 1000,
    max_tasks_per_job: 5,
    max_fuel: 1_000_000,
    max_memory_mib: 64,
    max_timeout_secs: 10.0,
    max_unfinished_jobs_per_token: 2,
};

/// A router whose foreman has `CAPS`, and its state for looking behind it.
async fn capped_app() -> (tempfile::TempDir, Arc<ApiState>, Router) {
    let (dir, state) = app_state(16 << 20, Scheduler::Fifo).await;
    let mut state = Arc::into_inner(state).expect("no other owner yet");
    state.submit_limits = CAPS;
    let state = Arc::new(state);
    (dir, state.clone(), router(state))
}

fn post(body: &serde_json::Value) -> Request<Body> {
    Request::post("/api/jobs")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A real task-world component, so a job that gets past the caps is stored.
fn add_component() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm/add.wasm");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build the guests: cargo xtask guests)",
            path.display()
        )
    })
}

#[tokio::test]
async fn the_limits_endpoint_lists_every_cap_and_the_defaults_within_them() {
    let (_dir, _state, app) = capped_app().await;
    let (status, json) = call(app, get("/api/limits")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["max_upload_bytes"], 16 << 20);
    assert_eq!(json["max_module_bytes"], 300 << 10);
    assert_eq!(json["max_args_bytes"], 1000);
    assert_eq!(json["max_tasks_per_job"], 5);
    assert_eq!(json["max_fuel"], 1_000_000);
    assert_eq!(json["max_memory_mib"], 64);
    assert_eq!(json["max_timeout_secs"], 10.0);
    assert_eq!(json["max_unfinished_jobs_per_token"], 2);
    assert_eq!(json["max_result_bytes"], 1 << 20);
    assert_eq!(json["max_output_bytes"], 64 << 10);
    assert_eq!(
        json["defaults"],
        json!({ "fuel": 1_000_000, "memory_mib": 64, "timeout_secs": 10.0 })
    );
    // `foreman submit` reads the caps back from this very document.
    let caps: SubmitLimits = serde_json::from_value(json).unwrap();
    assert_eq!(caps, CAPS);
}

#[tokio::test]
async fn each_cap_refuses_a_job_that_asks_more_naming_the_cap_and_its_flag() {
    let (_dir, state, app) = capped_app().await;
    let module = super::tests::known_module(&state);
    let job = |args: serde_json::Value, options: serde_json::Value| json!({ "module_sha256": module, "args": args, "options": options });
    let big_module = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 400 << 10]);
    let cases = [
        (
            job(json!([[1]]), json!({ "fuel": 1_000_001 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "fuel 1000001 exceeds this foreman's cap of 1000000 (foreman serve --max-fuel)",
        ),
        (
            job(json!([[1]]), json!({ "memory_mib": 8192 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "memory_mib 8192 exceeds this foreman's cap of 64 MiB (foreman serve --max-memory-mib)",
        ),
        (
            job(json!([[1]]), json!({ "timeout_secs": 10.5 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "timeout_secs 10.5 exceeds this foreman's cap of 10 s (foreman serve --max-timeout)",
        ),
        (
            job(json!([[1], [2], [3], [4], [5], [6]]), json!({})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "the job has 6 tasks, more than this foreman's cap of 5 (foreman serve --max-tasks-per-job)",
        ),
        (
            job(json!(["x".repeat(1000)]), json!({})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "args is 1004 bytes of JSON, more than this foreman's cap of 1000 bytes (foreman serve --max-args-mib)",
        ),
        (
            json!({ "module_base64": big_module, "args": [[1]] }),
            StatusCode::PAYLOAD_TOO_LARGE,
            "the module is 409600 bytes, more than this foreman's cap of 307200 bytes (foreman serve --max-module-mib)",
        ),
    ];
    for (body, wanted_status, wanted_message) in cases {
        let (status, json) = call(app.clone(), post(&body)).await;
        assert_eq!(
            (status, error_of(&json)),
            (wanted_status, ("limit_exceeded", wanted_message)),
            "{body:.200}"
        );
    }
    let (_, jobs) = call(app, get("/api/jobs")).await;
    assert_eq!(jobs, json!([]), "a refused job was stored");
}

#[tokio::test]
async fn a_module_named_by_hash_meets_the_module_cap_too() {
    let (_dir, state, app) = capped_app().await;
    // Stored while the foreman allowed more: once not yet validated, once validated.
    let big = vec![7u8; 400 << 10];
    let stored: [u8; 32] = sha2::Sha256::digest(&big).into();
    state.store.put_module(&stored, &big).unwrap();
    let validated = [5u8; 32];
    state.store.put_module(&validated, &big).unwrap();
    state
        .validated
        .lock()
        .unwrap()
        .insert(validated, big.len() as u64);
    for hash in [stored, validated] {
        let body = json!({ "module_sha256": hex::encode(hash), "args": [[1]] });
        let (status, json) = call(app.clone(), post(&body)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
        assert_eq!(error_of(&json).0, "limit_exceeded");
        assert!(error_of(&json).1.contains("--max-module-mib"), "{json}");
    }
    let (_, jobs) = call(app, get("/api/jobs")).await;
    assert_eq!(jobs, json!([]));
}

#[tokio::test]
async fn a_job_that_asks_nothing_gets_the_defaults_lowered_to_the_caps() {
    let (_dir, state, app) = capped_app().await;
    let module = super::tests::known_module(&state);
    let body = json!({ "module_sha256": module, "args": [[1], [2]] });
    let (status, json) = call(app.clone(), post(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let (_, job) = call(app.clone(), get(&format!("/api/jobs/{}", json["id"]))).await;
    assert_eq!(
        job["limits"],
        json!({
            "fuel": 1_000_000,
            "memory_bytes": 64u64 << 20,
            "timeout_ms": 10_000,
            "output_bytes": wasmgrid_protocol::TaskLimits::DEFAULT_OUTPUT_BYTES,
            "result_bytes": wasmgrid_protocol::TaskLimits::DEFAULT_RESULT_BYTES,
        })
    );
    // Asking exactly the caps is allowed; below them, what was asked.
    let body = json!({ "module_sha256": module, "args": [[1]],
        "options": { "fuel": 1_000_000, "memory_mib": 1, "timeout_secs": 0.5 } });
    let (status, json) = call(app.clone(), post(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let (_, job) = call(app, get(&format!("/api/jobs/{}", json["id"]))).await;
    assert_eq!(
        (
            &job["limits"]["fuel"],
            &job["limits"]["memory_bytes"],
            &job["limits"]["timeout_ms"]
        ),
        (&json!(1_000_000), &json!(1 << 20), &json!(500))
    );
}

#[tokio::test]
async fn nothing_is_stored_when_a_job_is_refused() {
    let (_dir, state, app) = capped_app().await;
    let wasm = add_component();
    let hash: [u8; 32] = sha2::Sha256::digest(&wasm).into();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&wasm);
    for options in [
        json!({ "memory_mib": 65 }),
        json!({ "fuel": u64::MAX }),
        json!({ "timeout_secs": 3600 }),
    ] {
        let body = json!({ "module_base64": encoded, "args": [[1, 2]], "options": options });
        let (status, json) = call(app.clone(), post(&body)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{options}: {json}"
        );
        assert_eq!(state.store.module(&hash).unwrap(), None, "{options}");
    }
    let (_, jobs) = call(app.clone(), get("/api/jobs")).await;
    assert_eq!(jobs, json!([]));
    // The same job within the caps is stored, module and all.
    let body = json!({ "module_base64": encoded, "args": [[1, 2]] });
    let (status, json) = call(app.clone(), post(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    assert_eq!(state.store.module(&hash).unwrap(), Some(wasm));
}

#[tokio::test]
async fn a_token_may_have_only_so_many_unfinished_jobs_and_others_are_not_held_back() {
    let (_dir, _state, app) = capped_app().await;
    let wasm = add_component();
    let body = json!({
        "module_base64": base64::engine::general_purpose::STANDARD.encode(&wasm),
        "args": [[1, 2]],
    });
    // No worker: both jobs stay queued.
    for _ in 0..2 {
        let (status, json) = call(app.clone(), post(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{json}");
    }
    let (status, json) = call(app.clone(), post(&body)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{json}");
    assert_eq!(json["error"]["code"], "limit_exceeded");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("2 queued or running jobs")
            && message.contains("--max-queued-jobs-per-token 2"),
        "{message}"
    );

    // Another client's token has a quota of its own.
    let (status, created) = call(
        app.clone(),
        Request::post("/api/tokens")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"kind": "client", "name": "other"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let other = created["token"].as_str().expect("the new token");
    let mut request = post(&body);
    request.headers_mut().insert(
        axum::http::header::AUTHORIZATION,
        format!("Bearer {other}").parse().unwrap(),
    );
    let (status, json) = call(app.clone(), request).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");

    // A finished (here: cancelled) job frees its place.
    let (status, json) = call(
        app.clone(),
        Request::post("/api/jobs/1/cancel")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(status.is_success(), "{json}");
    let (status, json) = call(app.clone(), post(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
}

#[tokio::test]
async fn a_module_deleted_with_its_jobs_is_unknown_by_its_hash_until_uploaded_again() {
    let (_dir, state, app) = capped_app().await;
    let wasm = add_component();
    let hash: [u8; 32] = sha2::Sha256::digest(&wasm).into();
    let upload = json!({
        "module_base64": base64::engine::general_purpose::STANDARD.encode(&wasm),
        "module_sha256": hex::encode(hash),
        "args": [[1, 2]],
    });
    let by_hash = json!({ "module_sha256": hex::encode(hash), "args": [[1, 2]] });
    let (status, json) = call(app.clone(), post(&upload)).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let id = json["id"].as_u64().expect("an id");
    let request = |method: &str, uri: String| {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap()
    };
    for (method, uri) in [
        ("POST", format!("/api/jobs/{id}/cancel")),
        ("DELETE", format!("/api/jobs/{id}")),
    ] {
        let (status, json) = call(app.clone(), request(method, uri)).await;
        assert!(status.is_success(), "{method}: {json}");
    }
    // Named a moment ago, it outlives its job for the grace; then it goes.
    assert!(state.store.module(&hash).unwrap().is_some());
    assert_eq!(
        state.store.delete_unused_modules(Duration::ZERO).unwrap(),
        1
    );

    // Though validated since start, by its hash alone it is now unknown.
    let (status, json) = call(app.clone(), post(&by_hash)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
    assert_eq!(json["error"]["code"], "unknown_module");
    // Uploaded again (with its hash, which the foreman knew), it is stored
    // again and serves by its hash too.
    let (status, json) = call(app.clone(), post(&upload)).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    assert_eq!(state.store.module(&hash).unwrap(), Some(wasm));
    let (status, json) = call(app.clone(), post(&by_hash)).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
}
