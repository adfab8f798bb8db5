//! The end of a job on a real foreman and a real worker: once nothing is
//! queued, a worker that idles takes over tasks another holds unstarted.
//! The idle one is a scripted peer that answers at once, so it is idle
//! (and the real worker still busy) at a moment the test knows.

mod common;

use std::time::{Duration, Instant};

use common::{cli_json, submit_slow_primes, wait_for_state};
use serde_json::Value;
use wasmgrid_protocol::wire::{Finished, ToForeman, ToWorker};
use wasmgrid_tests::hostile::{report, Peer};
use wasmgrid_tests::processes::{start_foreman, start_worker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_takes_over_tasks_a_busy_one_has_not_started() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let _busy = start_worker(&foreman, "busy", &dir.path().join("cache"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while cli_json(&foreman.http, &["workers"])
        .as_array()
        .map_or(0, Vec::len)
        < 1
    {
        assert!(Instant::now() < deadline, "the worker did not join");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Eight tasks of 0.1–0.4 s: the busy worker (one slot) takes tasks 0–2,
    // one to run and two to queue.
    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    let expected = expected.as_array().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cli_json(&foreman.http, &["status", &id])["running"]
        .as_u64()
        .unwrap_or(0)
        < 3
    {
        assert!(Instant::now() < deadline, "the busy worker got no tasks");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The peer has one slot and answers each task at once (with the native
    // answer): it empties the queue, then idles while the busy worker still
    // holds tasks it has not started.
    let mut peer = Peer::join(&foreman.quic, &foreman.token, "idle", 1)
        .await
        .unwrap();
    peer.send(&ToForeman::Credit(1)).await.unwrap();
    let mut answered = Vec::new();
    loop {
        if cli_json(&foreman.http, &["status", &id])["state"] == "completed" {
            break;
        }
        let message = match peer.next(Duration::from_millis(200)).await {
            Ok(message) => message,
            Err(_) => continue, // nothing for now: the busy worker runs on
        };
        let Some(ToWorker::Run(assignments)) = message else {
            assert!(message.is_some(), "the foreman closed the stream");
            continue;
        };
        for assignment in assignments {
            let range: Vec<u64> = serde_json::from_str(&assignment.args).unwrap();
            let task = (range[0] / 60_000_000) as usize;
            answered.push(task);
            let mut report = report(Ok(expected[task].to_string()));
            // As long as such a task takes (a recall is not worth it for
            // tasks shorter than its latency), with no fuel to learn a speed from.
            report.timings.run_us = 200_000;
            report.fuel_used = 0;
            let finished = Finished {
                attempt: assignment.attempt,
                report,
            };
            peer.send(&ToForeman::Finished(vec![finished]))
                .await
                .unwrap();
        }
        assert!(answered.len() <= 8, "tasks answered twice: {answered:?}");
    }

    wait_for_state(&foreman.http, &id, "completed", 60);
    let results = cli_json(&foreman.http, &["results", &id]);
    assert_eq!(results["results"], Value::Array(expected));
    answered.sort_unstable();
    assert!(
        answered.iter().any(|&task| task < 3),
        "no task went from the busy worker to the idle one: the idle one ran {answered:?}"
    );
    assert!(
        answered.iter().all(|&task| task != 0),
        "the busy worker's running task was taken from it: {answered:?}"
    );
}
