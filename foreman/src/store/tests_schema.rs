//! Store tests: the schema, reopening, and migrations from older versions.

use wasmgrid_protocol::FailureKind;

use super::tests::*;
use super::*;
use crate::model::{JobState, Scheduler};
use wasmgrid_protocol::wire::{Load, SlotPriority};

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
            w.info.cpu_limit_percent,
            w.info.priority,
        ),
        ("w", "", 100, SlotPriority::Normal)
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

#[test]
fn client_tokens_from_before_roles_are_admins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreman.db");
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for migration in &schema::MIGRATIONS[..3] {
            tx.execute_batch(migration).unwrap();
        }
        tx.pragma_update(None, "user_version", 3).unwrap();
        tx.execute_batch(
            "INSERT INTO tokens (kind, name, hash, created_at_ms)
             VALUES ('client', 'old', zeroblob(32), 1), ('worker', 'join', zeroblob(32), 1);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let roles: Vec<_> = store
        .tokens()
        .unwrap()
        .iter()
        .map(|t| (t.name.clone(), t.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("old".to_owned(), Some(TokenRole::Admin)),
            ("join".to_owned(), None)
        ]
    );
}
