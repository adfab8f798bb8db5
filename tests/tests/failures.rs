//! Workers that die, leave, are slow or capped, and jobs placed by each
//! scheduler: real `foreman` and `worker` processes on 127.0.0.1.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_completes_with, cli_json, submit_slow_primes, wait_for_state};
use serde_json::Value;
use wasmgrid_tests::guest_path;
use wasmgrid_tests::processes::{start_foreman, start_worker, start_worker_with, Foreman};

/// Blocks until `n` workers are online (`foreman workers --wait`).
fn wait_for_workers(foreman: &Foreman, n: usize) -> Value {
    let workers = cli_json(&foreman.http, &["workers", "--wait", &n.to_string()]);
    assert!(
        workers.as_array().is_some_and(|w| w.len() >= n),
        "{workers}"
    );
    workers
}

fn worker_named<'a>(workers: &'a Value, name: &str) -> &'a Value {
    workers
        .as_array()
        .and_then(|all| all.iter().find(|w| w["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Waits until the job has a task running.
fn wait_until_running(http: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while cli_json(http, &["status", id])["running"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "job {id} never started");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killing_one_of_two_workers_mid_job_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let victim = start_worker(&foreman, "victim", &dir.path().join("cache-victim"));
    let _survivor = start_worker(&foreman, "survivor", &dir.path().join("cache-survivor"));
    wait_for_workers(&foreman, 2);
    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    wait_until_running(&foreman.http, &id);
    drop(victim); // SIGKILL, with tasks in hand
    assert_completes_with(&foreman.http, &id, &expected, 90);
}

#[test]
fn sigterm_drains_a_worker_its_tasks_finish_or_move_and_it_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats every 200 ms tell when a task really runs on the worker.
    let foreman = start_foreman(&dir.path().join("data"), &["--heartbeat-timeout", "0.6"]);
    let mut leaving = start_worker_with(
        &foreman,
        "leaving",
        &dir.path().join("cache-leaving"),
        &["--drain-grace", "20"],
    );
    wait_for_workers(&foreman, 1);
    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker_named(&cli_json(&foreman.http, &["workers"]), "leaving")["running"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "no task ever ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = leaving.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // It finishes what runs, hands back the rest and leaves on its own.
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = leaving.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the draining worker did not leave"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "drained worker exit: {status}");
    let job = cli_json(&foreman.http, &["status", &id]);
    assert_eq!(job["failed"], 0, "{job}");
    assert!(job["succeeded"].as_u64().unwrap_or(0) >= 1, "{job}");
    // What it handed back runs on the next worker.
    let _next = start_worker(&foreman, "next", &dir.path().join("cache-next"));
    assert_completes_with(&foreman.http, &id, &expected, 90);
    let failures = cli_json(
        &foreman.http,
        &["failures", &worker_id(&foreman, "leaving")],
    );
    assert_eq!(failures, Value::Array(vec![]), "a drain is not a failure");
}

fn worker_id(foreman: &Foreman, name: &str) -> String {
    let workers = cli_json(&foreman.http, &["workers"]);
    worker_named(&workers, name)["id"].to_string()
}

#[test]
fn foreman_drain_sends_a_worker_away_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let mut leaving = start_worker(&foreman, "leaving", &dir.path().join("cache-leaving"));
    let _staying = start_worker(&foreman, "staying", &dir.path().join("cache-staying"));
    wait_for_workers(&foreman, 2);
    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    wait_until_running(&foreman.http, &id);
    let leaving_id = worker_id(&foreman, "leaving");
    let answer = cli_json(&foreman.http, &["drain", &leaving_id, "--grace", "20"]);
    assert_eq!(answer["draining"], true, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(40);
    while leaving.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the drained worker did not leave"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_completes_with(&foreman.http, &id, &expected, 90);
    // Draining a worker that has gone is refused with the reason.
    let out = foreman
        .cli()
        .args(["drain", &leaving_id, "--foreman", &foreman.http])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn a_worker_killed_while_fetching_a_module_fetches_cleanly_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let cache = dir.path().join("cache");
    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    // Killed again and again right after joining, while the module is on its
    // way or being compiled into the cache.
    for delay_ms in [0u64, 20, 60, 120, 250] {
        let worker = start_worker(&foreman, "unlucky", &cache);
        let deadline = Instant::now() + Duration::from_secs(30);
        while cli_json(&foreman.http, &["workers"])
            .as_array()
            .is_none_or(|w| !w.iter().any(|w| w["online"] == true))
        {
            assert!(Instant::now() < deadline, "the worker did not join");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        drop(worker);
    }
    let _lucky = start_worker(&foreman, "unlucky", &cache);
    assert_completes_with(&foreman.http, &id, &expected, 120);
}

#[test]
fn cancelling_frees_the_workers_slots_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats every 200 ms carry how many tasks each worker runs.
    let foreman = start_foreman(&dir.path().join("data"), &["--heartbeat-timeout", "0.6"]);
    let _a = start_worker(&foreman, "a", &dir.path().join("cache-a"));
    let _b = start_worker(&foreman, "b", &dir.path().join("cache-b"));
    wait_for_workers(&foreman, 2);
    let args = dir.path().join("loops.json");
    std::fs::write(
        &args,
        r#"[["loop", 0], ["loop", 0], ["loop", 0], ["loop", 0]]"#,
    )
    .unwrap();
    let submitted = foreman
        .cli()
        .arg("submit")
        .arg(guest_path("misbehave"))
        .arg(&args)
        // The foreman's default cap on fuel (foreman serve --max-fuel): hours of spinning.
        .args(["--fuel", "10000000000000", "--timeout", "600"])
        .args(["--foreman", &foreman.http, "--detach"])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    let running = |w: &Value| w["running"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cli_json(&foreman.http, &["workers"])
        .as_array()
        .is_none_or(|all| all.iter().any(|w| running(w) == 0))
    {
        assert!(Instant::now() < deadline, "both workers never got busy");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cancelled = Instant::now();
    assert_eq!(cli_json(&foreman.http, &["cancel", &id])["cancelled"], true);
    loop {
        let workers = cli_json(&foreman.http, &["workers"]);
        if workers
            .as_array()
            .is_some_and(|all| all.iter().all(|w| running(w) == 0))
        {
            break;
        }
        assert!(
            cancelled.elapsed() < Duration::from_secs(2),
            "workers still busy 2 s after cancel: {workers}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_describe_their_machine_and_a_capped_one_scores_lower() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &["--heartbeat-timeout", "0.6"]);
    let full_worker = start_worker(&foreman, "full", &dir.path().join("cache-full"));
    // As on a PC somebody is using: a quarter of the CPU, and only when idle.
    let capped_worker = start_worker_with(
        &foreman,
        "capped",
        &dir.path().join("cache-capped"),
        &["--cpu-limit", "25", "--priority", "idle"],
    );
    let workers = wait_for_workers(&foreman, 2);
    let (full, capped) = (
        worker_named(&workers, "full"),
        worker_named(&workers, "capped"),
    );
    assert_eq!(capped["cpu_limit_percent"], 25, "{workers}");
    assert_eq!(full["cpu_limit_percent"], 100, "{workers}");
    assert_eq!(capped["priority"], "idle", "{workers}");
    assert_eq!(full["priority"], "normal", "{workers}");
    for w in [full, capped] {
        assert!(w["cores"].as_u64().unwrap_or(0) >= 1, "{w}");
        assert!(w["memory_bytes"].as_u64().unwrap_or(0) > 0, "{w}");
        assert!(w["benchmark_fuel_per_sec"].as_u64().unwrap_or(0) > 0, "{w}");
        assert!(w["cpu_model"].is_string(), "{w}");
    }
    // A quarter of the CPU cannot run faster than the whole of it.
    let score = |w: &Value| w["benchmark_fuel_per_sec"].as_u64().unwrap_or(0);
    assert!(score(capped) < score(full), "{workers}");
    // Only the slot threads defer to the machine's other programs.
    #[cfg(target_os = "linux")]
    {
        const SCHED_OTHER: u32 = 0;
        const SCHED_IDLE: u32 = 5;
        let idle = wasmgrid_tests::host::slot_policies(capped_worker.0.id());
        assert!(
            idle.iter().any(|&(slot, _)| slot)
                && idle.iter().all(|&(slot, p)| p == SCHED_IDLE || !slot),
            "{idle:?}"
        );
        assert!(
            idle.iter().any(|&(slot, p)| !slot && p == SCHED_OTHER),
            "{idle:?}"
        );
        let normal = wasmgrid_tests::host::slot_policies(full_worker.0.id());
        assert!(normal.iter().all(|&(_, p)| p == SCHED_OTHER), "{normal:?}");
    }
    // Heartbeats bring the machine's memory use.
    std::thread::sleep(Duration::from_millis(500));
    let workers = cli_json(&foreman.http, &["workers"]);
    assert!(
        worker_named(&workers, "full")["memory_used_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{workers}"
    );
}

#[test]
fn every_scheduler_gets_the_right_answers_and_a_delayed_job_waits() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let _full = start_worker(&foreman, "full", &dir.path().join("cache-full"));
    let _capped = start_worker_with(
        &foreman,
        "capped",
        &dir.path().join("cache-capped"),
        &["--cpu-limit", "50"],
    );
    wait_for_workers(&foreman, 2);
    let ranges: Vec<(u64, u64)> = (0..12).map(|i| (i * 500_000, (i + 1) * 500_000)).collect();
    let expected: Vec<Value> = ranges
        .iter()
        .map(|&(lo, hi)| Value::from(primes::count_primes_in(lo, hi)))
        .collect();
    let args = dir.path().join("primes.json");
    let json: Vec<String> = ranges
        .iter()
        .map(|(lo, hi)| format!("[{lo},{hi}]"))
        .collect();
    std::fs::write(&args, format!("[{}]", json.join(","))).unwrap();
    for scheduler in [
        "fifo",
        "round-robin",
        "least-loaded",
        "performance",
        "priority",
    ] {
        let out = foreman
            .cli()
            .arg("submit")
            .arg(guest_path("primes"))
            .arg(&args)
            .args(["--scheduler", scheduler, "--priority", "3"])
            .args(["--foreman", &foreman.http])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{scheduler}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(results, Value::Array(expected.clone()), "{scheduler}");
    }
    let id = {
        let out = foreman
            .cli()
            .arg("submit")
            .arg(guest_path("primes"))
            .arg(&args)
            .args(["--not-before", "+3s", "--detach"])
            .args(["--foreman", &foreman.http])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let job = cli_json(&foreman.http, &["status", &id]);
    assert_eq!(job["state"], "queued", "held until its time: {job}");
    assert!(job["not_before_ms"].as_u64().is_some(), "{job}");
    wait_for_state(&foreman.http, &id, "completed", 60);
}
