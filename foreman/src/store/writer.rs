//! The writer thread: the one connection that writes. It applies queued
//! records in order, one transaction per batch, keeping the job and worker
//! counters in step, and runs the one-shot writes of `queries` between batches.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, CachedStatement, Connection};
use wasmgrid_protocol::wire::Load;
use wasmgrid_protocol::{Failure, FailureKind, TaskReport};

use super::schema::{self, now_ms, to_sql};
use super::{ChangeEvents, Changes, JobEvents, StoreError};
use crate::model::{JobId, JobState, Record, TaskIndex, TaskState, WorkerId};

/// A batch is committed this long after its first record at the latest...
/// ...or once it holds this many records.
const BATCH_MAX: usize = 2_000;
/// Pause before retrying a batch whose commit failed.
const RETRY_DELAY: Duration = Duration::from_millis(200);

pub(super) type ExecFn = Box<dyn FnOnce(&mut Connection) + Send>;

/// A queued change: the core's records, and the worker facts that arrive as
/// often (heartbeats) and so must not cost a round trip each.
#[derive(Debug)]
pub(super) enum Change {
    Record(Record),
    Heartbeat {
        worker: WorkerId,
        load: Load,
        now_ms: u64,
    },
    Draining {
        worker: WorkerId,
        draining: bool,
    },
}

pub(super) enum Command {
    Changes(Vec<Change>),
    Flush(SyncSender<Result<(), StoreError>>),
    /// Runs on the writer's connection; `durable` commits with synchronous=FULL.
    Exec {
        durable: bool,
        run: ExecFn,
    },
}

pub(super) fn spawn(
    conn: Connection,
    commands: Receiver<Command>,
    job_events: JobEvents,
    changes: ChangeEvents,
) -> Result<JoinHandle<()>, StoreError> {
    let writer = Writer {
        conn,
        commands,
        job_events,
        changes,
        pending: Vec::new(),
        rejected: 0,
        first_rejection: None,
        last_failure: None,
    };
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer.run())
        .map_err(|e| StoreError::WriteFailed(format!("cannot start the writer thread: {e}")))
}

struct Writer {
    conn: Connection,
    commands: Receiver<Command>,
    /// Changes received and not yet committed, in order.
    pending: Vec<Change>,
    /// Records dropped since the last flush, and why the first one was.
    rejected: u64,
    first_rejection: Option<String>,
    /// Why the last commit of `pending` failed, while it keeps failing.
    last_failure: Option<String>,
    /// Job state changes, announced once committed.
    job_events: JobEvents,
    /// Which jobs and workers each committed batch touched.
    changes: ChangeEvents,
}

impl Writer {
    fn run(mut self) {
        loop {
            let mut next = None;
            let mut closed = false;
            if self.pending.is_empty() {
                match self.commands.recv() {
                    Ok(Command::Changes(changes)) => self.pending = changes,
                    Ok(other) => next = Some(other),
                    Err(_) => break,
                }
            }
            // Group commit: take whatever else is already queued, without
            // waiting; records arriving during this commit form the next batch.
            if next.is_none() {
                while self.pending.len() < BATCH_MAX {
                    match self.commands.try_recv() {
                        Ok(Command::Changes(changes)) => self.pending.extend(changes),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
            }
            self.commit_pending();
            match next {
                Some(Command::Flush(reply)) => {
                    let _ = reply.send(self.flush_answer());
                }
                Some(Command::Exec { durable, run }) => self.exec(durable, run),
                Some(Command::Changes(_)) | None => {}
            }
            if closed {
                break;
            }
        }
        // Every handle is gone: one last try for what is left.
        self.commit_pending();
        if !self.pending.is_empty() {
            tracing::error!(
                lost = self.pending.len(),
                "store closing with records it could not commit"
            );
        }
    }

    /// Commits `pending` in batches of at most `BATCH_MAX`. On failure the
    /// uncommitted records stay in `pending`, to be retried.
    fn commit_pending(&mut self) {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(BATCH_MAX);
            match self.commit_batch(n) {
                Ok(()) => {
                    // Nobody listening (no dashboard open): skip gathering ids.
                    let mut touched = (self.changes.receiver_count() > 0).then(Changes::default);
                    for change in self.pending.drain(..n) {
                        if let Some(touched) = touched.as_mut() {
                            touched.add(&change);
                        }
                        if let Change::Record(Record::JobStateChanged { job, state }) = change {
                            let _ = self.job_events.send((job, state));
                        }
                    }
                    if let Some(touched) = touched.filter(|t| !t.is_empty()) {
                        let _ = self.changes.send(std::sync::Arc::new(touched));
                    }
                    self.last_failure = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, queued = self.pending.len(), "committing records failed; will retry");
                    self.last_failure = Some(e.to_string());
                    std::thread::sleep(RETRY_DELAY);
                    return;
                }
            }
        }
    }

    fn flush_answer(&mut self) -> Result<(), StoreError> {
        if let Some(failure) = &self.last_failure {
            return Err(StoreError::WriteFailed(failure.clone()));
        }
        let count = std::mem::take(&mut self.rejected);
        match self.first_rejection.take() {
            Some(first) if count > 0 => Err(StoreError::Rejected { count, first }),
            _ => Ok(()),
        }
    }

    /// Applies the first `n` pending records in one transaction. If one of
    /// them cannot be applied, the batch is redone record by record, each in
    /// a savepoint, and the bad ones are dropped.
    fn commit_batch(&mut self, n: usize) -> Result<(), StoreError> {
        let records = &self.pending[..n];
        let started = Instant::now();
        let now = now_ms();
        let tx = self.conn.transaction()?;
        let mut failed_at = None;
        {
            let mut st = Statements::prepare(&tx)?;
            let mut deltas = Deltas::default();
            for (i, record) in records.iter().enumerate() {
                match apply(&mut st, record, now, &mut deltas) {
                    Ok(()) => {}
                    Err(e) if is_bad_record(&e) => {
                        failed_at = Some(i);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if failed_at.is_none() {
                deltas.write(&mut st, now)?;
            }
        }
        if failed_at.is_none() {
            tx.commit()?;
            tracing::trace!(records = n, elapsed = ?started.elapsed(), "batch committed");
            return Ok(());
        }
        tx.rollback()?;

        let tx = self.conn.transaction()?;
        let mut rejections = Vec::new();
        {
            let mut st = Statements::prepare(&tx)?;
            let mut deltas = Deltas::default();
            for record in records {
                tx.execute_batch("SAVEPOINT record")?;
                let mut mine = Deltas::default();
                match apply(&mut st, record, now, &mut mine) {
                    Ok(()) => {
                        tx.execute_batch("RELEASE record")?;
                        deltas.merge(mine);
                    }
                    Err(e) if is_bad_record(&e) => {
                        tx.execute_batch("ROLLBACK TO record; RELEASE record")?;
                        tracing::error!(error = %e, ?record, "record rejected");
                        rejections.push(e.to_string());
                    }
                    // Not the record's fault (I/O, disk full): retry the batch later.
                    Err(e) => return Err(e),
                }
            }
            deltas.write(&mut st, now)?;
        }
        tx.commit()?;
        // Counted only once committed: a batch that is retried is not counted twice.
        self.rejected += rejections.len() as u64;
        if self.first_rejection.is_none() {
            self.first_rejection = rejections.into_iter().next();
        }
        Ok(())
    }

    fn exec(&mut self, durable: bool, run: ExecFn) {
        if durable {
            if let Err(e) = self.conn.pragma_update(None, "synchronous", "FULL") {
                tracing::warn!(error = %e, "cannot switch to synchronous=FULL");
            }
        }
        run(&mut self.conn);
        if durable {
            if let Err(e) = self.conn.pragma_update(None, "synchronous", "NORMAL") {
                tracing::warn!(error = %e, "cannot switch back to synchronous=NORMAL");
            }
        }
    }
}

impl Changes {
    fn add(&mut self, change: &Change) {
        match change {
            Change::Record(record) => match record {
                Record::AttemptStarted { job, .. } => self.jobs.push(*job),
                Record::AttemptEnded { job, worker, .. }
                | Record::AttemptAbandoned { job, worker, .. } => {
                    self.jobs.push(*job);
                    self.workers.push(*worker);
                }
                Record::JobStateChanged { job, .. } => self.job_states.push(*job),
                Record::WorkerCooledDown { worker, .. } => self.workers.push(*worker),
            },
            Change::Heartbeat { worker, .. } | Change::Draining { worker, .. } => {
                self.workers.push(*worker)
            }
        }
    }
}

/// Whether applying a record failed because of the record itself (it names
/// something that does not exist, or breaks a constraint), rather than
/// because of the database (I/O, disk full), which is worth a retry.
fn is_bad_record(e: &StoreError) -> bool {
    match e {
        StoreError::UnknownJob(_) | StoreError::UnknownTask { .. } | StoreError::Corrupt(_) => true,
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
            f.code == rusqlite::ErrorCode::ConstraintViolation
        }
        _ => false,
    }
}

/// The statements a batch uses, prepared once per batch.
struct Statements<'c> {
    task_state: CachedStatement<'c>,
    start_task: CachedStatement<'c>,
    start_attempt: CachedStatement<'c>,
    end_task: CachedStatement<'c>,
    end_attempt: CachedStatement<'c>,
    worker_failure: CachedStatement<'c>,
    job_state: CachedStatement<'c>,
    cancel_queued: CachedStatement<'c>,
    job_counters: CachedStatement<'c>,
    worker_counters: CachedStatement<'c>,
    worker_cooldown: CachedStatement<'c>,
    worker_load: CachedStatement<'c>,
    worker_draining: CachedStatement<'c>,
}

impl<'c> Statements<'c> {
    fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Statements {
            task_state: conn.prepare_cached("SELECT state FROM tasks WHERE job_id = ?1 AND idx = ?2")?,
            start_task: conn.prepare_cached(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1, worker_id = ?3
                 WHERE job_id = ?1 AND idx = ?2",
            )?,
            start_attempt: conn.prepare_cached(
                "INSERT INTO attempts (id, job_id, idx, worker_id, started_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?,
            end_task: conn.prepare_cached(
                "UPDATE tasks SET state = ?3, worker_id = ?4, fuel_used = fuel_used + ?5,
                     result = ?6, failure_kind = ?7, failure_message = ?8
                 WHERE job_id = ?1 AND idx = ?2",
            )?,
            end_attempt: conn.prepare_cached(
                "INSERT INTO attempts (id, job_id, idx, worker_id, started_at_ms, ended_at_ms,
                     outcome_kind, message, fuel_used, cache, load_us, instantiate_us, run_us,
                     stdout, stdout_truncated, stderr, stderr_truncated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (id) DO UPDATE SET ended_at_ms = excluded.ended_at_ms,
                     outcome_kind = excluded.outcome_kind, message = excluded.message,
                     fuel_used = excluded.fuel_used, cache = excluded.cache,
                     load_us = excluded.load_us, instantiate_us = excluded.instantiate_us,
                     run_us = excluded.run_us, stdout = excluded.stdout,
                     stdout_truncated = excluded.stdout_truncated, stderr = excluded.stderr,
                     stderr_truncated = excluded.stderr_truncated",
            )?,
            worker_failure: conn.prepare_cached(
                "INSERT OR REPLACE INTO worker_failures (attempt, worker_id, job_id, idx, kind, message, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?,
            job_state: conn.prepare_cached(
                "UPDATE jobs SET state = ?2,
                     started_at_ms = CASE WHEN ?2 = 'running' THEN coalesce(started_at_ms, ?3)
                                          ELSE started_at_ms END,
                     finished_at_ms = CASE WHEN ?4 THEN coalesce(finished_at_ms, ?3) ELSE NULL END
                 WHERE id = ?1",
            )?,
            cancel_queued: conn.prepare_cached(
                "UPDATE tasks SET state = 'cancelled', failure_kind = 'Cancelled',
                     failure_message = 'the job was cancelled before this task started'
                 WHERE job_id = ?1 AND state = 'queued'",
            )?,
            job_counters: conn.prepare_cached(
                "UPDATE jobs SET queued = queued + ?2, running = running + ?3,
                     succeeded = succeeded + ?4, failed = failed + ?5,
                     cancelled = cancelled + ?6, fuel_used = fuel_used + ?7
                 WHERE id = ?1",
            )?,
            worker_counters: conn.prepare_cached(
                "UPDATE workers SET tasks_succeeded = tasks_succeeded + ?2,
                     tasks_failed = tasks_failed + ?3, last_seen_ms = max(last_seen_ms, ?4),
                     fuel_used = fuel_used + ?5
                 WHERE id = ?1",
            )?,
            worker_cooldown: conn.prepare_cached(
                "UPDATE workers SET cooldown_until_ms = ?2, cooldowns = cooldowns + 1 WHERE id = ?1",
            )?,
            worker_load: conn.prepare_cached(
                "UPDATE workers SET cpu_permille = ?2, memory_used_bytes = ?3,
                     worker_rss_bytes = ?4, running = ?5, last_seen_ms = max(last_seen_ms, ?6),
                     last_heartbeat_ms = ?6
                 WHERE id = ?1",
            )?,
            worker_draining: conn.prepare_cached("UPDATE workers SET draining = ?2 WHERE id = ?1")?,
        })
    }
}

/// Counter changes a batch makes, written once at its end.
#[derive(Default)]
struct Deltas {
    jobs: HashMap<JobId, JobDelta>,
    /// Attempts succeeded, failed, and fuel used.
    workers: HashMap<WorkerId, (i64, i64, i64)>,
}

#[derive(Default, Clone, Copy)]
struct JobDelta {
    /// Indexed by `slot(TaskState)`.
    tasks: [i64; 5],
    fuel: i64,
}

fn slot(state: TaskState) -> usize {
    match state {
        TaskState::Queued => 0,
        TaskState::Running => 1,
        TaskState::Succeeded => 2,
        TaskState::Failed => 3,
        TaskState::Cancelled => 4,
    }
}

impl Deltas {
    fn task_moved(&mut self, job: JobId, from: TaskState, to: TaskState, count: i64) {
        if from != to {
            let d = self.jobs.entry(job).or_default();
            d.tasks[slot(from)] -= count;
            d.tasks[slot(to)] += count;
        }
    }

    fn merge(&mut self, other: Deltas) {
        for (job, o) in other.jobs {
            let d = self.jobs.entry(job).or_default();
            for (a, b) in d.tasks.iter_mut().zip(o.tasks) {
                *a += b;
            }
            d.fuel = d.fuel.wrapping_add(o.fuel);
        }
        for (worker, (ok, failed, fuel)) in other.workers {
            let d = self.workers.entry(worker).or_default();
            d.0 += ok;
            d.1 += failed;
            d.2 = d.2.wrapping_add(fuel);
        }
    }

    fn write(&self, st: &mut Statements<'_>, now: i64) -> rusqlite::Result<()> {
        for (job, d) in &self.jobs {
            let [q, r, s, f, c] = d.tasks;
            st.job_counters
                .execute(params![to_sql(*job), q, r, s, f, c, d.fuel])?;
        }
        for (worker, (ok, failed, fuel)) in &self.workers {
            st.worker_counters
                .execute(params![to_sql(*worker), ok, failed, now, fuel])?;
        }
        Ok(())
    }
}

/// Applies one change. Deltas are added only once all its statements succeeded.
fn apply(
    st: &mut Statements<'_>,
    change: &Change,
    now: i64,
    deltas: &mut Deltas,
) -> Result<(), StoreError> {
    match change {
        Change::Record(record) => apply_record(st, record, now, deltas),
        Change::Heartbeat {
            worker,
            load,
            now_ms,
        } => {
            st.worker_load.execute(params![
                to_sql(*worker),
                load.cpu_permille,
                to_sql(load.memory_used_bytes),
                to_sql(load.worker_rss_bytes),
                load.running,
                to_sql(*now_ms),
            ])?;
            Ok(())
        }
        Change::Draining { worker, draining } => {
            st.worker_draining
                .execute(params![to_sql(*worker), draining])?;
            Ok(())
        }
    }
}

fn apply_record(
    st: &mut Statements<'_>,
    record: &Record,
    now: i64,
    deltas: &mut Deltas,
) -> Result<(), StoreError> {
    match record {
        Record::AttemptStarted {
            job,
            task,
            attempt,
            worker,
        } => {
            let from = current_state(st, *job, *task)?;
            st.start_task
                .execute(params![to_sql(*job), task, to_sql(*worker)])?;
            st.start_attempt.execute(params![
                to_sql(*attempt),
                to_sql(*job),
                task,
                to_sql(*worker),
                now
            ])?;
            deltas.task_moved(*job, from, TaskState::Running, 1);
        }
        Record::AttemptEnded {
            job,
            task,
            attempt,
            worker,
            report,
            task_state,
        } => {
            let end = End {
                job: *job,
                task: *task,
                attempt: *attempt,
                worker: *worker,
                state: *task_state,
            };
            end_attempt(
                st,
                &end,
                Some(report),
                report.outcome.as_ref().err(),
                now,
                deltas,
            )?;
        }
        Record::AttemptAbandoned {
            job,
            task,
            attempt,
            worker,
            failure,
            task_state,
        } => {
            let end = End {
                job: *job,
                task: *task,
                attempt: *attempt,
                worker: *worker,
                state: *task_state,
            };
            end_attempt(st, &end, None, Some(failure), now, deltas)?;
        }
        // Worker references carry no foreign key (see the schema): an
        // unknown worker changes nothing rather than failing the batch.
        Record::WorkerCooledDown {
            worker, until_ms, ..
        } => {
            st.worker_cooldown
                .execute(params![to_sql(*worker), to_sql(*until_ms)])?;
        }
        Record::JobStateChanged { job, state } => {
            let changed = st.job_state.execute(params![
                to_sql(*job),
                state.as_str(),
                now,
                state.is_finished()
            ])?;
            if changed == 0 {
                return Err(StoreError::UnknownJob(*job));
            }
            if *state == JobState::Cancelled {
                // Tasks that never started will not get an attempt record.
                let n = st.cancel_queued.execute(params![to_sql(*job)])?;
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                deltas.task_moved(*job, TaskState::Queued, TaskState::Cancelled, n);
            }
        }
    }
    Ok(())
}

struct End {
    job: JobId,
    task: TaskIndex,
    attempt: u64,
    worker: WorkerId,
    state: TaskState,
}

fn end_attempt(
    st: &mut Statements<'_>,
    end: &End,
    report: Option<&TaskReport>,
    failure: Option<&Failure>,
    now: i64,
    deltas: &mut Deltas,
) -> Result<(), StoreError> {
    let from = current_state(st, end.job, end.task)?;
    let fuel = report.map_or(0, |r| to_sql(r.fuel_used));
    let is_final = end.state.is_finished();
    let result = match report.map(|r| &r.outcome) {
        Some(Ok(result)) if is_final => Some(result.as_str()),
        _ => None,
    };
    let task_failure = failure.filter(|_| is_final);
    // A finished task keeps its outcome: a later attempt record (a cancelled
    // duplicate, a late report) is kept as history only.
    let task_open = !from.is_finished();
    if task_open {
        st.end_task.execute(params![
            to_sql(end.job),
            end.task,
            end.state.as_str(),
            to_sql(end.worker),
            fuel,
            result,
            task_failure.map(|f| f.kind.as_str()),
            task_failure.map(|f| f.message.as_str()),
        ])?;
    }
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    st.end_attempt.execute(params![
        to_sql(end.attempt),
        to_sql(end.job),
        end.task,
        to_sql(end.worker),
        now,
        failure.map(|f| f.kind.as_str()),
        failure.map(|f| f.message.as_str()),
        report.map(|r| to_sql(r.fuel_used)),
        report.map(|r| schema::cache_source(r.cache)),
        report.map(|r| to_sql(r.timings.load_us)),
        report.map(|r| to_sql(r.timings.instantiate_us)),
        report.map(|r| to_sql(r.timings.run_us)),
        report.and_then(|r| text(&r.stdout.text)),
        report.map(|r| r.stdout.truncated),
        report.and_then(|r| text(&r.stderr.text)),
        report.map(|r| r.stderr.truncated),
    ])?;
    // A cancellation is the job's doing, not the worker's.
    if let Some(f) = failure.filter(|f| f.kind != FailureKind::Cancelled) {
        st.worker_failure.execute(params![
            to_sql(end.attempt),
            to_sql(end.worker),
            to_sql(end.job),
            end.task,
            f.kind.as_str(),
            f.message,
            now
        ])?;
    }
    if task_open {
        deltas.task_moved(end.job, from, end.state, 1);
    }
    let d = deltas.jobs.entry(end.job).or_default();
    d.fuel = d.fuel.wrapping_add(fuel);
    let w = deltas.workers.entry(end.worker).or_default();
    w.2 = w.2.wrapping_add(fuel);
    match failure {
        None => w.0 += 1,
        Some(f) if f.kind != FailureKind::Cancelled => w.1 += 1,
        Some(_) => {}
    }
    Ok(())
}

fn current_state(
    st: &mut Statements<'_>,
    job: JobId,
    task: TaskIndex,
) -> Result<TaskState, StoreError> {
    let mut rows = st.task_state.query(params![to_sql(job), task])?;
    match rows.next()? {
        Some(row) => schema::task_state(row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?),
        None => Err(StoreError::UnknownTask { job, task }),
    }
}
