//! The foreman's durable state in one SQLite file.
//!
//! All writes go through one writer thread that owns the only writing
//! connection: [`Store::record`] (and the frequent worker facts,
//! [`Store::worker_heartbeat`], [`Store::set_worker_draining`]) queues a
//! change and returns at once, and the
//! writer commits queued changes in batches (one transaction per ~5 ms or
//! ~2,000 records), so the core never waits for the disk. Operations that
//! must be durable when they return (`create_job`, `put_module`) run on the
//! same thread, in order with the queued records, and are committed with
//! `synchronous=FULL`. Reads use a small pool of separate connections; with
//! WAL they never block the writer and the writer never blocks them. Reads see
//! committed data only: call [`Store::flush`] first to read your own records.

mod admission;
mod modules;
mod queries;
mod retention;
mod schema;
mod tokens;
mod views;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fold;
#[cfg(test)]
mod tests_retention;
#[cfg(test)]
mod tests_schema;
#[cfg(test)]
mod tests_workers;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use serde::Serialize;
use wasmgrid_protocol::wire::{Load, ModuleHash, WorkerInfo};
use wasmgrid_protocol::{Failure, FailureKind, TaskLimits};

use crate::model::{JobId, JobSpec, JobState, Record, Scheduler, TaskIndex, TaskState, WorkerId};

use admission::Admission;
use modules::ModuleUses;
use writer::{Change, Command, Inbox};

pub use modules::MODULE_GRACE;
pub use retention::Deletion;
pub use tokens::{TokenKind, TokenRole, TokenRow};
pub use views::{
    FailureRow, FailureStats, JobSummary, LatencyBucket, RunTimeHistogram, Stats, TaskPage,
    TaskRow, TaskTimingsRow, WorkerFailureCount, WorkerShare, LATENCY_BUCKETS_MS,
};

/// Largest page [`Store::jobs`] returns.
pub const MAX_PAGE: u64 = 1000;

/// Idle read connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("module {0} is not stored")]
    UnknownModule(String),
    #[error("job {0} does not exist")]
    UnknownJob(JobId),
    #[error("task {task} of job {job} does not exist")]
    UnknownTask { job: JobId, task: TaskIndex },
    #[error("worker {0} does not exist")]
    UnknownWorker(WorkerId),
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("client token {token} already has {unfinished} queued or running jobs, this foreman's cap (foreman serve --max-queued-jobs-per-token {cap})")]
    TooManyUnfinishedJobs {
        token: u64,
        unfinished: u64,
        cap: u64,
    },
    #[error("database schema version {found} is newer than this foreman supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("unexpected value in the database: {0}")]
    Corrupt(String),
    /// Records that could not be applied (they named an unknown job, task or
    /// attempt) were dropped; the rest of their batch was committed.
    #[error("{count} record(s) rejected since the last flush; first: {first}")]
    Rejected { count: u64, first: String },
    /// Committing queued records failed; they are kept and retried.
    #[error("writing queued records failed: {0}")]
    WriteFailed(String),
    #[error("the store's writer thread has stopped")]
    Closed,
}

/// A job as submitted, before it has an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub module: ModuleHash,
    pub limits: TaskLimits,
    pub max_retries: u32,
    pub priority: i32,
    pub scheduler: Scheduler,
    /// The job stays queued until this time (unix milliseconds).
    pub not_before_ms: Option<u64>,
    pub retry_deterministic: bool,
    /// One JSON text per task, in task order.
    pub args: Vec<String>,
}

/// A job as the API shows it; the counters are kept by the writer, so
/// reading one costs one row whatever the job's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobRow {
    pub id: JobId,
    /// The module's sha256, lower-case hex.
    pub module: String,
    pub state: JobState,
    pub priority: i32,
    pub scheduler: Scheduler,
    /// The job stays queued until this time (unix milliseconds).
    pub not_before_ms: Option<u64>,
    pub retry_deterministic: bool,
    /// `{fuel, memory_bytes, timeout_ms, output_bytes}`.
    pub limits: TaskLimits,
    pub max_retries: u32,
    pub total: u32,
    pub queued: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub cancelled: u32,
    /// Fuel used by every attempt of every task, retries included.
    pub fuel_used: u64,
    pub created_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// The client token that submitted it (none before tokens existed).
    pub token_id: Option<u64>,
}

/// One task's outcome. `result` and `failure` are set only once the task's
/// state is final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskOutcomeRow {
    pub index: TaskIndex,
    pub state: TaskState,
    /// The task's result, as JSON text.
    pub result: Option<String>,
    pub failure: Option<Failure>,
    pub attempts: u32,
}

/// What restart recovery needs to rebuild a job in the core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnfinishedJob {
    pub spec: JobSpec,
    /// `Queued` or `Running`.
    pub state: JobState,
    /// One JSON text per task, in task order.
    pub args: Vec<String>,
    /// Per task, in task order: its state and the attempts started so far.
    /// A task still `Running` had an attempt in flight when the foreman stopped.
    pub tasks: Vec<(TaskState, u32)>,
}

/// Failures within this window count as a worker's `recent_failures`.
pub const RECENT_FAILURES_WINDOW_MS: u64 = 10 * 60 * 1000;

/// Largest page [`Store::failures`] returns.
pub const MAX_FAILURES_PAGE: u64 = 1000;

/// A worker as the API shows it: what it said at join, flattened, then what
/// the foreman knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WorkerRow {
    /// 0 for a worker not yet registered.
    pub id: WorkerId,
    /// Flattened: name, hostname, os, arch, cores, memory_bytes, slots,
    /// wasmtime_version, engine_hash, cpu_model, benchmark_fuel_per_sec, cpu_limit_percent,
    /// priority.
    #[serde(flatten)]
    pub info: WorkerInfo,
    pub online: bool,
    /// Asked to leave (`POST /api/workers/{id}/drain`); cleared when it joins again.
    pub draining: bool,
    pub last_seen_ms: u64,
    /// As of the last heartbeat (all 0 before the first); flattened:
    /// cpu_permille, memory_used_bytes, worker_rss_bytes, running.
    #[serde(flatten)]
    pub load: Load,
    /// Gets no tasks until then (unix milliseconds), after too many failures.
    pub cooldown_until_ms: Option<u64>,
    /// Cool-downs so far.
    pub cooldowns: u64,
    /// Failures in the last [`RECENT_FAILURES_WINDOW_MS`].
    pub recent_failures: u32,
    /// Attempts this worker ended with a result.
    pub tasks_succeeded: u64,
    /// Attempts this worker ended with a failure or lost (cancellations excluded).
    pub tasks_failed: u64,
    /// Its last heartbeat since it joined (unix milliseconds); `None` before the first.
    pub last_heartbeat_ms: Option<u64>,
    /// Fuel used by every attempt it ran.
    pub fuel_used: u64,
}

impl WorkerRow {
    /// A row for a worker that just said hello, not yet registered.
    pub fn joining(info: &WorkerInfo) -> WorkerRow {
        WorkerRow {
            id: 0,
            info: info.clone(),
            online: true,
            draining: false,
            last_seen_ms: 0,
            load: Load::default(),
            cooldown_until_ms: None,
            cooldowns: 0,
            recent_failures: 0,
            tasks_succeeded: 0,
            tasks_failed: 0,
            last_heartbeat_ms: None,
            fuel_used: 0,
        }
    }
}

/// A handle on the store; clones share one writer thread and reader pool.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Committed job state changes, for whoever waits on a job.
/// When a job's insert commits (see [`Store::insert_job`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertCommit {
    /// With the records that follow it: a short job's whole life is then one
    /// transaction. For a caller that waits for the job's end anyway.
    WithItsTasks,
    /// In the next transaction: for a caller that answers as soon as the job
    /// is stored, whatever its tasks take.
    AtOnce,
}

/// A job inserted and not yet known to be committed (see [`Store::insert_job`]).
#[must_use = "a job is accepted only once it is stored"]
pub struct PendingJob {
    stored: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
}

pub type JobEvents = tokio::sync::broadcast::Sender<(JobId, JobState)>;

/// What one committed batch (or one-shot write) touched: ids only, so
/// announcing costs little; whoever cares re-reads the rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Jobs whose counters changed.
    pub jobs: Vec<JobId>,
    /// Jobs whose state changed (or that were created).
    pub job_states: Vec<JobId>,
    /// Workers that joined, left, sent a heartbeat, drained, cooled down or ended attempts.
    pub workers: Vec<WorkerId>,
    /// Jobs deleted, with everything recorded about them.
    pub deleted_jobs: Vec<JobId>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.job_states.is_empty()
            && self.workers.is_empty()
            && self.deleted_jobs.is_empty()
    }
}

pub type ChangeEvents = tokio::sync::broadcast::Sender<Arc<Changes>>;

struct Inner {
    path: PathBuf,
    job_events: JobEvents,
    changes: ChangeEvents,
    commands: Arc<Inbox>,
    writer: Option<JoinHandle<()>>,
    readers: Mutex<Vec<Connection>>,
    admission: Arc<Admission>,
    /// Modules known to be stored, so accepting a job by a module's hash
    /// usually needs no read, and when each was last named.
    module_uses: Arc<ModuleUses>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the inbox lets the writer commit what is queued and stop.
        self.commands.close();
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!("the store's writer thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens or creates `path` (WAL, synchronous=NORMAL, foreign keys on,
    /// busy timeout), creates or migrates the schema, marks every worker
    /// offline (none is connected to a foreman that just started) and starts
    /// the writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = schema::open_writer(path)?;
        let commands = Arc::new(Inbox::new());
        let (job_events, _) = tokio::sync::broadcast::channel(1024);
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        let admission = Arc::new(Admission::load(&conn)?);
        let writer = writer::spawn(
            conn,
            commands.clone(),
            job_events.clone(),
            changes.clone(),
            admission.clone(),
        )?;
        tracing::info!(path = %path.display(), "store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                job_events,
                changes,
                commands,
                writer: Some(writer),
                readers: Mutex::new(Vec::new()),
                admission,
                module_uses: Arc::default(),
            }),
        })
    }

    /// Job state changes as they are committed (a result is readable once its
    /// job's final state is announced).
    pub fn job_events(&self) -> tokio::sync::broadcast::Receiver<(JobId, JobState)> {
        self.inner.job_events.subscribe()
    }

    /// What each committed batch touched (see [`Changes`]); a receiver that
    /// lags should re-read everything it shows.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<Changes>> {
        self.inner.changes.subscribe()
    }

    fn announce(&self, changes: Changes) {
        // No receiver is not an error: nobody is watching.
        let _ = self.inner.changes.send(Arc::new(changes));
    }

    /// Queues a change for the writer thread and returns at once.
    pub fn record(&self, record: Record) {
        self.record_all([record]);
    }

    /// Queues changes, in order, for the writer thread and returns at once.
    pub fn record_all(&self, records: impl IntoIterator<Item = Record>) {
        let at_ms = schema::now_ms();
        let changes: Vec<Change> = records
            .into_iter()
            .map(|record| Change::Record { record, at_ms })
            .collect();
        if !changes.is_empty() {
            self.send(Command::Changes(changes));
        }
    }

    /// Blocks until every record queued before this call is committed.
    /// Fails if the commit failed (the records are kept and retried), or if
    /// records were rejected since the previous flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.try_send(Command::Flush(reply))?;
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    pub fn job(&self, id: JobId) -> Result<Option<JobRow>, StoreError> {
        self.read(|conn| queries::job(conn, id))
    }

    /// Newest first, optionally only jobs in `state`; `limit` is capped at
    /// [`MAX_PAGE`].
    pub fn jobs(
        &self,
        skip: u64,
        limit: u64,
        state: Option<JobState>,
    ) -> Result<Vec<JobRow>, StoreError> {
        self.read(|conn| queries::jobs(conn, skip, limit.min(MAX_PAGE), state))
    }

    /// Every task's outcome in argument order; `None` when the job is unknown.
    pub fn results(&self, id: JobId) -> Result<Option<Vec<TaskOutcomeRow>>, StoreError> {
        self.read(|conn| queries::results(conn, id))
    }

    /// Every job not in a final state, oldest first, for restart recovery.
    pub fn unfinished_jobs(&self) -> Result<Vec<UnfinishedJob>, StoreError> {
        self.read(queries::unfinished_jobs)
    }

    /// One past the largest attempt id ever stored (1 on an empty database).
    pub fn next_attempt_id(&self) -> Result<u64, StoreError> {
        self.read(queries::next_attempt_id)
    }

    /// Registers a worker, or refreshes the one with the same name and
    /// hostname; returns its stable id. Only `info` and `online` of `w` are
    /// used (the store keeps the rest); a worker joining again is no longer
    /// draining and its last load is forgotten.
    pub fn upsert_worker(&self, w: &WorkerRow) -> Result<WorkerId, StoreError> {
        self.register_worker(w, None)
    }

    /// [`Store::upsert_worker`], recording the join token it joined with.
    pub fn register_worker(
        &self,
        w: &WorkerRow,
        token: Option<u64>,
    ) -> Result<WorkerId, StoreError> {
        let w = w.clone();
        let id = self.call(false, move |conn| queries::upsert_worker(conn, &w, token))?;
        self.announce_worker(id);
        Ok(id)
    }

    pub fn set_worker_online(&self, id: WorkerId, online: bool) -> Result<(), StoreError> {
        self.call(false, move |conn| {
            queries::set_worker_online(conn, id, online)
        })?;
        self.announce_worker(id);
        Ok(())
    }

    fn announce_worker(&self, id: WorkerId) {
        self.announce(Changes {
            workers: vec![id],
            ..Changes::default()
        });
    }

    /// Queues a worker's heartbeat (its load, and that it was seen at
    /// `now_ms`) for the next batch and returns at once.
    pub fn worker_heartbeat(&self, worker: WorkerId, load: Load, now_ms: u64) {
        self.send(Command::Changes(vec![Change::Heartbeat {
            worker,
            load,
            now_ms,
        }]));
    }

    /// Queues marking a worker as draining (or not) and returns at once.
    pub fn set_worker_draining(&self, worker: WorkerId, draining: bool) {
        self.send(Command::Changes(vec![Change::Draining {
            worker,
            draining,
        }]));
    }

    /// Every worker ever registered, by id.
    pub fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        self.read(|conn| queries::workers(conn, None))
    }

    pub fn worker(&self, id: WorkerId) -> Result<Option<WorkerRow>, StoreError> {
        self.read(|conn| queries::workers(conn, Some(id)))
            .map(|rows| rows.into_iter().next())
    }

    /// The grid at a glance (see [`Stats`]).
    /// `live`: busy slots of the workers the core counts them for
    /// (`Driver::busy_slots`); the others' come from their last heartbeat.
    pub fn stats(
        &self,
        live: &std::collections::HashMap<WorkerId, u32>,
    ) -> Result<Stats, StoreError> {
        self.read(|conn| views::stats(conn, live))
    }

    /// A page of a job's tasks in index order, optionally only those in
    /// `state`; `None` when the job is unknown. `limit` is capped at [`MAX_PAGE`].
    pub fn tasks(
        &self,
        job: JobId,
        skip: u64,
        limit: u64,
        state: Option<TaskState>,
    ) -> Result<Option<TaskPage>, StoreError> {
        self.read(|conn| views::tasks(conn, job, skip, limit.min(MAX_PAGE), state))
    }

    /// Failures by kind, attempts by worker and run times; `None` when the job is unknown.
    pub fn job_summary(&self, job: JobId) -> Result<Option<JobSummary>, StoreError> {
        self.read(|conn| views::job_summary(conn, job))
    }

    /// Failed attempts on every worker (or `worker`'s), newest first,
    /// optionally only of `kind`; `limit` is capped at [`MAX_FAILURES_PAGE`].
    pub fn failures(
        &self,
        worker: Option<WorkerId>,
        kind: Option<FailureKind>,
        skip: u64,
        limit: u64,
    ) -> Result<Vec<FailureRow>, StoreError> {
        self.read(|conn| views::failures(conn, worker, kind, skip, limit.min(MAX_FAILURES_PAGE)))
    }

    pub fn failure_stats(&self) -> Result<FailureStats, StoreError> {
        self.read(views::failure_stats)
    }

    /// Run times of every successful attempt (reads them all: for `/metrics`).
    pub fn run_time_histogram(&self) -> Result<RunTimeHistogram, StoreError> {
        self.read(|conn| views::run_time_histogram(conn, None))
    }

    fn send(&self, command: Command) {
        if let Err(e) = self.try_send(command) {
            tracing::error!(error = %e, "record dropped");
        }
    }

    fn try_send(&self, command: Command) -> Result<(), StoreError> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| StoreError::Closed)
    }

    /// Runs `f` on the writer thread, after everything queued before, and
    /// waits for its answer. `durable`: commit with `synchronous=FULL`.
    fn call<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.try_send(Command::Exec {
            durable,
            run: Box::new(move |conn| {
                // The caller may have gone; nothing to do then.
                let _ = reply.send(f(conn));
            }),
        })?;
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on the writer thread after everything queued before, without
    /// waiting; a failure is logged.
    fn exec_later(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<(), StoreError> + Send + 'static,
    ) {
        self.send(Command::Exec {
            durable: false,
            run: Box::new(move |conn| {
                if let Err(error) = f(conn) {
                    tracing::warn!("store: {error}");
                }
            }),
        });
    }

    /// Runs `f` on a pooled read connection.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => schema::open_reader(&self.inner.path)?,
        };
        let result = f(&mut conn);
        let mut readers = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
        result
    }
}
