//! The schema, its migrations, connection settings, and the mapping between
//! the model's enums and their text in the database.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use wasmgrid_protocol::{CacheSource, FailureKind};

use super::StoreError;
use crate::model::{JobState, Scheduler, TaskState};

/// How long a connection waits for a lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `MIGRATIONS[n]` takes the schema from version `n` to `n + 1`
/// (`PRAGMA user_version`). Append only; never edit a shipped migration.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

/// The schema version this code reads and writes.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Notes on the choices:
/// - Enum values are stored as their `as_str()` text, so the file reads well
///   in the `sqlite3` shell; they are short and cost little.
/// - u64 values (limits, fuel, attempt ids, sizes) are stored bit for bit as
///   SQLite's signed 64-bit integers; see `to_sql`/`from_sql`.
/// - `jobs` carries one counter per task state plus the fuel sum, kept by the
///   writer in the same transaction as the task changes, so a job's progress
///   is one row read. `AUTOINCREMENT` keeps ids from ever being reused.
/// - `tasks` is keyed by (job, index) `WITHOUT ROWID`: rows are small, always
///   looked up by that key, and a job's tasks sit together in key order.
/// - `attempts.id` is the core's `AttemptId` (the rowid, so `MAX(id)` is
///   instant); `ended_at_ms` is NULL while an attempt runs and `outcome_kind`
///   is NULL for a success.
/// - `worker_failures` is keyed by attempt (one failure per attempt at most).
/// - Worker and attempt references carry no foreign keys: a batch must never
///   fail on them, and the writer checks the task itself.
const V1: &str = "
CREATE TABLE modules (
    hash          BLOB PRIMARY KEY NOT NULL CHECK (length(hash) = 32),
    wasm          BLOB NOT NULL,
    size          INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    module         BLOB NOT NULL REFERENCES modules(hash),
    state          TEXT NOT NULL,
    priority       INTEGER NOT NULL,
    scheduler      TEXT NOT NULL,
    fuel           INTEGER NOT NULL,
    memory_bytes   INTEGER NOT NULL,
    timeout_ms     INTEGER NOT NULL,
    output_bytes   INTEGER NOT NULL,
    max_retries    INTEGER NOT NULL,
    total          INTEGER NOT NULL,
    queued         INTEGER NOT NULL,
    running        INTEGER NOT NULL DEFAULT 0,
    succeeded      INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    cancelled      INTEGER NOT NULL DEFAULT 0,
    fuel_used      INTEGER NOT NULL DEFAULT 0,
    created_at_ms  INTEGER NOT NULL,
    started_at_ms  INTEGER,
    finished_at_ms INTEGER
);
CREATE INDEX jobs_by_state ON jobs (state, id);

CREATE TABLE tasks (
    job_id          INTEGER NOT NULL REFERENCES jobs(id),
    idx             INTEGER NOT NULL,
    args            TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'queued',
    attempts        INTEGER NOT NULL DEFAULT 0,
    result          TEXT,
    failure_kind    TEXT,
    failure_message TEXT,
    fuel_used       INTEGER NOT NULL DEFAULT 0,
    worker_id       INTEGER,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;

CREATE TABLE attempts (
    id               INTEGER PRIMARY KEY,
    job_id           INTEGER NOT NULL,
    idx              INTEGER NOT NULL,
    worker_id        INTEGER NOT NULL,
    started_at_ms    INTEGER NOT NULL,
    ended_at_ms      INTEGER,
    outcome_kind     TEXT,
    message          TEXT,
    fuel_used        INTEGER,
    cache            TEXT,
    load_us          INTEGER,
    instantiate_us   INTEGER,
    run_us           INTEGER,
    stdout           TEXT,
    stdout_truncated INTEGER,
    stderr           TEXT,
    stderr_truncated INTEGER
);
CREATE INDEX attempts_by_task ON attempts (job_id, idx);

CREATE TABLE workers (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT NOT NULL,
    hostname         TEXT NOT NULL,
    os               TEXT NOT NULL,
    arch             TEXT NOT NULL,
    cores            INTEGER NOT NULL,
    memory_bytes     INTEGER NOT NULL,
    slots            INTEGER NOT NULL,
    wasmtime_version TEXT NOT NULL,
    engine_hash      TEXT NOT NULL,
    online           INTEGER NOT NULL,
    first_seen_ms    INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL,
    tasks_succeeded  INTEGER NOT NULL DEFAULT 0,
    tasks_failed     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (name, hostname)
);

CREATE TABLE worker_failures (
    attempt   INTEGER PRIMARY KEY,
    worker_id INTEGER NOT NULL,
    job_id    INTEGER NOT NULL,
    idx       INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    message   TEXT NOT NULL,
    at_ms     INTEGER NOT NULL
);
CREATE INDEX worker_failures_by_worker ON worker_failures (worker_id, at_ms);
";

/// Protocol 2: a job's earliest start; what a worker says of its CPU at
/// join and of its load in heartbeats; draining and cool-down. Cancellations
/// are no worker's failure, so they leave the failure history.
/// - `running` and the load columns are the last heartbeat's (0 before one).
/// - `cooldown_until_ms` is the latest cool-down's end; `cooldowns` counts them.
/// - `last_heartbeat_ms` is NULL until a worker's first heartbeat since it
///   joined; `workers.fuel_used` sums its attempts' fuel.
/// - The dashboard's indexes: attempts by end time (tasks per second), and
///   failures by time and by kind (the grid-wide failure list).
/// - `run_time_buckets` is the run-time histogram of successful attempts
///   (`count` and `sum_us` per bucket of `views::LATENCY_BUCKETS_MS`, bucket
///   18 unbounded), per job and, under `job_id` 0 (no job has it), for the
///   whole grid; the writer adds to it once per batch, so reading it costs
///   the same whatever the history. Filled here from the attempts so far.
const V2: &str = "
ALTER TABLE jobs ADD COLUMN not_before_ms INTEGER;
ALTER TABLE jobs ADD COLUMN retry_deterministic INTEGER NOT NULL DEFAULT 0;

ALTER TABLE workers ADD COLUMN cpu_model TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN benchmark_fuel_per_sec INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN cpu_limit_percent INTEGER NOT NULL DEFAULT 100;
ALTER TABLE workers ADD COLUMN cpu_permille INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN memory_used_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN worker_rss_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN running INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN cooldown_until_ms INTEGER;
ALTER TABLE workers ADD COLUMN cooldowns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN last_heartbeat_ms INTEGER;
ALTER TABLE workers ADD COLUMN fuel_used INTEGER NOT NULL DEFAULT 0;

CREATE INDEX attempts_by_end ON attempts (ended_at_ms);
CREATE INDEX worker_failures_by_time ON worker_failures (at_ms);
CREATE INDEX worker_failures_by_kind ON worker_failures (kind, at_ms);

DELETE FROM worker_failures WHERE kind = 'Cancelled';

CREATE TABLE run_time_buckets (
    job_id INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    count  INTEGER NOT NULL,
    sum_us INTEGER NOT NULL,
    PRIMARY KEY (job_id, bucket)
) WITHOUT ROWID;
INSERT INTO run_time_buckets (job_id, bucket, count, sum_us)
    SELECT job_id,
           CASE WHEN run_us < 0 THEN 18
               WHEN run_us <= 1000 THEN 0
               WHEN run_us <= 2000 THEN 1
               WHEN run_us <= 4000 THEN 2
               WHEN run_us <= 8000 THEN 3
               WHEN run_us <= 16000 THEN 4
               WHEN run_us <= 32000 THEN 5
               WHEN run_us <= 64000 THEN 6
               WHEN run_us <= 128000 THEN 7
               WHEN run_us <= 256000 THEN 8
               WHEN run_us <= 512000 THEN 9
               WHEN run_us <= 1024000 THEN 10
               WHEN run_us <= 2048000 THEN 11
               WHEN run_us <= 4096000 THEN 12
               WHEN run_us <= 8192000 THEN 13
               WHEN run_us <= 16384000 THEN 14
               WHEN run_us <= 32768000 THEN 15
               WHEN run_us <= 65536000 THEN 16
               WHEN run_us <= 131072000 THEN 17
               ELSE 18 END AS b,
           count(*), sum(run_us)
    FROM attempts
    WHERE ended_at_ms IS NOT NULL AND outcome_kind IS NULL AND run_us IS NOT NULL
    GROUP BY job_id, b;
INSERT INTO run_time_buckets (job_id, bucket, count, sum_us)
    SELECT 0, bucket, sum(count), sum(sum_us) FROM run_time_buckets GROUP BY bucket;
";

/// Security: join (`worker`) and REST (`client`) tokens, and who used which.
/// - `hash` is the sha256 of the token's secret; the secret itself is never stored.
/// - `expires_at_ms`, `revoked_at_ms` are NULL while they do not apply;
///   `last_used_ms` is coarse (updated at most every few seconds per token).
/// - `workers.token_id` is the token a worker last joined with;
///   `jobs.token_id` the client token that submitted the job (NULL before v3).
/// - `jobs.result_bytes`: each job's result limit (jobs from before get the
///   1 MiB default). Violations not tied to an attempt are kept in
///   `worker_failures` under negative keys, below every attempt id.
const V3: &str = "
CREATE TABLE tokens (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL CHECK (kind IN ('worker', 'client')),
    name          TEXT NOT NULL,
    hash          BLOB NOT NULL CHECK (length(hash) = 32),
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER,
    last_used_ms  INTEGER
);
ALTER TABLE workers ADD COLUMN token_id INTEGER;
ALTER TABLE jobs ADD COLUMN token_id INTEGER;
ALTER TABLE jobs ADD COLUMN result_bytes INTEGER NOT NULL DEFAULT 1048576;
";

/// - `workers.priority`: the priority its tasks run at (`worker --priority`), as it said at join.
/// - `tokens.role`: what a client token may do (`admin`, `user`, `read`);
///   tokens made before roles were admins. Unused for join tokens.
const V4: &str = "
ALTER TABLE workers ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal';
ALTER TABLE tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
";

/// - `jobs_by_module`: finding the modules no job names, and checking the
///   foreign key when one is deleted, without reading every job.
const V5: &str = "
CREATE INDEX jobs_by_module ON jobs (module);
";

/// Opens the writing connection: WAL, settings, schema up to date, workers
/// marked offline.
pub(super) fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "SQLite refused WAL mode");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 64 MiB of page cache: a big job's tasks stay in memory while it runs.
    conn.pragma_update(None, "cache_size", -65_536)?;
    conn.set_prepared_statement_cache_capacity(32);
    migrate(&mut conn)?;
    // Nothing runs on a worker that is not connected; a drain ends with the connection.
    conn.execute(
        "UPDATE workers SET online = 0, running = 0, draining = 0
         WHERE online != 0 OR running != 0 OR draining != 0",
        [],
    )?;
    Ok(conn)
}

/// Opens a read connection (the writer has already created and migrated the file).
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "query_only", true)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let to = from as i64 + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", to)?;
        tx.commit()?;
        tracing::info!(from, to, "store schema migrated");
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A u64 as SQLite's i64, bit for bit (round-trips through [`from_sql`]).
pub(super) fn to_sql(v: u64) -> i64 {
    v as i64
}

pub(super) fn from_sql(v: i64) -> u64 {
    v as u64
}

/// A count or index read back as u32; anything else means a damaged file.
pub(super) fn u32_from_sql(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} is not a u32")))
}

pub(super) fn scheduler(s: &str) -> Result<Scheduler, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("scheduler {s:?}")))
}

pub(super) fn task_state(s: &str) -> Result<TaskState, StoreError> {
    Ok(match s {
        "queued" => TaskState::Queued,
        "running" => TaskState::Running,
        "succeeded" => TaskState::Succeeded,
        "failed" => TaskState::Failed,
        "cancelled" => TaskState::Cancelled,
        other => return Err(StoreError::Corrupt(format!("task state {other:?}"))),
    })
}

pub(super) fn job_state(s: &str) -> Result<JobState, StoreError> {
    Ok(match s {
        "queued" => JobState::Queued,
        "running" => JobState::Running,
        "completed" => JobState::Completed,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        other => return Err(StoreError::Corrupt(format!("job state {other:?}"))),
    })
}

pub(super) fn failure_kind(s: &str) -> Result<FailureKind, StoreError> {
    FailureKind::ALL
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| StoreError::Corrupt(format!("failure kind {s:?}")))
}

pub(super) fn cache_source(c: CacheSource) -> &'static str {
    match c {
        CacheSource::Memory => "memory",
        CacheSource::Disk => "disk",
        CacheSource::Compiled => "compiled",
    }
}
