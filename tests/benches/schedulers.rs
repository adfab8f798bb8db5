//! Makespan of a `primes` job on two unequal workers under each scheduler
//! (run with `cargo xtask bench`): one worker capped at 25 % CPU, one not,
//! one slot each, a real foreman on 127.0.0.1. The same job, the same
//! workers, one fresh grid per scheduler.

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmgrid_tests::guest_path;
use wasmgrid_tests::processes::{start_foreman, start_worker_with, Foreman};

/// Tasks in the job and the width of each one's range.
const TASKS: u64 = 24;
const RANGE: u64 = 6_000_000;

fn main() {
    let args = tempfile_args();
    println!(
        "# Scheduler makespan: `primes` below {} in {TASKS} tasks",
        TASKS * RANGE
    );
    println!("two workers with one slot each: `capped` at --cpu-limit 25, `full` unlimited\n");
    println!("| scheduler | makespan | vs round-robin | tasks on capped | tasks on full |");
    println!("|---|---|---|---|---|");
    let mut round_robin = None;
    let schedulers = [
        "round-robin",
        "fifo",
        "least-loaded",
        "priority",
        "performance",
    ];
    for scheduler in schedulers {
        let run = run(scheduler, &args);
        let base = *round_robin.get_or_insert(run.makespan);
        println!(
            "| {scheduler} | {:.2} s | {:.2}× | {} | {} |",
            run.makespan.as_secs_f64(),
            base.as_secs_f64() / run.makespan.as_secs_f64(),
            run.on_capped,
            run.on_full
        );
    }
}

struct Run {
    makespan: Duration,
    on_capped: u64,
    on_full: u64,
}

fn run(scheduler: &str, args: &std::path::Path) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let _capped = start_worker_with(
        &foreman,
        "capped",
        &dir.path().join("c1"),
        &["--cpu-limit", "25"],
    );
    let _full = start_worker_with(&foreman, "full", &dir.path().join("c2"), &[]);
    cli(&foreman, &["workers", "--wait", "2"]);
    // Warm both module caches, so the measured job is all computing.
    let warm = dir.path().join("warm.json");
    std::fs::write(&warm, "[[0, 10], [10, 20], [20, 30], [30, 40]]").expect("write");
    submit(&foreman, &warm, &["--scheduler", "round-robin"]);
    let before = counts(&foreman);
    let started = Instant::now();
    submit(&foreman, args, &["--scheduler", scheduler]);
    let makespan = started.elapsed();
    let after = counts(&foreman);
    Run {
        makespan,
        on_capped: after.0 - before.0,
        on_full: after.1 - before.1,
    }
}

/// Tasks succeeded so far on (capped, full).
fn counts(foreman: &Foreman) -> (u64, u64) {
    let workers = cli(foreman, &["workers"]);
    let of = |name: &str| {
        workers
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == name))
            .and_then(|w| w["tasks_succeeded"].as_u64())
            .unwrap_or(0)
    };
    (of("capped"), of("full"))
}

fn submit(foreman: &Foreman, args: &std::path::Path, extra: &[&str]) {
    let out = foreman
        .cli()
        .arg("submit")
        .arg(guest_path("primes"))
        .arg(args)
        .args(extra)
        .args(["--foreman", &foreman.http])
        .output()
        .expect("foreman submit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cli(foreman: &Foreman, args: &[&str]) -> Value {
    let out = foreman
        .cli()
        .args(args)
        .args(["--foreman", &foreman.http])
        .output()
        .expect("foreman");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn tempfile_args() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("wasmgrid-makespan-{}.json", std::process::id()));
    let ranges: Vec<String> = (0..TASKS)
        .map(|i| format!("[{},{}]", i * RANGE, (i + 1) * RANGE))
        .collect();
    std::fs::write(&path, format!("[{}]", ranges.join(","))).expect("write args");
    path
}
