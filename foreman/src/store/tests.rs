//! Store tests: jobs, tasks and attempts as records reach the writer.

use std::time::{Duration, Instant};

use wasmgrid_protocol::{
    CacheSource, CapturedOutput, Failure, FailureKind, TaskReport, TaskTimings,
};

use super::*;
use crate::model::{JobState, Record, Scheduler, TaskState};
use wasmgrid_protocol::wire::WorkerInfo;

pub(super) const MODULE: ModuleHash = [7; 32];

pub(super) fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("foreman.db")).unwrap();
    (dir, store)
}

/// A store with the test module, worker "w1" and a job of `tasks` tasks.
fn store_with_job(tasks: usize) -> (tempfile::TempDir, Store, WorkerId, JobId) {
    let (dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w1", "pc1")).unwrap();
    let job = store.create_job(new_job(args(tasks))).unwrap().id;
    (dir, store, w, job)
}

pub(super) fn new_job(args: Vec<String>) -> NewJob {
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

pub(super) fn args(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("[{i}]")).collect()
}

pub(super) fn report(outcome: Result<String, Failure>, fuel: u64) -> TaskReport {
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

pub(super) fn started(job: JobId, task: TaskIndex, attempt: u64, worker: WorkerId) -> Record {
    Record::AttemptStarted {
        job,
        task,
        attempt,
        worker,
        at_ms: 0,
    }
}

pub(super) fn ended(
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

pub(super) fn counters(row: &JobRow) -> [u32; 5] {
    [
        row.queued,
        row.running,
        row.succeeded,
        row.failed,
        row.cancelled,
    ]
}

pub(super) fn info(name: &str, host: &str) -> WorkerInfo {
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
        priority: Default::default(),
    }
}

pub(super) fn worker(name: &str, host: &str) -> WorkerRow {
    WorkerRow::joining(&info(name, host))
}

#[test]
fn store_is_a_shareable_handle() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Store>();
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
fn attempts_are_committed_soon_without_a_flush() {
    let (_dir, store, w, job) = store_with_job(3);
    // Starts and ends wait a little for company (more of the job's tasks)
    // before they commit, but not for ever; each keeps the time it was queued.
    let before = super::schema::now_ms();
    store.record_all([
        Record::JobStateChanged {
            job,
            state: JobState::Running,
        },
        started(job, 0, 1, w),
    ]);
    store.record(ended(job, 0, 1, Ok("5".into()), TaskState::Succeeded));
    let after = super::schema::now_ms();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.job(job).unwrap().unwrap().succeeded != 1 {
        assert!(Instant::now() < deadline, "the attempt was never committed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let started_at = store.job(job).unwrap().unwrap().started_at_ms.unwrap() as i64;
    assert!(
        (before..=after).contains(&started_at),
        "{before} <= {started_at} <= {after}"
    );
    // A start and an end that arrive together commit together.
    store.record(started(job, 1, 2, w));
    store.record(ended(job, 1, 2, Ok("7".into()), TaskState::Succeeded));
    store.flush().unwrap();
    let results = store.results(job).unwrap().unwrap();
    assert_eq!(results[1].result.as_deref(), Some("7"));
}

#[test]
fn a_jobs_end_is_announced_with_its_tasks_results_committed() {
    let (_dir, store, w, job) = store_with_job(2);
    let mut events = store.job_events();
    // The ends are lazy; the job's end is not, and it commits them with it.
    for task in 0..2 {
        store.record(started(job, task, u64::from(task) + 1, w));
        store.record(ended(
            job,
            task,
            u64::from(task) + 1,
            Ok(format!("{task}")),
            TaskState::Succeeded,
        ));
    }
    store.record(Record::JobStateChanged {
        job,
        state: JobState::Completed,
    });
    assert_eq!(events.blocking_recv().unwrap(), (job, JobState::Completed));
    let results = store.results(job).unwrap().unwrap();
    assert_eq!(results[0].result.as_deref(), Some("0"));
    assert_eq!(results[1].result.as_deref(), Some("1"));
}

#[test]
fn a_job_insert_waits_for_its_tasks_records_only_when_asked() {
    let change = |commit| {
        writer::Change::NewJob(Box::new(writer::NewJobRow {
            id: 1,
            job: new_job(args(1)),
            token: None,
            created_at_ms: 0,
            stored: None,
            commit,
        }))
    };
    assert!(change(InsertCommit::WithItsTasks).is_lazy());
    assert!(!change(InsertCommit::AtOnce).is_lazy());
}

#[tokio::test]
async fn an_inserted_job_is_handed_out_before_it_commits_and_announced_once_stored() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let mut changes = store.changes();
    let (spec, pending) = store
        .insert_job(new_job(args(2)), None, InsertCommit::WithItsTasks)
        .unwrap();
    assert_eq!(spec.task_count, 2);
    store.job_stored(pending).await.unwrap();
    assert!(changes.recv().await.unwrap().job_states.contains(&spec.id));
    assert_eq!(store.job(spec.id).unwrap().unwrap().total, 2);

    // A refusal comes back from the first step, and nothing is stored.
    let mut unknown = new_job(args(1));
    unknown.module = [9; 32];
    assert!(matches!(
        store.insert_job(unknown, None, InsertCommit::WithItsTasks),
        Err(StoreError::UnknownModule(_))
    ));
    let quota = Some((7, 0));
    assert!(matches!(
        store.insert_job(new_job(args(1)), quota, InsertCommit::WithItsTasks),
        Err(StoreError::TooManyUnfinishedJobs { .. })
    ));
    assert_eq!(store.jobs(0, 10, None).unwrap().len(), 1);
}

#[tokio::test]
async fn a_tokens_quota_counts_its_jobs_not_yet_stored() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let quota = Some((7, 1));
    // The first job's insert may not have committed when the second is checked.
    let (first, pending) = store
        .insert_job(new_job(args(1)), quota, InsertCommit::WithItsTasks)
        .unwrap();
    assert!(matches!(
        store.insert_job(new_job(args(1)), quota, InsertCommit::WithItsTasks),
        Err(StoreError::TooManyUnfinishedJobs { unfinished: 1, .. })
    ));
    store.job_stored(pending).await.unwrap();
    let second = store.create_job(new_job(args(1))).unwrap();
    assert_eq!(second.id, first.id + 1, "ids are handed out in order");
}

#[tokio::test]
async fn a_job_stops_counting_against_its_token_once_its_end_commits() {
    let (dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let quota = Some((7, 2));
    let (first, pending) = store
        .insert_job(new_job(args(1)), quota, InsertCommit::WithItsTasks)
        .unwrap();
    store.job_stored(pending).await.unwrap();
    let second = store.create_job_within(new_job(args(1)), quota).unwrap();
    assert!(matches!(
        store.insert_job(new_job(args(1)), quota, InsertCommit::WithItsTasks),
        Err(StoreError::TooManyUnfinishedJobs { unfinished: 2, .. })
    ));
    store.record(Record::JobStateChanged {
        job: first.id,
        state: JobState::Cancelled,
    });
    store.flush().unwrap();
    assert_eq!(store.inner.admission.unfinished(7), 1);
    let (third, pending) = store
        .insert_job(new_job(args(1)), quota, InsertCommit::WithItsTasks)
        .unwrap();
    store.job_stored(pending).await.unwrap();

    // A foreman that starts again counts the token's unfinished jobs from the database.
    let path = store.inner.path.clone();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.inner.admission.unfinished(7), 2);
    let next = store.create_job(new_job(args(1))).unwrap();
    assert!(next.id > third.id.max(second.id));
    drop(dir);
}
