//! The grid end to end: a real foreman and real workers on 127.0.0.1, jobs
//! submitted with `foreman submit`, answers checked against native code.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::{
    assert_completes_with, cli_json, submit_detached, submit_slow_primes, wait_for_state,
};
use serde_json::{json, Value};
use wasmgrid_tests::processes::{
    start_foreman, start_foreman_at, start_worker, start_worker_logging, Foreman,
};
use wasmgrid_tests::{binary, example_args_path, guest_path, json_elements};

fn submit(foreman: &Foreman, name: &str) -> Output {
    foreman
        .cli()
        .arg("submit")
        .arg(guest_path(name))
        .arg(example_args_path(name))
        .args(["--foreman", &foreman.http])
        .output()
        .expect("foreman submit runs")
}

fn check_against_native<E: std::fmt::Display>(
    name: &str,
    output: &Output,
    native: impl Fn(&str) -> Result<String, E>,
) {
    assert!(
        output.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Value> =
        serde_json::from_slice(&output.stdout).expect("results are a JSON array");
    let elements = json_elements(&example_args_path(name));
    assert_eq!(results.len(), elements.len(), "{name}");
    for (i, (arg, result)) in elements.iter().zip(&results).enumerate() {
        let expected: Value =
            serde_json::from_str(&native(arg).unwrap_or_else(|e| panic!("{name} args[{i}]: {e}")))
                .unwrap();
        assert_eq!(result, &expected, "{name} args[{i}]");
    }
}

#[test]
fn two_workers_run_every_example_and_match_native() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let _a = start_worker(&foreman, "a", &dir.path().join("cache-a"));
    let _b = start_worker(&foreman, "b", &dir.path().join("cache-b"));
    check_against_native("primes", &submit(&foreman, "primes"), primes::task_entry);
    check_against_native(
        "mandelbrot",
        &submit(&foreman, "mandelbrot"),
        mandelbrot::task_entry,
    );
    check_against_native("pi", &submit(&foreman, "pi"), pi::task_entry);
    check_against_native(
        "hashsearch",
        &submit(&foreman, "hashsearch"),
        hashsearch::task_entry,
    );
    check_against_native(
        "wordcount",
        &submit(&foreman, "wordcount"),
        wordcount::task_entry,
    );
    check_against_native("add", &submit(&foreman, "add"), add::task_entry);
}

/// `POST /api/jobs?wait_ms=` with `primes`: the job, and its results if it
/// finished within the wait.
fn call_and_wait(foreman: &Foreman, args: Value, wait_ms: u64) -> Value {
    use base64::Engine as _;
    let wasm = std::fs::read(guest_path("primes")).unwrap();
    let body = json!({
        "module_base64": base64::engine::general_purpose::STANDARD.encode(wasm),
        "args": args,
        "options": {"retries": 0},
    });
    let mut response = ureq::post(&format!("{}/api/jobs?wait_ms={wait_ms}", foreman.http))
        .header("authorization", format!("Bearer {}", foreman.client_token))
        .send_json(&body)
        .expect("POST /api/jobs");
    assert_eq!(response.status(), 201);
    response.body_mut().read_json().expect("JSON")
}

#[test]
fn a_job_submitted_before_any_worker_runs_when_one_joins_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let foreman = start_foreman(&data, &[]);
    let id = submit_detached(
        &foreman,
        &guest_path("primes"),
        &example_args_path("primes"),
    );

    assert_eq!(cli_json(&foreman.http, &["status", &id])["state"], "queued");
    // A call that waits: with no worker it gives up with the job still queued.
    let called = call_and_wait(&foreman, json!([[0, 100]]), 200);
    assert_eq!(called["state"], "queued", "{called}");
    assert!(called.get("results").is_none(), "{called}");

    let worker = start_worker(&foreman, "late", &dir.path().join("cache"));
    wait_for_state(&foreman.http, &id, "completed", 60);
    let called = call_and_wait(&foreman, json!([[0, 100], [100, 1000], [5, 1]]), 30_000);
    assert_eq!(called["state"], "failed", "{called}");
    assert_eq!(called["results"], json!([25, 143, null]), "{called}");
    assert_eq!(called["failures"][0]["index"], 2, "{called}");
    assert_eq!(called["failures"][0]["kind"], "GuestError", "{called}");
    drop(worker);
    drop(foreman);

    let restarted = start_foreman(&data, &[]);
    let body = cli_json(&restarted.http, &["results", &id]);
    let total: u64 = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 1_270_607);

    // A finished job can be deleted, results and all...
    let cli = |foreman: &Foreman, args: &[&str]| -> Output {
        let mut command = foreman.cli();
        command.args(args).args(["--foreman", &foreman.http]);
        command.output().unwrap()
    };
    let deleted = cli(&restarted, &["delete", &id]);
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let said = String::from_utf8_lossy(&deleted.stdout);
    assert_eq!(said.trim(), format!("deleted job {id} (64 tasks)"));
    let gone = cli(&restarted, &["results", &id]);
    assert!(!gone.status.success());
    let why = String::from_utf8_lossy(&gone.stderr);
    assert!(why.contains(&format!("no job with id {id}")), "{why}");
    drop(restarted);
    // ...and with --retention, every finished job goes once that old.
    let sweeping = start_foreman(&data, &["--retention", "1s"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = cli_json(&sweeping.http, &["jobs"]);
        if jobs.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "still kept: {jobs}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_with_local_workers_is_a_whole_grid() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(
        &dir.path().join("data"),
        &["--local-workers", "2", "--local-priority", "idle"],
    );
    let waited = foreman
        .cli()
        .args([
            "workers",
            "--wait",
            "2",
            "--timeout",
            "60",
            "--foreman",
            &foreman.http,
        ])
        .output()
        .unwrap();
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let listed: Value = serde_json::from_slice(&waited.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    // They share the machine's cores rather than each taking them all.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get() as u64);
    let slots: Vec<u64> = listed
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w["slots"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        slots.iter().all(|&s| s == (cores / 2).max(1)),
        "{slots:?} on {cores} cores"
    );
    let too_many = foreman
        .cli()
        .args([
            "workers",
            "--wait",
            "3",
            "--timeout",
            "0.3",
            "--foreman",
            &foreman.http,
        ])
        .output()
        .unwrap();
    assert_eq!(too_many.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&too_many.stderr).contains("2 of 3 workers online"));
    // The local workers' tasks run on what the machine leaves idle.
    #[cfg(target_os = "linux")]
    {
        const SCHED_IDLE: u32 = 5;
        let workers = wasmgrid_tests::host::children(foreman.process.0.id());
        assert_eq!(workers.len(), 2, "{workers:?}");
        for pid in workers {
            let policies = wasmgrid_tests::host::slot_policies(pid);
            assert!(
                policies.iter().any(|&(slot, _)| slot)
                    && policies.iter().all(|&(slot, p)| p == SCHED_IDLE || !slot),
                "{policies:?}"
            );
        }
    }
    check_against_native("pi", &submit(&foreman, "pi"), pi::task_entry);
}

#[test]
fn bad_submissions_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let not_wasm = dir.path().join("not.wasm");
    std::fs::write(&not_wasm, b"plain text").unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, b"[]").unwrap();
    for (module, args, expected) in [
        (
            not_wasm.as_path(),
            example_args_path("add"),
            "InvalidModule: not a wasm binary",
        ),
        (guest_path("add").as_path(), empty.clone(), "empty array"),
    ] {
        let out = foreman
            .cli()
            .arg("submit")
            .arg(module)
            .arg(&args)
            .args(["--foreman", &foreman.http])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
    }
    let unknown = foreman
        .cli()
        .args(["status", "999", "--foreman", &foreman.http])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no job with id 999"));
}

#[test]
fn a_worker_with_a_wrong_token_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let fingerprint = foreman.token.split_once(':').unwrap().1;
    let out = Command::new(binary("worker"))
        .args([
            "--foreman",
            &foreman.quic,
            "--token",
            &format!("wrong:{fingerprint}"),
            "--slots",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid join token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens a QUIC connection that passes TLS, sends `bytes` on the control
/// stream, and returns the reason the foreman gave for closing it.
async fn close_reason_after(quic: &str, fingerprint: &str, bytes: Vec<u8>) -> String {
    use wasmgrid_worker::join::{client_config, SERVER_NAME};
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connection = endpoint
        .connect_with(
            client_config(fingerprint).unwrap(),
            quic.parse().unwrap(),
            SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    let _ = recv.read_to_end(1 << 20).await;
    match connection.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => other.to_string(),
    }
}

#[test]
fn incompatible_and_garbage_peers_are_cut_off_and_the_grid_carries_on() {
    use wasmgrid_protocol::wire::Preamble;
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let fingerprint = foreman.token.split_once(':').unwrap().1.to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let future_version = Preamble { version: 99 }.encode().to_vec();
        let reason = close_reason_after(&foreman.quic, &fingerprint, future_version).await;
        let ours = wasmgrid_protocol::wire::PROTOCOL_VERSION;
        assert_eq!(
            reason,
            format!(
                "incompatible protocol: the foreman speaks version {ours}, the worker speaks version 99"
            )
        );

        let mut garbage_frame = Preamble::ours().encode().to_vec();
        garbage_frame.extend([0xff; 64]);
        let reason = close_reason_after(&foreman.quic, &fingerprint, garbage_frame).await;
        assert!(reason.contains("larger than the limit"), "{reason}");

        let mut not_a_hello = Preamble::ours().encode().to_vec();
        not_a_hello.extend([3, 0, 0, 0, 0xfe, 0xfe, 0xfe]);
        let reason = close_reason_after(&foreman.quic, &fingerprint, not_a_hello).await;
        assert!(reason.contains("malformed message"), "{reason}");

        let reason =
            close_reason_after(&foreman.quic, &fingerprint, b"GET / HTTP/1.1\r\n".to_vec()).await;
        assert!(
            reason.contains("not speaking the wasmgrid protocol"),
            "{reason}"
        );
    });
    // Raw UDP noise at the QUIC port.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..50 {
        socket.send_to(&[0xde; 1200], &foreman.quic).unwrap();
    }
    let _worker = start_worker(&foreman, "after-noise", &dir.path().join("cache"));
    check_against_native("add", &submit(&foreman, "add"), add::task_entry);
}

#[test]
fn an_upload_over_the_limit_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &["--max-upload-mib", "1"]);
    let big_args = dir.path().join("big.json");
    let element = format!("[\"{}\"]", "x".repeat(1000));
    let all: Vec<&str> = std::iter::repeat_n(element.as_str(), 2000).collect();
    std::fs::write(&big_args, format!("[{}]", all.join(","))).unwrap();
    let out = foreman
        .cli()
        .arg("submit")
        .arg(guest_path("wordcount"))
        .arg(&big_args)
        .args(["--foreman", &foreman.http])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("larger than the foreman's limit of 1 MiB"),
        "{err}"
    );
}

#[test]
fn a_job_over_a_cap_is_refused_before_uploading_naming_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(
        &dir.path().join("data"),
        &["--max-memory-mib", "64", "--max-tasks-per-job", "3"],
    );
    let submit = |extra: &[&str]| {
        Command::new(binary("foreman"))
            .arg("submit")
            .arg(guest_path("add"))
            .arg(example_args_path("add"))
            .args(extra)
            .args(["--foreman", &foreman.http])
            .output()
            .unwrap()
    };
    for (extra, expected) in [
        (
            &["--memory", "8192"][..],
            "memory_mib 8192 exceeds this foreman's cap of 64 MiB (foreman serve --max-memory-mib)",
        ),
        (
            &[],
            "more than this foreman's cap of 3 (foreman serve --max-tasks-per-job)",
        ),
    ] {
        let out = submit(extra);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
    }
    let jobs = Command::new(binary("foreman"))
        .args(["jobs", "--foreman", &foreman.http])
        .output()
        .unwrap();
    let jobs: Value = serde_json::from_slice(&jobs.stdout).unwrap();
    assert_eq!(jobs, serde_json::json!([]), "a refused job was stored");
}

#[test]
fn a_silent_worker_goes_offline_and_its_tasks_run_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &["--heartbeat-timeout", "1"]);
    let frozen = start_worker(&foreman, "frozen", &dir.path().join("cache-frozen"));
    let foreman_cli = |args: &[&str]| cli_json(&foreman.http, args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while foreman_cli(&["workers"]).as_array().map_or(0, Vec::len) < 1 {
        assert!(Instant::now() < deadline, "the first worker did not join");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The first worker holds several of these tasks when it freezes.
    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    // Freeze the worker as soon as it runs the job, while it holds several tasks.
    let deadline = Instant::now() + Duration::from_secs(30);
    while foreman_cli(&["status", &id])["running"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = frozen.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let _healthy = start_worker(&foreman, "healthy", &dir.path().join("cache-healthy"));

    wait_for_state(&foreman.http, &id, "completed", 60);
    assert_eq!(foreman_cli(&["results", &id])["results"], expected);
    let workers = foreman_cli(&["workers"]);
    let frozen_row = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "frozen")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(frozen_row["online"], false, "{workers}");
    // What a person at a terminal sees of the same.
    let table = Command::new(binary("foreman"))
        .args(["workers", "--format", "table", "--foreman", &foreman.http])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let frozen_line = table.lines().find(|line| line.contains("frozen"));
    assert!(
        table.starts_with("ID  NAME") && frozen_line.is_some_and(|line| line.contains("offline")),
        "{table}"
    );
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
}

#[test]
fn a_foreman_killed_mid_job_resumes_it_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let foreman = start_foreman(&data, &[]);
    let quic = foreman.quic.clone();
    let log = dir.path().join("worker.log");
    let _worker = start_worker_logging(&foreman, "steady", &dir.path().join("cache"), &log);

    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    std::thread::sleep(Duration::from_millis(500));
    drop(foreman); // SIGKILL, mid-job

    let restarted = start_foreman_at(&data, &quic, &[]);
    assert_completes_with(&restarted.http, &id, &expected, 90);
    // The new process told the worker its connection was gone (a stateless
    // reset it could check), rather than leaving it to time out.
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("connection lost: reset by peer") && !logged.contains("timed out"),
        "{logged}"
    );
}

#[test]
fn cancelling_a_job_stops_its_running_tasks_on_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let _worker = start_worker(&foreman, "only", &dir.path().join("cache"));
    let cli = |args: &[&str]| -> Output {
        foreman
            .cli()
            .args(args)
            .args(["--foreman", &foreman.http])
            .output()
            .unwrap()
    };
    // Tasks that spin until their ten-minute limit: only cancellation can free the slot.
    let args = dir.path().join("loops.json");
    std::fs::write(&args, r#"[["loop", 0], ["loop", 0], ["loop", 0]]"#).unwrap();
    let module = guest_path("misbehave");
    let module = module.to_str().unwrap();
    let args_path = args.to_str().unwrap();
    let submitted = cli(&[
        "submit",
        module,
        args_path,
        // The foreman's default cap (foreman serve --max-fuel): hours of spinning.
        "--fuel",
        "10000000000000",
        "--timeout",
        "600",
        "--detach",
    ]);
    let id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job: Value =
            serde_json::from_slice(&cli(&["status", &id]).stdout).unwrap_or(Value::Null);
        if job["running"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the loop never started: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cancelled: Value = serde_json::from_slice(&cli(&["cancel", &id]).stdout).unwrap();
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let again: Value = serde_json::from_slice(&cli(&["cancel", &id]).stdout).unwrap();
    assert_eq!(
        again["cancelled"], false,
        "cancelling a finished job is a no-op: {again}"
    );

    // The worker's only slot is free again: a new job runs at once.
    let started = Instant::now();
    let out = cli(&[
        "submit",
        guest_path("add").to_str().unwrap(),
        example_args_path("add").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}
