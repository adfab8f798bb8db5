//! The worker's own status API against a real foreman: status, stats after
//! a job, and a restart that rejoins at once.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_completes_with, submit_slow_primes};
use serde_json::Value;
use wasmgrid_tests::binary;
use wasmgrid_tests::processes::{start_foreman, Running};

fn get(url: &str) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    agent
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json().ok())
        .unwrap_or(Value::Null)
}

/// Polls `url` until `done` holds for its JSON; fails after 30 s.
fn wait_for(url: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = get(url);
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_worker_api_shows_status_counts_tasks_and_restarts_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let mut child = Command::new(binary("worker"))
        .args(["--foreman", &foreman.quic, "--token", &foreman.token])
        .args(["--name", "observed", "--slots", "1", "--api", "127.0.0.1:0"])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _worker = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let api = loop {
        let line = lines
            .next()
            .expect("the worker prints its API address")
            .unwrap();
        if let Some(url) = line.strip_prefix("API ") {
            break url.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let status = wait_for(&format!("{api}/"), "never connected", |s| {
        s["connection"] == "connected"
    });
    assert_eq!(status["name"], "observed", "{status}");
    let first_id = status["worker_id"].clone();
    assert!(first_id.is_u64(), "{status}");

    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    assert_completes_with(&foreman.http, &id, &expected, 90);
    let stats = get(&format!("{api}/stats"));
    assert_eq!(stats["tasks_completed"], 8, "{stats}");
    assert!(stats["fuel_used"].as_u64().unwrap_or(0) > 0, "{stats}");

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let restarted = agent
        .post(&format!("{api}/restart"))
        .send_empty()
        .unwrap()
        .status();
    assert_eq!(restarted.as_u16(), 202);
    // It rejoins at once, under the same worker id (same name and host).
    let status = wait_for(&format!("{api}/"), "did not rejoin", |s| {
        s["connection"] == "connected"
    });
    assert_eq!(status["worker_id"], first_id, "{status}");
    let dashboard = agent
        .get(&format!("{api}/dashboard"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        dashboard.contains("/events"),
        "the page is live from /events"
    );
}
