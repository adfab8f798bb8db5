//! The OpenAPI document, `/metrics` and the dashboard's event stream.

use super::tests::{app_state, call, get, worker_info};
use super::*;
use futures_util::StreamExt;
use tower::ServiceExt;

/// Every route of the router, as the OpenAPI document must list them.
const ROUTES: &[(&str, &str)] = &[
    ("/api/jobs", "post"),
    ("/api/jobs", "get"),
    ("/api/jobs/{id}", "get"),
    ("/api/jobs/{id}", "delete"),
    ("/api/jobs/{id}/results", "get"),
    ("/api/jobs/{id}/wait", "get"),
    ("/api/jobs/{id}/events", "get"),
    ("/api/jobs/{id}/cancel", "post"),
    ("/api/jobs/{id}/tasks", "get"),
    ("/api/jobs/{id}/summary", "get"),
    ("/api/stats", "get"),
    ("/api/workers", "get"),
    ("/api/workers/{id}", "get"),
    ("/api/workers/{id}/failures", "get"),
    ("/api/workers/{id}/drain", "post"),
    ("/api/worker-failures", "get"),
    ("/api/worker-failure-stats", "get"),
    ("/api/events", "get"),
    ("/api/limits", "get"),
    ("/api/tokens", "get"),
    ("/api/tokens", "post"),
    ("/api/tokens/{id}/revoke", "post"),
    ("/api/whoami", "get"),
    ("/api/openapi.json", "get"),
    ("/metrics", "get"),
];

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let app = router(state);
    let (status, json) = call(
        app.clone(),
        axum::http::Request::get("/api/openapi.json")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        json["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{}",
        json["openapi"]
    );
    let paths = json["paths"].as_object().unwrap();
    for (path, method) in ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} missing"
        );
    }
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |m| m.len()))
        .sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "a route the test does not know: {:?}",
        paths.keys()
    );
    // Each route answers something other than 404/405 (it is really routed).
    for (path, method) in ROUTES {
        if *method != "get" || path.contains("events") || path.contains("wait") {
            continue;
        }
        let uri = path.replace("{id}", "1");
        let response = app.clone().oneshot(get(&uri)).await.unwrap();
        assert_ne!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{uri}");
        if !path.contains("{id}") {
            assert_eq!(response.status(), StatusCode::OK, "{uri}");
        }
    }
    assert!(json["components"]["schemas"].get("JobRow").is_some());
    assert!(json["components"]["schemas"].get("TaskPage").is_some());
    the_enums_have_their_wire_values(&json);
    the_shared_types_are_referenced(&json);
    every_ref_resolves(&json);
}

/// The enum schemas list exactly the values serde writes.
fn the_enums_have_their_wire_values(json: &serde_json::Value) {
    let schemas = &json["components"]["schemas"];
    let values = |name: &str| -> Vec<String> {
        let schema = &schemas[name];
        assert_eq!(schema["type"], "string", "{name}: {schema}");
        schema["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no enum values: {schema}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let serde_names = |all: Vec<serde_json::Value>| -> Vec<String> {
        all.into_iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        values("Scheduler"),
        serde_names(
            Scheduler::ALL
                .map(|s| serde_json::to_value(s).unwrap())
                .to_vec()
        )
    );
    assert!(values("Scheduler").contains(&"round-robin".to_owned()));
    assert_eq!(
        values("JobState"),
        ["queued", "running", "completed", "failed", "cancelled"]
    );
    assert_eq!(
        values("TaskState"),
        ["queued", "running", "succeeded", "failed", "cancelled"]
    );
    assert_eq!(
        values("FailureKind"),
        serde_names(
            wasmgrid_protocol::FailureKind::ALL
                .map(|k| serde_json::to_value(k).unwrap())
                .to_vec()
        )
    );
    assert!(values("FailureKind").contains(&"OutOfFuel".to_owned()));
}

/// The API's rows point at the shared types' schemas, not at loose objects.
fn the_shared_types_are_referenced(json: &serde_json::Value) {
    let schemas = &json["components"]["schemas"];
    let text = |name: &str| schemas[name].to_string();
    for (schema, target) in [
        ("JobRow", "JobState"),
        ("JobRow", "Scheduler"),
        ("JobRow", "TaskLimits"),
        ("WorkerRow", "WorkerInfo"),
        ("WorkerRow", "Load"),
        ("TaskRow", "TaskState"),
        ("TaskRow", "Failure"),
        ("FailureRow", "FailureKind"),
        ("JobOptions", "Scheduler"),
        ("Failure", "FailureKind"),
    ] {
        let reference = format!("\"#/components/schemas/{target}\"");
        assert!(
            text(schema).contains(&reference),
            "{schema} does not refer to {target}: {}",
            text(schema)
        );
    }
    let limits = &schemas["TaskLimits"]["properties"];
    for field in ["fuel", "memory_bytes", "timeout_ms", "output_bytes"] {
        assert!(limits.get(field).is_some(), "TaskLimits.{field}: {limits}");
    }
}

/// Every `$ref` anywhere in the document names a component that exists.
fn every_ref_resolves(json: &serde_json::Value) {
    fn refs<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v.as_str()) {
                        ("$ref", Some(target)) => out.push(target),
                        _ => refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(json, &mut found);
    assert!(!found.is_empty());
    for target in found {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("a $ref outside components/schemas: {target}"));
        assert!(
            json["components"]["schemas"].get(name).is_some(),
            "$ref {target} names no component"
        );
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_help_and_type() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    state
        .store
        .upsert_worker(&crate::store::WorkerRow::joining(&worker_info("w")))
        .unwrap();
    let response = router(state).oneshot(get("/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let mut helped = std::collections::HashSet::new();
    let mut typed = std::collections::HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.splitn(4, ' ').collect();
        match words.as_slice() {
            ["#", "HELP", name, _] => assert!(helped.insert(name.to_string()), "{line}"),
            ["#", "TYPE", name, kind] => assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "{line}"
            ),
            _ => {
                let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
                assert!(value.parse::<f64>().is_ok(), "{line}");
                let name = series.split('{').next().unwrap();
                if let Some(labels) = series.strip_prefix(name) {
                    assert!(
                        labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                        "{line}"
                    );
                }
                samples.push((series.to_owned(), value.to_owned()));
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
                    })
                    .unwrap_or(name);
                assert!(
                    helped.contains(family) && typed.contains_key(family),
                    "no HELP/TYPE for {line}"
                );
            }
        }
    }
    let value = |series: &str| {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(value("wasmgrid_workers{status=\"starting\"}"), Some("1"));
    assert_eq!(value("wasmgrid_jobs{state=\"queued\"}"), Some("0"));
    assert_eq!(
        value("wasmgrid_task_run_seconds_bucket{le=\"+Inf\"}"),
        Some("0")
    );
    assert_eq!(
        typed.get("wasmgrid_task_run_seconds").map(String::as_str),
        Some("histogram")
    );
    for name in [
        "wasmgrid_jobs",
        "wasmgrid_tasks",
        "wasmgrid_workers",
        "wasmgrid_fuel_consumed_total",
        "wasmgrid_tasks_per_second",
    ] {
        assert!(typed.contains_key(name), "{name}");
    }
}

#[tokio::test]
async fn the_event_stream_sends_stats_jobs_and_workers() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let module = super::tests::known_module(&state);
    let response = router(state.clone())
        .oneshot(get("/api/events"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let mut text = String::new();
    let mut next_event = async || loop {
        if let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if !event.starts_with(':') {
                return event;
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("an event within 5 s");
        text.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    };
    let first = next_event().await;
    assert!(first.starts_with("event: stats\ndata: {"), "{first}");
    assert!(first.contains("\"total_jobs\":0"), "{first}");

    let worker = state
        .store
        .upsert_worker(&crate::store::WorkerRow::joining(&worker_info("w")))
        .unwrap();
    let (status, json) = call(
        router(state.clone()),
        axum::http::Request::post("/api/jobs")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(format!(
                r#"{{"module_sha256": "{module}", "args": [[1]]}}"#
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let (mut saw_worker, mut saw_job) = (false, false);
    while !(saw_worker && saw_job) {
        let event = next_event().await;
        saw_worker |= event.starts_with("event: worker\n")
            && event.contains(&format!("\"id\":{worker},"))
            && event.contains("\"status\":\"starting\"");
        saw_job |= event.starts_with("event: job\n")
            && event.contains(&format!("\"id\":{},", json["id"]))
            && event.contains("\"state\":\"queued\"");
    }
    // A deleted job is announced as such.
    let job = json["id"].as_u64().unwrap();
    assert!(state.driver.cancel(job).await);
    state.store.flush().unwrap();
    assert!(matches!(
        state.store.delete_job(job),
        Ok(crate::store::Deletion::Deleted { tasks: 1 })
    ));
    let deleted = format!("event: job_deleted\ndata: {{\"id\":{job}}}\n\n");
    // Within a few events (a stats one comes every second).
    for _ in 0..10 {
        if next_event().await == deleted {
            return;
        }
    }
    panic!("no job_deleted event for job {job}");
}
