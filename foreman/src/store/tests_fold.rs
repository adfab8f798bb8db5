//! A batch in which attempts start and end is stored exactly as the same
//! records committed one at a time (where nothing is folded).

use rusqlite::types::ValueRef;
use rusqlite::Connection;
use wasmgrid_protocol::{Failure, FailureKind};

use super::tests::{args, ended, new_job, open_temp, started, worker, MODULE};
use super::*;
use crate::model::{JobState, Record, TaskState};

/// Two jobs' records: successes, a retry, a lost worker, a late report that
/// finishes a task while its other attempt is cancelled, and a cancelled job.
fn script(a: JobId, b: JobId, w: WorkerId) -> Vec<Record> {
    let running = |job| Record::JobStateChanged {
        job,
        state: JobState::Running,
    };
    let abandoned = |job, task, attempt, kind, why: &str, task_state| Record::AttemptAbandoned {
        job,
        task,
        attempt,
        worker: w,
        failure: Failure::new(kind, why),
        task_state,
    };
    let timeout = || Err(Failure::new(FailureKind::Timeout, "60 s"));
    vec![
        running(a),
        running(b),
        started(a, 0, 1, w),
        ended(a, 0, 1, Ok("10".into()), TaskState::Succeeded),
        started(a, 1, 2, w),
        ended(a, 1, 2, timeout(), TaskState::Queued),
        started(a, 1, 3, w),
        ended(a, 1, 3, Ok("11".into()), TaskState::Succeeded),
        started(a, 2, 4, w),
        abandoned(a, 2, 4, FailureKind::WorkerLost, "gone", TaskState::Queued),
        started(a, 2, 5, w),
        started(a, 3, 6, w),
        abandoned(a, 3, 6, FailureKind::WorkerLost, "gone", TaskState::Queued),
        started(a, 3, 7, w),
        // Attempt 6 reports late and wins; 7 is cancelled.
        ended(a, 3, 6, Ok("13".into()), TaskState::Succeeded),
        abandoned(
            a,
            3,
            7,
            FailureKind::Cancelled,
            "won elsewhere",
            TaskState::Succeeded,
        ),
        started(b, 0, 8, w),
        started(b, 1, 9, w),
        ended(b, 0, 8, Ok("20".into()), TaskState::Succeeded),
        Record::JobStateChanged {
            job: b,
            state: JobState::Cancelled,
        },
        abandoned(
            b,
            1,
            9,
            FailureKind::Cancelled,
            "job cancelled",
            TaskState::Cancelled,
        ),
    ]
}

/// Every stored fact but the clocks, as text.
fn dump(path: &std::path::Path) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut out = Vec::new();
    for sql in [
        "SELECT id, state, total, queued, running, succeeded, failed, cancelled, fuel_used
         FROM jobs ORDER BY id",
        "SELECT job_id, idx, state, attempts, worker_id, fuel_used, result, failure_kind,
             failure_message FROM tasks ORDER BY job_id, idx",
        "SELECT id, job_id, idx, worker_id, ended_at_ms IS NULL, outcome_kind, message,
             fuel_used, cache, load_us, instantiate_us, run_us, stdout, stdout_truncated,
             stderr, stderr_truncated FROM attempts ORDER BY id",
        "SELECT attempt, worker_id, job_id, idx, kind, message FROM worker_failures
         ORDER BY attempt",
        "SELECT id, tasks_succeeded, tasks_failed, fuel_used FROM workers ORDER BY id",
        "SELECT job_id, bucket, count, sum_us FROM run_time_buckets ORDER BY job_id, bucket",
    ] {
        let mut stmt = conn.prepare(sql).unwrap();
        let columns = stmt.column_count();
        let rows = stmt
            .query_map([], |row| {
                let cells: Vec<String> = (0..columns)
                    .map(|i| match row.get_ref(i).unwrap() {
                        ValueRef::Text(text) => format!("{:?}", String::from_utf8_lossy(text)),
                        other => format!("{other:?}"),
                    })
                    .collect();
                Ok(cells.join("|"))
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

fn store_with_two_jobs() -> (tempfile::TempDir, Store, JobId, JobId, WorkerId) {
    let (dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w1", "pc1")).unwrap();
    let a = store.create_job(new_job(args(4))).unwrap().id;
    let b = store.create_job(new_job(args(2))).unwrap().id;
    (dir, store, a, b, w)
}

#[test]
fn attempts_folded_in_one_batch_are_stored_as_if_committed_one_by_one() {
    let (one_dir, one_by_one, a, b, w) = store_with_two_jobs();
    for record in script(a, b, w) {
        one_by_one.record(record);
        one_by_one.flush().unwrap();
    }
    let (batch_dir, batched, a2, b2, w2) = store_with_two_jobs();
    assert_eq!((a, b, w), (a2, b2, w2));
    batched.record_all(script(a, b, w));
    batched.flush().unwrap();

    let expected = dump(&one_dir.path().join("foreman.db"));
    assert!(
        expected.iter().any(|row| row.contains("\"13\"")),
        "{expected:#?}"
    );
    assert_eq!(dump(&batch_dir.path().join("foreman.db")), expected);
}
