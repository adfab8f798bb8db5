//! Hostile peers against a real foreman over QUIC: reports for tasks never
//! given, floods, a worker that stops reading, oversized and non-JSON
//! results, and random bytes. Each is cut off and recorded in the failure
//! history, its task runs on an honest worker, the foreman's memory stays
//! bounded, and the foreman keeps serving.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_completes_with, cli_json, submit_detached, wait_for_state};
use serde_json::Value;
use wasmgrid_protocol::wire::{Finished, Load, ToForeman, ToWorker};
use wasmgrid_tests::guest_path;
use wasmgrid_tests::hostile::{report, rss_bytes, Peer, Rng, PROTOCOL_VIOLATION};
use wasmgrid_tests::processes::{start_foreman, start_worker, Foreman};

const CLOSE_WAIT: Duration = Duration::from_secs(20);

/// An `add` job over these pairs, detached; its id.
fn submit_add(foreman: &Foreman, dir: &Path, pairs: &[(i64, i64)]) -> String {
    let args: Vec<String> = pairs.iter().map(|(a, b)| format!("[{a},{b}]")).collect();
    let path = dir.join(format!("add-{}.json", pairs.len()));
    std::fs::write(&path, format!("[{}]", args.join(","))).unwrap();
    submit_detached(foreman, &guest_path("add"), &path)
}

fn sums(pairs: &[(i64, i64)]) -> Value {
    Value::Array(pairs.iter().map(|(a, b)| Value::from(a + b)).collect())
}

/// The worker's `ProtocolViolation`s, newest first.
fn violations(foreman: &Foreman, worker: u64) -> Vec<Value> {
    let url = format!(
        "{}/api/workers/{worker}/failures?kind=ProtocolViolation",
        foreman.http
    );
    ureq::get(&url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Waits until a `ProtocolViolation` whose message contains `needle` is in
/// the worker's history (the store writes in batches).
fn wait_for_violation(foreman: &Foreman, worker: u64, needle: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = violations(foreman, worker);
        if let Some(found) = all
            .iter()
            .find(|f| f["message"].as_str().is_some_and(|m| m.contains(needle)))
        {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no violation naming {needle:?} for worker {worker}: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first `Run` the peer gets: its assignments.
async fn first_run(peer: &mut Peer) -> Vec<wasmgrid_protocol::wire::Assignment> {
    loop {
        match peer.next(Duration::from_secs(30)).await.unwrap() {
            Some(ToWorker::Run(assignments)) => return assignments,
            Some(_) => continue,
            None => panic!("the foreman closed the stream"),
        }
    }
}

fn assert_cut_off(closed: Option<(u32, String)>, needle: &str) {
    let (code, reason) = closed.expect("the foreman closed the connection");
    assert_eq!(code, PROTOCOL_VIOLATION, "{reason}");
    assert!(
        reason.contains(needle),
        "{reason:?} should contain {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_for_attempts_never_given_cut_the_peer_off() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let mut peer = Peer::join(&foreman.quic, &foreman.token, "liar", 1)
        .await
        .unwrap();
    let worker = peer.worker_id.unwrap();
    let finished = Finished {
        attempt: 987_654_321,
        report: report(Ok("42".into())),
    };
    peer.send(&ToForeman::Finished(vec![finished]))
        .await
        .unwrap();
    assert_cut_off(peer.closed_by_foreman(CLOSE_WAIT).await, "never given");
    let violation = wait_for_violation(&foreman, worker, "attempt 987654321");
    assert_eq!(violation["attempt"], 0, "tied to no attempt: {violation}");
    // And the foreman still serves an honest worker.
    let _honest = start_worker(&foreman, "honest", &dir.path().join("cache"));
    let pairs = [(1, 2), (3, 4)];
    let id = submit_add(&foreman, dir.path(), &pairs);
    assert_completes_with(&foreman.http, &id, &sums(&pairs), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_is_cut_off_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let pid = foreman.process.0.id();
    let mut peer = Peer::join(&foreman.quic, &foreman.token, "flooder", 1)
        .await
        .unwrap();
    let worker = peer.worker_id.unwrap();
    let before = rss_bytes(pid).unwrap();
    let beat =
        wasmgrid_protocol::wire::encode_frame(&ToForeman::Heartbeat(Load::default())).unwrap();
    let burst: Vec<u8> = beat.repeat(1_000);
    let mut sent = 0;
    // Bounded: far past any budget, and a write fails once we are cut off.
    while sent < 2_000 && peer.send_raw(&burst).await.is_ok() {
        sent += 1;
    }
    assert_cut_off(peer.closed_by_foreman(CLOSE_WAIT).await, "flooded");
    assert!(
        sent < 2_000,
        "the flood of {sent}k heartbeats was never cut off"
    );
    wait_for_violation(&foreman, worker, "flooded");
    let after = rss_bytes(pid).unwrap();
    assert!(
        after < before + (256 << 20),
        "the foreman grew from {before} to {after} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_cut_off_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &["--heartbeat-timeout", "3"]);
    let pid = foreman.process.0.id();
    // Tasks with 2 KiB of arguments each: far more than the peer's QUIC
    // receive window, all within the credit it grants. Queued before the
    // peer joins, so that it can start beating at once.
    let padding = "x".repeat(2048);
    let args: Vec<String> = (0..20_000)
        .map(|i| format!("[{i},\"{padding}\"]"))
        .collect();
    let path = dir.path().join("padded.json");
    std::fs::write(&path, format!("[{}]", args.join(","))).unwrap();
    let id = submit_detached(&foreman, &guest_path("add"), &path);
    let before = rss_bytes(pid).unwrap();
    let mut peer = Peer::join(&foreman.quic, &foreman.token, "deaf", 1024)
        .await
        .unwrap();
    let worker = peer.worker_id.unwrap();
    peer.send(&ToForeman::Credit(20_000)).await.unwrap();
    // Alive (heartbeats) but never reading what the foreman sends.
    let beats = async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if peer
                .send(&ToForeman::Heartbeat(Load::default()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), beats).await;
    assert_cut_off(peer.closed_by_foreman(CLOSE_WAIT).await, "stopped reading");
    wait_for_violation(&foreman, worker, "stopped reading");
    let after = rss_bytes(pid).unwrap();
    assert!(
        after < before + (256 << 20),
        "the foreman grew from {before} to {after} bytes"
    );
    // Its attempts go back to the queue (the store catches up in batches).
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli_json(&foreman.http, &["status", &id])["running"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the peer's attempts never went back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cli_json(&foreman.http, &["cancel", &id]);
}

/// A peer takes the job's only task and answers with `bad`; an honest
/// worker then gets the task and the right answer is stored.
async fn bad_result_is_refused(bad: String, needle: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), extra);
    let mut peer = Peer::join(&foreman.quic, &foreman.token, "forger", 1)
        .await
        .unwrap();
    let worker = peer.worker_id.unwrap();
    peer.send(&ToForeman::Credit(1)).await.unwrap();
    let pairs = [(20, 22)];
    let id = submit_add(&foreman, dir.path(), &pairs);
    let assignments = first_run(&mut peer).await;
    let finished = Finished {
        attempt: assignments[0].attempt,
        report: report(Ok(bad)),
    };
    peer.send(&ToForeman::Finished(vec![finished]))
        .await
        .unwrap();
    assert_cut_off(peer.closed_by_foreman(CLOSE_WAIT).await, needle);
    let violation = wait_for_violation(&foreman, worker, needle);
    assert_eq!(violation["attempt"], assignments[0].attempt);
    let _honest = start_worker(&foreman, "honest", &dir.path().join("cache"));
    assert_completes_with(&foreman.http, &id, &sums(&pairs), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_result_is_never_stored_and_the_task_runs_elsewhere() {
    let huge = format!("\"{}\"", "9".repeat(8 * 1024));
    bad_result_is_refused(
        huge,
        "this job's limit is 4096 bytes",
        &["--max-result-kib", "4"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_is_not_json_is_never_stored_and_the_task_runs_elsewhere() {
    bad_result_is_refused("42 and more".into(), "not valid JSON", &[]).await;
}

/// One connection sending `bytes`: raw (no preamble), after the preamble,
/// or after a full join. Returns once the foreman closed it or after a
/// short while.
async fn send_garbage(foreman: &Foreman, stage: u64, name: String, bytes: Vec<u8>) {
    let Ok(mut peer) = Peer::connect(&foreman.quic, &foreman.token).await else {
        return;
    };
    match stage {
        0 => {}
        1 => {
            let preamble = wasmgrid_protocol::wire::Preamble::ours().encode();
            if peer.send_raw(&preamble).await.is_err() {
                return;
            }
        }
        _ => {
            let info = wasmgrid_tests::hostile::worker_info(&name, 1);
            if peer.hello(&foreman.token, info).await.is_err() {
                return;
            }
        }
    }
    let _ = peer.send_raw(&bytes).await;
    let _ = peer.closed_by_foreman(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_from_peers_leave_the_foreman_serving_others() {
    const CONNECTIONS: u64 = 120;
    const AT_ONCE: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &["--heartbeat-timeout", "3"]);
    let pid = foreman.process.0.id();
    let _honest = start_worker(&foreman, "honest", &dir.path().join("cache"));
    let pairs: Vec<(i64, i64)> = (0..200).map(|i| (i, 1000 - i)).collect();
    let during = submit_add(&foreman, dir.path(), &pairs);
    let before = rss_bytes(pid).unwrap();
    let seed = 0x5eed_0fba_db17_e5e5;
    let mut rng = Rng(seed);
    for round in 0..CONNECTIONS / AT_ONCE {
        let mut peers = Vec::new();
        for i in 0..AT_ONCE {
            let n = round * AT_ONCE + i;
            let stage = rng.below(3);
            let len = match rng.below(4) {
                0 => rng.below(8) as usize,
                1 => rng.below(64) as usize,
                2 => rng.below(4096) as usize,
                _ => 4 + rng.below(64 * 1024) as usize,
            };
            let mut bytes = rng.bytes(len);
            // Some start with a plausible frame length, so the decoder
            // reaches the message itself.
            if bytes.len() > 8 && rng.below(2) == 0 {
                let frame = (bytes.len() - 4) as u32;
                bytes[..4].copy_from_slice(&frame.to_le_bytes());
            }
            let foreman = &foreman;
            peers.push(send_garbage(foreman, stage, format!("fuzz-{n}"), bytes));
        }
        let bounded = tokio::time::timeout(Duration::from_secs(60), async {
            for peer in peers {
                peer.await;
            }
        });
        bounded.await.expect("a round of peers finished in time");
    }
    assert!(foreman_alive(pid), "the foreman died (seed {seed:#x})");
    // Peers that joined and then sent garbage were cut off and recorded.
    let url = format!(
        "{}/api/worker-failures?kind=ProtocolViolation",
        foreman.http
    );
    let recorded = ureq::get(&url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0);
    assert!(recorded > 0, "no violation recorded (seed {seed:#x})");
    wait_for_state(&foreman.http, &during, "completed", 120);
    assert_eq!(
        cli_json(&foreman.http, &["results", &during])["results"],
        sums(&pairs)
    );
    let after_pairs = [(7, 35)];
    let after = submit_add(&foreman, dir.path(), &after_pairs);
    wait_for_state(&foreman.http, &after, "completed", 60);
    assert_eq!(
        cli_json(&foreman.http, &["results", &after])["results"],
        sums(&after_pairs)
    );
    let rss = rss_bytes(pid).unwrap();
    assert!(
        rss < before + (256 << 20),
        "the foreman grew from {before} to {rss} bytes (seed {seed:#x})"
    );
}

fn foreman_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| !s.contains("State:\tZ"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stalls_mid_frame_is_dropped_at_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &["--heartbeat-timeout", "2"]);
    let mut peer = Peer::join(&foreman.quic, &foreman.token, "staller", 1)
        .await
        .unwrap();
    // A frame announcing 1000 bytes, then 3 of them and silence.
    let mut partial = 1000u32.to_le_bytes().to_vec();
    partial.extend_from_slice(&[1, 2, 3]);
    peer.send_raw(&partial).await.unwrap();
    let (code, reason) = peer
        .closed_by_foreman(CLOSE_WAIT)
        .await
        .expect("the foreman closed the connection");
    assert!(
        reason.contains("no heartbeat for 2.0 s"),
        "{code}: {reason}"
    );
}
