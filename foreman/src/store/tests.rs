use std::time::{Duration, Instant};

use wasmgrid_protocol::{
    CacheSource, CapturedOutput, Failure, FailureKind, TaskReport, TaskTimings,
};

use super::*;
use crate::model::{JobState, Record, Scheduler, TaskState};
use wasmgrid_protocol::wire::{Load, WorkerInfo};

const MODULE: ModuleHash = [7; 32];

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("foreman.db")).unwrap();
    (dir, store)
}

fn new_job(args: Vec<String>) -> NewJob {
    NewJob {
        module: MODULE,
        limits: TaskLimits::default(),
        max_retries: 2,
        priority: 0,
        scheduler: Scheduler::Fifo,
        not_before_ms: None,
        retry_deterministic: false,
        args,
    }
}

fn args(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("[{i}]")).collect()
}

fn report(outcome: Result<String, Failure>, fuel: u64) -> TaskReport {
    TaskReport {
        outcome,
        fuel_used: fuel,
        cache: CacheSource::Memory,
        timings: TaskTimings {
            load_us: 1,
            instantiate_us: 2,
            run_us: 3,
        },
        stdout: CapturedOutput {
            text: "hello".into(),
            truncated: false,
        },
        stderr: CapturedOutput::default(),
    }
}

fn started(job: JobId, task: TaskIndex, attempt: u64, worker: WorkerId) -> Record {
    Record::AttemptStarted {
        job,
        task,
        attempt,
        worker,
    }
}

fn ended(
    job: JobId,
    task: TaskIndex,
    attempt: u64,
    outcome: Result<String, Failure>,
    task_state: TaskState,
) -> Record {
    Record::AttemptEnded {
        job,
        task,
        attempt,
        worker: 1,
        report: Box::new(report(outcome, 100)),
        task_state,
    }
}

fn counters(row: &JobRow) -> [u32; 5] {
    [
        row.queued,
        row.running,
        row.succeeded,
        row.failed,
        row.cancelled,
    ]
}

fn info(name: &str, host: &str) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        hostname: host.into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        cores: 8,
        memory_bytes: 16 << 30,
        slots: 8,
        wasmtime_version: "48.0.8".into(),
        engine_hash: "abc".into(),
        cpu_model: "Test CPU".into(),
        benchmark_fuel_per_sec: 2_000_000_000,
        cpu_limit_percent: 50,
    }
}

fn worker(name: &str, host: &str) -> WorkerRow {
    WorkerRow::joining(&info(name, host))
}

#[test]
fn store_is_a_shareable_handle() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Store>();
}

#[test]
fn data_survives_reopen_and_schema_is_not_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreman.db");
    let id = {
        let store = Store::open(&path).unwrap();
        store.put_module(&MODULE, b"\0asm").unwrap();
        store.create_job(new_job(args(3))).unwrap().id
    };
    let store = Store::open(&path).unwrap();
    let job = store.job(id).unwrap().unwrap();
    assert_eq!((job.total, job.queued, job.state), (3, 3, JobState::Queued));
    assert_eq!(store.module(&MODULE).unwrap().unwrap(), b"\0asm");
    // The next job gets a fresh id: ids are never reused.
    let second = store.create_job(new_job(args(1))).unwrap().id;
    assert!(second > id);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::SCHEMA_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreman.db");
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    assert!(matches!(
        Store::open(&path),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn create_job_then_results_in_argument_order() {
    let (_dir, store) = open_temp();
    assert!(matches!(
        store.create_job(new_job(args(2))),
        Err(StoreError::UnknownModule(_))
    ));
    store.put_module(&MODULE, b"wasm").unwrap();
    let spec = store.create_job(new_job(args(50))).unwrap();
    assert_eq!(spec.task_count, 50);
    assert_eq!(spec.module, MODULE);

    let results = store.results(spec.id).unwrap().unwrap();
    assert_eq!(results.len(), 50);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.index as usize, i);
        assert_eq!((r.state, r.attempts), (TaskState::Queued, 0));
        assert_eq!((&r.result, &r.failure), (&None, &None));
    }
    assert_eq!(store.results(spec.id + 1).unwrap(), None);
    assert_eq!(store.job(spec.id + 1).unwrap(), None);

    let row = store.job(spec.id).unwrap().unwrap();
    assert_eq!(row.module, hex::encode(MODULE));
    assert_eq!(row.limits, TaskLimits::default());
    assert_eq!(
        (row.max_retries, row.scheduler, row.not_before_ms),
        (2, Scheduler::Fifo, None)
    );
    assert!(row.created_at_ms > 0);
    let json = serde_json::to_value(&row).unwrap();
    assert_eq!(json["module"], hex::encode(MODULE));
    assert_eq!(json["state"], "queued");
    assert_eq!(json["scheduler"], "fifo");
    assert_eq!(json["not_before_ms"], serde_json::Value::Null);
}

#[test]
fn retries_failures_and_cancellation_keep_counters_right() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w1", "pc1")).unwrap();
    assert_eq!(w, 1);
    let job = store.create_job(new_job(args(4))).unwrap().id;
    let row = |s: &Store| s.job(job).unwrap().unwrap();

    store.record(Record::JobStateChanged {
        job,
        state: JobState::Running,
    });
    store.record(started(job, 0, 1, w));
    store.flush().unwrap();
    let r = row(&store);
    assert_eq!(counters(&r), [3, 1, 0, 0, 0]);
    assert_eq!(r.state, JobState::Running);
    assert!(r.started_at_ms.is_some() && r.finished_at_ms.is_none());

    // Timeout: back to the queue, then a second attempt succeeds.
    let timeout = Failure::new(FailureKind::Timeout, "60 s");
    store.record(ended(job, 0, 1, Err(timeout), TaskState::Queued));
    store.flush().unwrap();
    assert_eq!(counters(&row(&store)), [4, 0, 0, 0, 0]);
    store.record_all([
        started(job, 0, 2, w),
        ended(job, 0, 2, Ok("42".into()), TaskState::Succeeded),
    ]);
    // Task 1 traps (final), task 2's worker is lost (requeued).
    store.record_all([
        started(job, 1, 3, w),
        ended(
            job,
            1,
            3,
            Err(Failure::new(FailureKind::Trap, "unreachable")),
            TaskState::Failed,
        ),
        started(job, 2, 4, w),
        Record::AttemptAbandoned {
            job,
            task: 2,
            attempt: 4,
            worker: w,
            failure: Failure::new(FailureKind::WorkerLost, "gone"),
            task_state: TaskState::Queued,
        },
        started(job, 3, 5, w),
    ]);
    store.flush().unwrap();
    let r = row(&store);
    assert_eq!(counters(&r), [1, 1, 1, 1, 0]);
    assert_eq!(r.fuel_used, 300);

    // Cancelling: the queued task is cancelled by the store, the running one
    // by the core's abandonment record.
    store.record_all([
        Record::JobStateChanged {
            job,
            state: JobState::Cancelled,
        },
        Record::AttemptAbandoned {
            job,
            task: 3,
            attempt: 5,
            worker: w,
            failure: Failure::new(FailureKind::Cancelled, "job cancelled"),
            task_state: TaskState::Cancelled,
        },
    ]);
    store.flush().unwrap();
    let r = row(&store);
    assert_eq!(counters(&r), [0, 0, 1, 1, 2]);
    assert_eq!(r.state, JobState::Cancelled);
    assert!(r.finished_at_ms.is_some());

    let results = store.results(job).unwrap().unwrap();
    assert_eq!(results[0].state, TaskState::Succeeded);
    assert_eq!(results[0].result.as_deref(), Some("42"));
    assert_eq!(
        (results[0].failure.as_ref(), results[0].attempts),
        (None, 2)
    );
    assert_eq!(results[1].state, TaskState::Failed);
    assert_eq!(
        results[1].failure,
        Some(Failure::new(FailureKind::Trap, "unreachable"))
    );
    assert_eq!(results[1].result, None);
    assert_eq!(
        (results[2].state, results[2].attempts),
        (TaskState::Cancelled, 1)
    );
    assert_eq!(
        results[2].failure.as_ref().map(|f| f.kind),
        Some(FailureKind::Cancelled)
    );
    assert_eq!(results[3].state, TaskState::Cancelled);

    // Worker counters: 1 success; Timeout, Trap and WorkerLost failed; the
    // cancellation is not held against it, nor kept in its failure history.
    let workers = store.workers().unwrap();
    assert_eq!(
        (workers[0].tasks_succeeded, workers[0].tasks_failed),
        (1, 3)
    );
    let path = store.inner.path.clone();
    let conn = rusqlite::Connection::open(path).unwrap();
    let failures: i64 = conn
        .query_row(
            "SELECT count(*) FROM worker_failures WHERE worker_id = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(failures, 3);
    let (out, ended_at): (Option<String>, Option<i64>) = conn
        .query_row(
            "SELECT stdout, ended_at_ms FROM attempts WHERE id = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(out.as_deref(), Some("hello"));
    assert!(ended_at.is_some());
}

#[test]
fn unfinished_jobs_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreman.db");
    let store = Store::open(&path).unwrap();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w1", "pc1")).unwrap();
    let done = store.create_job(new_job(args(1))).unwrap().id;
    let mut busy_job = new_job(args(3));
    busy_job.priority = 5;
    busy_job.scheduler = Scheduler::Priority;
    busy_job.not_before_ms = Some(1_900_000_000_000);
    let busy = store.create_job(busy_job).unwrap();
    let idle = store.create_job(new_job(args(2))).unwrap().id;
    store.record_all([
        started(done, 0, 1, w),
        ended(done, 0, 1, Ok("1".into()), TaskState::Succeeded),
        Record::JobStateChanged {
            job: done,
            state: JobState::Completed,
        },
        Record::JobStateChanged {
            job: busy.id,
            state: JobState::Running,
        },
        started(busy.id, 0, 2, w),
        ended(busy.id, 0, 2, Ok("0".into()), TaskState::Succeeded),
        started(busy.id, 1, 3, w),
    ]);
    store.flush().unwrap();
    // A crash: no orderly shutdown of the writer or the connections.
    std::mem::forget(store);

    let store = Store::open(&path).unwrap();
    let unfinished = store.unfinished_jobs().unwrap();
    assert_eq!(unfinished.len(), 2);
    let b = &unfinished[0];
    assert_eq!(b.spec, busy);
    assert_eq!(
        (b.state, b.spec.scheduler, b.spec.not_before_ms),
        (
            JobState::Running,
            Scheduler::Priority,
            Some(1_900_000_000_000)
        )
    );
    assert_eq!(b.args, args(3));
    assert_eq!(
        b.tasks,
        [
            (TaskState::Succeeded, 1),
            (TaskState::Running, 1),
            (TaskState::Queued, 0)
        ]
    );
    assert_eq!(unfinished[1].spec.id, idle);
    assert_eq!(unfinished[1].state, JobState::Queued);
    assert_eq!(store.next_attempt_id().unwrap(), 4);
    // A foreman that just started has no worker connected.
    assert!(!store.workers().unwrap()[0].online);
}

#[test]
fn flush_waits_for_queued_records_and_reports_rejections() {
    let (_dir, store) = open_temp();
    store.flush().unwrap();
    store.put_module(&MODULE, b"wasm").unwrap();
    let job = store.create_job(new_job(args(3))).unwrap().id;

    // Without a flush, the writer still commits within its batch window.
    store.record(started(job, 0, 1, 1));
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.job(job).unwrap().unwrap().running == 0 {
        assert!(Instant::now() < deadline, "record never committed");
        std::thread::sleep(Duration::from_millis(1));
    }

    // A record naming an unknown task is dropped; the rest of its batch is kept.
    store.record_all([
        started(job, 1, 2, 1),
        started(job, 99, 3, 1),
        started(99, 0, 4, 1),
        started(job, 2, 5, 1),
    ]);
    match store.flush() {
        Err(StoreError::Rejected { count: 2, first }) => assert!(first.contains("99"), "{first}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    store.flush().unwrap();
    assert_eq!(counters(&store.job(job).unwrap().unwrap()), [0, 3, 0, 0, 0]);

    // Many threads recording at once; flush from each.
    let handles: Vec<_> = (0..3u32)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let a = 100 + u64::from(t);
                store.record(ended(job, t, a, Ok("x".into()), TaskState::Succeeded));
                store.flush()
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    assert_eq!(counters(&store.job(job).unwrap().unwrap()), [0, 0, 3, 0, 0]);
}

#[test]
fn next_attempt_id_is_one_past_the_largest() {
    let (_dir, store) = open_temp();
    assert_eq!(store.next_attempt_id().unwrap(), 1);
    store.put_module(&MODULE, b"wasm").unwrap();
    let job = store.create_job(new_job(args(2))).unwrap().id;
    store.record_all([started(job, 0, 41, 1), started(job, 1, 7, 1)]);
    store.flush().unwrap();
    assert_eq!(store.next_attempt_id().unwrap(), 42);
}

#[test]
fn modules_are_stored_once() {
    let (dir, store) = open_temp();
    assert_eq!(store.module(&MODULE).unwrap(), None);
    store.put_module(&MODULE, b"first").unwrap();
    store.put_module(&MODULE, b"first").unwrap();
    store.put_module(&[8; 32], b"other").unwrap();
    assert_eq!(
        store.module(&MODULE).unwrap().as_deref(),
        Some(&b"first"[..])
    );
    let conn = rusqlite::Connection::open(dir.path().join("foreman.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM modules", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
}

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
fn jobs_page_newest_first_and_filter_by_state() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let ids: Vec<JobId> = (0..5)
        .map(|_| store.create_job(new_job(args(1))).unwrap().id)
        .collect();
    for &job in &ids[1..3] {
        store.record(Record::JobStateChanged {
            job,
            state: JobState::Running,
        });
    }
    store.flush().unwrap();
    let page = |skip, limit, state| -> Vec<JobId> {
        store
            .jobs(skip, limit, state)
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect()
    };
    assert_eq!(page(0, 2, None), [ids[4], ids[3]]);
    assert_eq!(page(2, 2, None), [ids[2], ids[1]]);
    assert_eq!(page(4, 2, None), [ids[0]]);
    assert_eq!(page(0, 0, None), Vec::<JobId>::new());
    assert_eq!(page(0, u64::MAX, None).len(), 5);
    assert_eq!(page(0, 10, Some(JobState::Running)), [ids[2], ids[1]]);
    assert_eq!(page(1, 10, Some(JobState::Queued)), [ids[3], ids[0]]);
    assert!(page(0, 10, Some(JobState::Failed)).is_empty());
}

/// The throughput figures; asserts only correctness. Run with `--nocapture`.
#[test]
fn hundred_thousand_tasks() {
    const N: u32 = 100_000;
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w", "pc")).unwrap();
    let args: Vec<String> = (0..N)
        .map(|i| format!("[{i}, \"some argument\"]"))
        .collect();

    let t = Instant::now();
    let job = store.create_job(new_job(args)).unwrap().id;
    let create = t.elapsed();
    println!(
        "create_job with {N} tasks: {create:?} ({:.0} tasks/s)",
        f64::from(N) / create.as_secs_f64()
    );

    let records: Vec<Record> = (0..N)
        .flat_map(|i| {
            let attempt = u64::from(i) + 1;
            [
                started(job, i, attempt, w),
                Record::AttemptEnded {
                    job,
                    task: i,
                    attempt,
                    worker: w,
                    report: Box::new(report(Ok(format!("{{\"n\": {i}}}")), 1000)),
                    task_state: TaskState::Succeeded,
                },
            ]
        })
        .collect();
    let t = Instant::now();
    // As the core would send them: in small groups, as reports come in.
    for chunk in records.chunks(64) {
        store.record_all(chunk.iter().cloned());
    }
    store.flush().unwrap();
    let apply = t.elapsed();
    println!(
        "{} records ({N} attempts started and ended): {apply:?} ({:.0} task outcomes/s, {:.0} records/s)",
        records.len(),
        f64::from(N) / apply.as_secs_f64(),
        records.len() as f64 / apply.as_secs_f64()
    );

    let t = Instant::now();
    let row = store.job(job).unwrap().unwrap();
    println!("job(): {:?}", t.elapsed());
    assert_eq!(counters(&row), [0, 0, N, 0, 0]);
    assert_eq!(row.fuel_used, u64::from(N) * 1000);
    let t = Instant::now();
    let results = store.results(job).unwrap().unwrap();
    println!("results() of {N} tasks: {:?}", t.elapsed());
    assert_eq!(results.len(), N as usize);
    assert!(results
        .iter()
        .enumerate()
        .all(|(i, r)| r.index as usize == i
            && r.state == TaskState::Succeeded
            && r.attempts == 1
            && r.result.as_deref() == Some(format!("{{\"n\": {i}}}").as_str())));
    assert_eq!(store.next_attempt_id().unwrap(), u64::from(N) + 1);
    assert_eq!(store.workers().unwrap()[0].tasks_succeeded, u64::from(N));
}

#[test]
fn a_finished_task_keeps_its_outcome_when_a_duplicate_attempt_ends_later() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let spec = store.create_job(new_job(args(1))).unwrap();
    store.record_all([
        started(spec.id, 0, 1, 1),
        started(spec.id, 0, 2, 1),
        ended(spec.id, 0, 1, Ok("42".into()), TaskState::Succeeded),
        Record::AttemptAbandoned {
            job: spec.id,
            task: 0,
            attempt: 2,
            worker: 1,
            failure: Failure::new(FailureKind::Cancelled, "a duplicate"),
            task_state: TaskState::Cancelled,
        },
    ]);
    store.flush().unwrap();
    let results = store.results(spec.id).unwrap().unwrap();
    assert_eq!(results[0].state, TaskState::Succeeded);
    assert_eq!(results[0].result.as_deref(), Some("42"));
    let row = store.job(spec.id).unwrap().unwrap();
    assert_eq!((row.succeeded, row.cancelled), (1, 0));
}

#[test]
fn a_version_1_database_is_migrated_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreman.db");
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch(schema::MIGRATIONS[0]).unwrap();
        tx.pragma_update(None, "user_version", 1).unwrap();
        tx.execute_batch(
            "INSERT INTO modules VALUES (x'0707070707070707070707070707070707070707070707070707070707070707', x'00', 1, 1);
             INSERT INTO jobs (module, state, priority, scheduler, fuel, memory_bytes, timeout_ms,
                 output_bytes, max_retries, total, queued, created_at_ms)
             VALUES (x'0707070707070707070707070707070707070707070707070707070707070707',
                 'queued', 3, 'round-robin', 10, 20, 30, 40, 1, 1, 1, 5);
             INSERT INTO tasks (job_id, idx, args) VALUES (1, 0, '[0]');
             INSERT INTO workers (name, hostname, os, arch, cores, memory_bytes, slots,
                 wasmtime_version, engine_hash, online, first_seen_ms, last_seen_ms)
             VALUES ('w', 'pc', 'linux', 'x86_64', 4, 8, 4, '48', 'e', 1, 1, 2);
             INSERT INTO worker_failures VALUES (1, 1, 1, 0, 'Trap', 'boom', 7);
             INSERT INTO worker_failures VALUES (2, 1, 1, 0, 'Cancelled', 'job cancelled', 8);
             INSERT INTO attempts (id, job_id, idx, worker_id, started_at_ms, ended_at_ms,
                 outcome_kind, run_us)
             VALUES (1, 1, 0, 1, 1, 2, 'Trap', 5), (2, 1, 0, 1, 1, 2, NULL, 1500),
                 (3, 1, 0, 1, 1, 2, NULL, 3), (4, 1, 0, 1, 1, 2, NULL, 1000),
                 (5, 1, 0, 1, 1, 2, NULL, 200000000), (6, 1, 0, 1, 1, 2, NULL, -1),
                 (7, 1, 0, 1, 1, NULL, NULL, NULL);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let job = store.job(1).unwrap().unwrap();
    assert_eq!(
        (job.scheduler, job.not_before_ms, job.priority),
        (Scheduler::RoundRobin, None, 3)
    );
    assert_eq!(
        store.unfinished_jobs().unwrap()[0].spec.scheduler,
        Scheduler::RoundRobin
    );
    let w = store.worker(1).unwrap().unwrap();
    assert_eq!(
        (
            w.info.name.as_str(),
            w.info.cpu_model.as_str(),
            w.info.cpu_limit_percent
        ),
        ("w", "", 100)
    );
    assert!(!w.online && !w.draining);
    assert_eq!((w.cooldown_until_ms, w.load), (None, Load::default()));
    // Cancellations were never the worker's failures.
    let failures = store.failures(Some(1), None, 0, 10).unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].kind, FailureKind::Trap);
    // The run-time histogram is filled from the attempts so far.
    let grid = store.run_time_histogram().unwrap();
    let scan = store.read(|conn| views::run_time_histogram_scan(conn, None));
    assert_eq!(grid, scan.unwrap());
    assert_eq!(grid.counts[0], 2);
    assert_eq!(grid.counts[1], 1);
    assert_eq!(grid.counts[18], 2);
    let job = store.read(|conn| views::run_time_histogram(conn, Some(1)));
    assert_eq!(job.unwrap(), grid);
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::SCHEMA_VERSION);
}

#[test]
fn create_job_keeps_scheduler_and_not_before() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let mut job = new_job(args(2));
    job.scheduler = Scheduler::LeastLoaded;
    job.not_before_ms = Some(u64::MAX);
    let spec = store.create_job(job).unwrap();
    assert_eq!(
        (spec.scheduler, spec.not_before_ms),
        (Scheduler::LeastLoaded, Some(u64::MAX))
    );
    let row = store.job(spec.id).unwrap().unwrap();
    assert_eq!(
        (row.scheduler, row.not_before_ms),
        (Scheduler::LeastLoaded, Some(u64::MAX))
    );
    let json = serde_json::to_value(&row).unwrap();
    assert_eq!(json["scheduler"], "least-loaded");
    assert_eq!(json["not_before_ms"], u64::MAX);
    assert_eq!(store.unfinished_jobs().unwrap()[0].spec, spec);
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
    assert_eq!(store.upsert_worker(&WorkerRow::joining(&again)).unwrap(), w);
    let row = store.worker(w).unwrap().unwrap();
    assert!(!row.draining);
    assert_eq!(
        (row.load, row.info.cpu_limit_percent),
        (Load::default(), 80)
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

/// V2 fills `run_time_buckets` with SQL of its own: its bounds must be
/// `LATENCY_BUCKETS_MS`, and its last bucket the unbounded one.
#[test]
fn the_migration_buckets_run_times_as_the_writer_does() {
    let v2 = schema::MIGRATIONS[1];
    for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
        let when = format!("WHEN run_us <= {} THEN {i}\n", le * 1000);
        assert!(v2.contains(&when), "{when}");
    }
    let last = LATENCY_BUCKETS_MS.len();
    assert!(v2.contains(&format!("WHEN run_us < 0 THEN {last}\n")));
    assert!(v2.contains(&format!("ELSE {last} END")));
    assert_eq!(views::latency_bucket(u64::MAX), last);
}
