//! Helpers shared by the end-to-end test files: the `foreman` CLI as JSON,
//! polling a job's state, and a slow `primes` job with its native answers.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmgrid_tests::guest_path;
use wasmgrid_tests::processes::{foreman_cli, Foreman};

/// Submits, detached, eight `primes` tasks of ~0.1–0.4 s each; returns the
/// job id and the native answers.
pub fn submit_slow_primes(foreman: &Foreman, dir: &std::path::Path) -> (String, Value) {
    let step = 60_000_000u64;
    let ranges: Vec<(u64, u64)> = (0..8).map(|i| (i * step, (i + 1) * step)).collect();
    // Native answers first: computing them after submitting would let the job finish unobserved.
    let expected = ranges
        .iter()
        .map(|&(lo, hi)| Value::from(primes::count_primes_in(lo, hi)))
        .collect();
    let args = dir.join("slow-primes.json");
    let json: Vec<String> = ranges
        .iter()
        .map(|(lo, hi)| format!("[{lo},{hi}]"))
        .collect();
    std::fs::write(&args, format!("[{}]", json.join(","))).unwrap();
    let id = submit_detached(foreman, &guest_path("primes"), &args);
    (id, Value::Array(expected))
}

/// `foreman ARGS --foreman URL`, its stdout as JSON (`null` when it is not).
pub fn cli_json(http: &str, args: &[&str]) -> Value {
    let out = foreman_cli(http)
        .args(args)
        .args(["--foreman", http])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Polls `foreman status` until the job reaches `state`; fails after `secs` seconds.
pub fn wait_for_state(http: &str, id: &str, state: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let job = cli_json(http, &["status", id]);
        if job["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not become {state}: {job}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for job `id` to complete, then checks its results against `expected`.
pub fn assert_completes_with(http: &str, id: &str, expected: &Value, secs: u64) {
    wait_for_state(http, id, "completed", secs);
    assert_eq!(
        &cli_json(http, &["results", id])["results"],
        expected,
        "job {id}"
    );
}

/// `foreman submit --detach`: the job id.
pub fn submit_detached(
    foreman: &Foreman,
    module: &std::path::Path,
    args: &std::path::Path,
) -> String {
    let detached = foreman
        .cli()
        .arg("submit")
        .arg(module)
        .arg(args)
        .args(["--foreman", &foreman.http, "--detach"])
        .output()
        .unwrap();
    assert!(
        detached.status.success(),
        "{}",
        String::from_utf8_lossy(&detached.stderr)
    );
    String::from_utf8_lossy(&detached.stdout).trim().to_owned()
}
