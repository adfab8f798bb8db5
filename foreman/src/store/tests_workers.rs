//! Store tests: workers, their load and failure history, and run-time views.

use std::time::Duration;

use wasmgrid_protocol::{Failure, FailureKind};

use super::tests::*;
use super::*;
use crate::model::{Record, TaskState};
use wasmgrid_protocol::wire::{Load, SlotPriority};

#[test]
fn workers_keep_their_id_by_name_and_hostname() {
    let (_dir, store) = open_temp();
    let a = store.upsert_worker(&worker("w", "pc1")).unwrap();
    let b = store.upsert_worker(&worker("w", "pc2")).unwrap();
    assert_ne!(a, b);
    let mut again = worker("w", "pc1");
    again.info.slots = 2;
    assert_eq!(store.upsert_worker(&again).unwrap(), a);
    store.set_worker_online(b, false).unwrap();
    assert!(matches!(
        store.set_worker_online(99, true),
        Err(StoreError::UnknownWorker(99))
    ));
    let all = store.workers().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].id, all[0].info.slots, all[0].online), (a, 2, true));
    assert_eq!((all[1].id, all[1].online), (b, false));
    assert!(all[0].last_seen_ms > 0);
}

#[test]
fn workers_show_their_cpu_load_cooldown_and_draining() {
    let (_dir, store) = open_temp();
    let w = store.upsert_worker(&worker("w", "pc")).unwrap();
    let other = store.upsert_worker(&worker("w", "pc2")).unwrap();
    let load = Load {
        cpu_permille: 730,
        memory_used_bytes: 3 << 30,
        worker_rss_bytes: 200 << 20,
        running: 5,
    };
    let seen = 4_000_000_000_000;
    store.worker_heartbeat(w, load, seen);
    // An unknown worker's facts change nothing and reject nothing.
    store.worker_heartbeat(99, load, seen);
    store.set_worker_draining(99, true);
    store.record(Record::WorkerCooledDown {
        worker: 99,
        until_ms: 1,
        recent_failures: 1,
    });
    store.set_worker_draining(w, true);
    store.record_all([
        Record::WorkerCooledDown {
            worker: w,
            until_ms: 1_000,
            recent_failures: 4,
        },
        Record::WorkerCooledDown {
            worker: w,
            until_ms: 2_000,
            recent_failures: 5,
        },
    ]);
    store.flush().unwrap();

    let row = store.worker(w).unwrap().unwrap();
    assert_eq!(row.info, info("w", "pc"));
    assert_eq!((row.load, row.last_seen_ms), (load, seen));
    assert_eq!((row.cooldown_until_ms, row.cooldowns), (Some(2_000), 2));
    assert!(row.draining && row.online);
    let json = serde_json::to_value(&row).unwrap();
    // Flat: what the worker said, its load and the foreman's view side by side.
    for (key, value) in [
        ("name", serde_json::json!("w")),
        ("cpu_model", "Test CPU".into()),
        ("benchmark_fuel_per_sec", 2_000_000_000u64.into()),
        ("cpu_limit_percent", 50.into()),
        ("priority", "normal".into()),
        ("cpu_permille", 730.into()),
        ("running", 5.into()),
        ("draining", true.into()),
        ("cooldown_until_ms", 2_000.into()),
        ("recent_failures", 0.into()),
    ] {
        assert_eq!(json[key], value, "{key} in {json}");
    }
    let plain = store.worker(other).unwrap().unwrap();
    assert_eq!(
        (plain.load, plain.cooldown_until_ms),
        (Load::default(), None)
    );
    assert!(!plain.draining);
    assert_eq!(store.worker(99).unwrap(), None);

    // Joining again: no longer draining, the old load forgotten, the new CPU facts kept.
    let mut again = info("w", "pc");
    again.cpu_limit_percent = 80;
    again.priority = SlotPriority::Idle;
    assert_eq!(store.upsert_worker(&WorkerRow::joining(&again)).unwrap(), w);
    let row = store.worker(w).unwrap().unwrap();
    assert!(!row.draining);
    assert_eq!(
        (row.load, row.info.cpu_limit_percent, row.info.priority),
        (Load::default(), 80, SlotPriority::Idle)
    );
    assert_eq!(row.cooldowns, 2);

    store.worker_heartbeat(w, load, seen);
    store.flush().unwrap();
    store.set_worker_online(w, false).unwrap();
    let row = store.worker(w).unwrap().unwrap();
    assert_eq!((row.online, row.load.running), (false, 0));
    assert_eq!(row.load.cpu_permille, 730);
}

#[test]
fn worker_failures_newest_first_without_cancellations() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w", "pc")).unwrap();
    let other = store.upsert_worker(&worker("v", "pc")).unwrap();
    let job = store.create_job(new_job(args(4))).unwrap().id;
    let trap = |m: &str| Err(Failure::new(FailureKind::Trap, m));
    // Separate batches, so each failure has its own time.
    for (attempt, task, outcome) in [(1, 0, trap("first")), (2, 1, trap("second"))] {
        store.record_all([
            started(job, task, attempt, w),
            ended(job, task, attempt, outcome, TaskState::Failed),
        ]);
        store.flush().unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    store.record_all([
        started(job, 2, 3, w),
        Record::AttemptAbandoned {
            job,
            task: 2,
            attempt: 3,
            worker: w,
            failure: Failure::new(FailureKind::WorkerLost, "gone"),
            task_state: TaskState::Queued,
        },
        started(job, 3, 4, w),
        Record::AttemptAbandoned {
            job,
            task: 3,
            attempt: 4,
            worker: w,
            failure: Failure::new(FailureKind::Cancelled, "job cancelled"),
            task_state: TaskState::Cancelled,
        },
        started(job, 2, 5, other),
        Record::AttemptEnded {
            job,
            task: 2,
            attempt: 5,
            worker: other,
            report: Box::new(report(trap("elsewhere"), 1)),
            task_state: TaskState::Failed,
        },
    ]);
    store.flush().unwrap();

    let failures = store.failures(Some(w), None, 0, 100).unwrap();
    let seen: Vec<(u64, TaskIndex, FailureKind)> = failures
        .iter()
        .map(|f| (f.attempt, f.task, f.kind))
        .collect();
    assert_eq!(
        seen,
        [
            (3, 2, FailureKind::WorkerLost),
            (2, 1, FailureKind::Trap),
            (1, 0, FailureKind::Trap)
        ]
    );
    assert!(failures.windows(2).all(|p| p[0].at_ms >= p[1].at_ms));
    assert_eq!(
        (failures[1].job, failures[1].message.as_str()),
        (job, "second")
    );
    assert_eq!(store.failures(Some(w), None, 0, 1).unwrap().len(), 1);
    assert!(store.failures(Some(w), None, 0, 0).unwrap().is_empty());
    assert_eq!(store.failures(Some(other), None, 0, 100).unwrap().len(), 1);
    assert!(matches!(
        store.failures(Some(99), None, 0, 10),
        Err(StoreError::UnknownWorker(99))
    ));
    // All three are within the last ten minutes.
    let row = store.worker(w).unwrap().unwrap();
    assert_eq!((row.recent_failures, row.tasks_failed), (3, 3));
}

/// The histogram table agrees with the scan of every attempt it replaced:
/// across batches, for each job and the grid, with failures, abandoned and
/// running attempts left out and a rejected record in a batch.
#[test]
fn run_time_buckets_match_a_scan_of_the_attempts() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w1", "pc1")).unwrap();
    let run_times: [u64; 12] = [
        0,
        1,
        999,
        1_000,
        1_001,
        2_000,
        65_536_000,
        131_072_000,
        131_072_001,
        500_000_000,
        u64::MAX,
        3,
    ];
    let jobs: Vec<JobId> = (0..2)
        .map(|_| {
            store
                .create_job(new_job(args(run_times.len() + 2)))
                .unwrap()
                .id
        })
        .collect();
    let mut attempt = 0;
    for (j, &job) in jobs.iter().enumerate() {
        for (task, &run_us) in run_times.iter().enumerate().skip(j) {
            attempt += 1;
            let mut r = report(Ok(format!("{task}")), 5);
            r.timings.run_us = run_us;
            let task = task as TaskIndex;
            let mut batch = vec![
                started(job, task, attempt, w),
                Record::AttemptEnded {
                    job,
                    task,
                    attempt,
                    worker: w,
                    report: Box::new(r),
                    task_state: TaskState::Succeeded,
                },
            ];
            if task.is_multiple_of(3) {
                // Rejected: the batch is redone record by record.
                batch.push(started(job, 999, attempt + 1000, w));
            }
            store.record_all(batch);
            if task.is_multiple_of(4) {
                let _ = store.flush();
            }
        }
        // A failure with a run time, an abandoned attempt, a running one.
        let n = run_times.len() as TaskIndex;
        let mut failed = report(Err(Failure::new(FailureKind::Trap, "boom")), 5);
        failed.timings.run_us = 1_500;
        store.record_all(vec![
            started(job, n, attempt + 100, w),
            Record::AttemptEnded {
                job,
                task: n,
                attempt: attempt + 100,
                worker: w,
                report: Box::new(failed),
                task_state: TaskState::Failed,
            },
            started(job, n + 1, attempt + 200, w),
            Record::AttemptAbandoned {
                job,
                task: n + 1,
                attempt: attempt + 200,
                worker: w,
                failure: Failure::new(FailureKind::WorkerLost, "gone"),
                task_state: TaskState::Queued,
            },
            started(job, n + 1, attempt + 300, w),
        ]);
        attempt += 400;
    }
    let _ = store.flush();

    let scan = |job| store.read(move |conn| views::run_time_histogram_scan(conn, job));
    let grid = store.run_time_histogram().unwrap();
    assert_eq!(grid, scan(None).unwrap());
    // By hand: 0, 1, 999, 1000 and 3 µs twice less job 1's 0 µs: bucket 0.
    assert_eq!(grid.counts[0], 9);
    assert_eq!(grid.counts[1], 4, "1001 and 2000 µs, twice");
    assert_eq!(grid.counts[16], 2, "65.536 s");
    assert_eq!(grid.counts[17], 2, "131.072 s");
    assert_eq!(grid.counts[18], 6, "past the last bound");
    assert_eq!(grid.counts.iter().sum::<u64>(), 23);
    for &job in &jobs {
        let table = store.read(move |conn| views::run_time_histogram(conn, Some(job)));
        assert_eq!(table.unwrap(), scan(Some(job)).unwrap());
        let summary = store.job_summary(job).unwrap().unwrap();
        let counts: Vec<u64> = summary.latency_ms.iter().map(|b| b.count).collect();
        assert_eq!(counts, scan(Some(job)).unwrap().counts);
    }
    assert_ne!(
        store.job_summary(jobs[0]).unwrap().unwrap().latency_ms,
        store.job_summary(jobs[1]).unwrap().unwrap().latency_ms
    );
}
