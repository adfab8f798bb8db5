//! The writer thread: the one connection that writes. It applies queued
//! records in order, one transaction per batch, keeping the job and worker
//! counters in step, and runs the one-shot writes of `queries` between batches.
//! How each change becomes SQL is in `apply`.

use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use wasmgrid_protocol::wire::Load;

use super::admission::Admission;
use super::schema::now_ms;
use super::{ChangeEvents, Changes, JobEvents, StoreError};
use super::{InsertCommit, NewJob};
use crate::model::{JobId, JobState, Record, WorkerId};
use apply::{apply, Deltas, Statements};
use fold::Folds;
pub(super) use inbox::Inbox;
use inbox::Received;

mod apply;
mod fold;
mod inbox;

/// A batch is committed this long after its first record at the latest...
/// ...or once it holds this many records.
const BATCH_MAX: usize = 4_000;
/// Pause before retrying a batch whose commit failed.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long a batch of only [`Change::is_lazy`] changes may wait for more:
/// long enough that most attempts of short tasks start and end in one batch
/// (see `fold`), short enough that progress shows promptly. A crash loses at
/// most this much of attempts' history; their tasks run again.
const LAZY_DELAY: Duration = Duration::from_millis(20);

pub(super) type ExecFn = Box<dyn FnOnce(&mut Connection) + Send>;

/// A queued change: the core's records, and the worker facts that arrive as
/// often (heartbeats) and so must not cost a round trip each.
#[derive(Debug)]
pub(super) enum Change {
    /// `at_ms`: when it was queued, the time stored for it (a lazy change
    /// may commit a few ms later).
    Record {
        record: Record,
        at_ms: i64,
    },
    Heartbeat {
        worker: WorkerId,
        load: Load,
        now_ms: u64,
    },
    Draining {
        worker: WorkerId,
        draining: bool,
    },
    /// A job accepted by the store's admission: its insert is lazy when
    /// asked to commit with its tasks' records.
    NewJob(Box<NewJobRow>),
}

#[derive(Debug)]
pub(super) struct NewJobRow {
    pub(super) id: JobId,
    pub(super) job: NewJob,
    pub(super) token: Option<u64>,
    pub(super) created_at_ms: i64,
    pub(super) stored: Option<Reply<Result<(), StoreError>>>,
    pub(super) commit: InsertCommit,
}

/// Where the writer answers: a task awaiting it, or a thread blocked on it.
#[derive(Debug)]
pub(super) enum Reply<T> {
    Async(tokio::sync::oneshot::Sender<T>),
    Blocking(SyncSender<T>),
}

impl<T> Reply<T> {
    /// False when nobody waits for the answer any more.
    fn send(self, value: T) -> bool {
        match self {
            Reply::Async(sender) => sender.send(value).is_ok(),
            Reply::Blocking(sender) => sender.send(value).is_ok(),
        }
    }
}

impl Change {
    /// Nobody waits for it: an attempt's start or end (and its job becoming
    /// running), a heartbeat, or a job's insert asked to wait for its tasks'
    /// records. Callers wait for a job's end, which is not
    /// lazy and commits everything before it. A batch of only these waits up
    /// to [`LAZY_DELAY`] for company, so the tasks of a job commit a few
    /// dozen at a time rather than each in its own transaction: the CPU a
    /// commit costs is taken from the workers on a shared machine.
    pub(super) fn is_lazy(&self) -> bool {
        matches!(
            self,
            Change::Record {
                record: Record::AttemptStarted { .. }
                    | Record::AttemptEnded { .. }
                    | Record::AttemptAbandoned { .. }
                    | Record::JobStateChanged {
                        state: JobState::Running,
                        ..
                    },
                ..
            } | Change::Heartbeat { .. }
        ) || matches!(self, Change::NewJob(row) if row.commit == InsertCommit::WithItsTasks)
    }
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

impl Command {
    fn is_lazy(&self) -> bool {
        match self {
            Command::Changes(changes) => changes.iter().all(Change::is_lazy),
            Command::Flush(_) | Command::Exec { .. } => false,
        }
    }
}

pub(super) fn spawn(
    conn: Connection,
    commands: Arc<Inbox>,
    job_events: JobEvents,
    changes: ChangeEvents,
    admission: Arc<Admission>,
) -> Result<JoinHandle<()>, StoreError> {
    let writer = Writer {
        admission,
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
    /// Told when a job ends or is never stored, so its token's count drops.
    admission: Arc<Admission>,
    conn: Connection,
    commands: Arc<Inbox>,
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
                    Some(Command::Changes(changes)) => self.pending = changes,
                    Some(other) => next = Some(other),
                    None => break,
                }
                if self.pending.is_empty() && next.is_none() {
                    continue;
                }
            }
            // Group commit: take whatever else is already queued, without
            // waiting unless the batch is all lazy; records arriving during
            // this commit form the next batch.
            if next.is_none() {
                let lazy_until = Instant::now() + LAZY_DELAY;
                while self.pending.len() < BATCH_MAX {
                    let received = if self.pending.iter().all(Change::is_lazy) {
                        self.commands.recv_urgent_before(lazy_until)
                    } else {
                        self.commands.try_recv()
                    };
                    match received {
                        Received::Command(Command::Changes(changes)) => {
                            self.pending.extend(changes)
                        }
                        Received::Command(other) => {
                            next = Some(other);
                            break;
                        }
                        Received::Empty => break,
                        Received::Closed => {
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
                Ok(mut rejected) => {
                    // Nobody listening (no dashboard open): skip gathering ids.
                    let mut touched = (self.changes.receiver_count() > 0).then(Changes::default);
                    for (i, change) in self.pending.drain(..n).enumerate() {
                        if let Some(touched) = touched.as_mut() {
                            touched.add(&change);
                        }
                        match change {
                            Change::Record {
                                record: Record::JobStateChanged { job, state },
                                ..
                            } => {
                                if state.is_finished() {
                                    self.admission.finished(job);
                                }
                                let _ = self.job_events.send((job, state));
                            }
                            Change::NewJob(mut row) => {
                                let outcome = match rejected.iter().position(|(at, _)| *at == i) {
                                    Some(at) => Err(StoreError::Rejected {
                                        count: 1,
                                        first: rejected.swap_remove(at).1,
                                    }),
                                    None => Ok(()),
                                };
                                if outcome.is_err() {
                                    self.admission.finished(row.id);
                                } else {
                                    tracing::info!(
                                        job = row.id,
                                        tasks = row.job.args.len(),
                                        "job stored"
                                    );
                                }
                                if let Some(stored) = row.stored.take() {
                                    stored.send(outcome);
                                }
                            }
                            _ => {}
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
    /// a savepoint, and the bad ones are dropped: returned with why, by index.
    fn commit_batch(&mut self, n: usize) -> Result<Vec<(usize, String)>, StoreError> {
        let records = &self.pending[..n];
        let started = Instant::now();
        let now = now_ms();
        let tx = self.conn.transaction()?;
        let mut failed_at = None;
        {
            let mut st = Statements::prepare(&tx)?;
            let mut deltas = Deltas::default();
            let mut folds = Folds::plan(records);
            for (i, record) in records.iter().enumerate() {
                match apply(&mut st, record, &mut deltas, &mut folds) {
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
            return Ok(Vec::new());
        }
        tx.rollback()?;

        let tx = self.conn.transaction()?;
        let mut rejections = Vec::new();
        {
            let mut st = Statements::prepare(&tx)?;
            let mut deltas = Deltas::default();
            for (i, record) in records.iter().enumerate() {
                tx.execute_batch("SAVEPOINT record")?;
                let mut mine = Deltas::default();
                // One by one, so a rejected record takes nothing else with it.
                match apply(&mut st, record, &mut mine, &mut Folds::default()) {
                    Ok(()) => {
                        tx.execute_batch("RELEASE record")?;
                        deltas.merge(mine);
                    }
                    Err(e) if is_bad_record(&e) => {
                        tx.execute_batch("ROLLBACK TO record; RELEASE record")?;
                        tracing::error!(error = %e, ?record, "record rejected");
                        rejections.push((i, e.to_string()));
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
            self.first_rejection = rejections.first().map(|(_, why)| why.clone());
        }
        Ok(rejections)
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
            Change::Record { record, .. } => match record {
                Record::AttemptStarted { job, .. } => self.jobs.push(*job),
                Record::AttemptEnded { job, worker, .. }
                | Record::AttemptAbandoned { job, worker, .. } => {
                    self.jobs.push(*job);
                    self.workers.push(*worker);
                }
                Record::JobStateChanged { job, .. } => self.job_states.push(*job),
                Record::WorkerCooledDown { worker, .. }
                | Record::WorkerViolation { worker, .. } => self.workers.push(*worker),
            },
            Change::NewJob(row) => self.job_states.push(row.id),
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
