//! Applying a batch's changes to SQL: the statements a batch uses, the
//! changes themselves, and the counter deltas written once per batch.

use std::collections::HashMap;

use rusqlite::{params, CachedStatement, Connection};
use wasmgrid_protocol::{Failure, FailureKind, TaskReport};

use super::super::schema::{self, to_sql};
use super::super::views::{latency_bucket, GRID_RUN_TIMES, LATENCY_BUCKETS_MS};
use super::super::StoreError;
use super::fold::Folds;
use super::{Change, NewJobRow};
use crate::model::{JobId, JobState, Record, TaskIndex, TaskState, WorkerId};

/// The statements a batch uses, prepared once per batch.
pub(super) struct Statements<'c> {
    task_state: CachedStatement<'c>,
    start_task: CachedStatement<'c>,
    start_attempt: CachedStatement<'c>,
    end_task: CachedStatement<'c>,
    count_attempt: CachedStatement<'c>,
    end_attempt: CachedStatement<'c>,
    worker_failure: CachedStatement<'c>,
    job_state: CachedStatement<'c>,
    cancel_queued: CachedStatement<'c>,
    job_counters: CachedStatement<'c>,
    worker_counters: CachedStatement<'c>,
    worker_cooldown: CachedStatement<'c>,
    worker_load: CachedStatement<'c>,
    worker_draining: CachedStatement<'c>,
    worker_violation: CachedStatement<'c>,
    run_times: CachedStatement<'c>,
    insert_job: CachedStatement<'c>,
    insert_task: CachedStatement<'c>,
}

impl<'c> Statements<'c> {
    pub(super) fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
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
            // ?9: 1 when the attempt's start was folded into this end.
            end_task: conn.prepare_cached(
                "UPDATE tasks SET state = ?3, worker_id = ?4, fuel_used = fuel_used + ?5,
                     result = ?6, failure_kind = ?7, failure_message = ?8,
                     attempts = attempts + ?9
                 WHERE job_id = ?1 AND idx = ?2",
            )?,
            count_attempt: conn.prepare_cached(
                "UPDATE tasks SET attempts = attempts + 1 WHERE job_id = ?1 AND idx = ?2",
            )?,
            end_attempt: conn.prepare_cached(
                "INSERT INTO attempts (id, job_id, idx, worker_id, started_at_ms, ended_at_ms,
                     outcome_kind, message, fuel_used, cache, load_us, instantiate_us, run_us,
                     stdout, stdout_truncated, stderr, stderr_truncated)
                 VALUES (?1, ?2, ?3, ?4, ?17, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
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
            // Keyed below every attempt id (negative), since no attempt is at fault.
            worker_violation: conn.prepare_cached(
                "INSERT INTO worker_failures (attempt, worker_id, job_id, idx, kind, message, at_ms)
                 VALUES (min(-1, (SELECT coalesce(min(attempt), 0) FROM worker_failures) - 1),
                         ?1, 0, 0, 'ProtocolViolation', ?2, ?3)",
            )?,
            insert_job: conn.prepare_cached(
                "INSERT INTO jobs (id, module, state, priority, scheduler, fuel, memory_bytes,
                     timeout_ms, output_bytes, max_retries, total, queued, created_at_ms,
                     not_before_ms, retry_deterministic, token_id, result_bytes)
                 VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?12, ?13,
                     ?14, ?15)",
            )?,
            insert_task: conn
                .prepare_cached("INSERT INTO tasks (job_id, idx, args) VALUES (?1, ?2, ?3)")?,
            run_times: conn.prepare_cached(
                "INSERT INTO run_time_buckets (job_id, bucket, count, sum_us) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (job_id, bucket) DO UPDATE SET count = count + excluded.count,
                     sum_us = sum_us + excluded.sum_us",
            )?,
        })
    }
}

/// Counter changes a batch makes, written once at its end.
#[derive(Default)]
pub(super) struct Deltas {
    jobs: HashMap<JobId, JobDelta>,
    /// Attempts succeeded, failed, and fuel used.
    workers: HashMap<WorkerId, (i64, i64, i64)>,
    /// Successful attempts and their summed run time (µs), by job and
    /// bucket of `LATENCY_BUCKETS_MS`.
    run_times: HashMap<(JobId, usize), (u64, u64)>,
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

    pub(super) fn merge(&mut self, other: Deltas) {
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
        for (key, (count, sum_us)) in other.run_times {
            self.run_time(key, count, sum_us);
        }
    }

    fn run_time(&mut self, key: (JobId, usize), count: u64, sum_us: u64) {
        let d = self.run_times.entry(key).or_default();
        d.0 += count;
        d.1 = d.1.wrapping_add(sum_us);
    }

    pub(super) fn write(&self, st: &mut Statements<'_>, now: i64) -> rusqlite::Result<()> {
        for (job, d) in &self.jobs {
            let [q, r, s, f, c] = d.tasks;
            st.job_counters
                .execute(params![to_sql(*job), q, r, s, f, c, d.fuel])?;
        }
        for (worker, (ok, failed, fuel)) in &self.workers {
            st.worker_counters
                .execute(params![to_sql(*worker), ok, failed, now, fuel])?;
        }
        // Each job's buckets, then the grid's: the sums of the same deltas.
        let mut grid = [(0u64, 0u64); LATENCY_BUCKETS_MS.len() + 1];
        for (&(job, bucket), &(count, sum_us)) in &self.run_times {
            st.run_times
                .execute(params![to_sql(job), bucket, to_sql(count), to_sql(sum_us)])?;
            grid[bucket].0 += count;
            grid[bucket].1 = grid[bucket].1.wrapping_add(sum_us);
        }
        for (bucket, (count, sum_us)) in grid.into_iter().enumerate() {
            if count > 0 {
                st.run_times.execute(params![
                    GRID_RUN_TIMES,
                    bucket,
                    to_sql(count),
                    to_sql(sum_us)
                ])?;
            }
        }
        Ok(())
    }
}

/// Applies one change. Deltas are added only once all its statements
/// succeeded. An attempt in `folds` is written at its end, start included.
pub(super) fn apply(
    st: &mut Statements<'_>,
    change: &Change,
    deltas: &mut Deltas,
    folds: &mut Folds,
) -> Result<(), StoreError> {
    match change {
        Change::Record { record, at_ms } => apply_record(st, record, *at_ms, deltas, folds),
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
        Change::NewJob(row) => insert_job(st, row),
    }
}

fn insert_job(st: &mut Statements<'_>, row: &NewJobRow) -> Result<(), StoreError> {
    let job = &row.job;
    let limits = &job.limits;
    st.insert_job.execute(params![
        to_sql(row.id),
        &job.module[..],
        job.priority,
        job.scheduler.as_str(),
        to_sql(limits.fuel),
        to_sql(limits.memory_bytes),
        to_sql(limits.timeout_ms),
        limits.output_bytes,
        job.max_retries,
        job.args.len(),
        row.created_at_ms,
        job.not_before_ms.map(to_sql),
        job.retry_deterministic,
        row.token.map(to_sql),
        limits.result_bytes,
    ])?;
    for (idx, args) in (0u32..).zip(&job.args) {
        st.insert_task.execute(params![to_sql(row.id), idx, args])?;
    }
    Ok(())
}

fn apply_record(
    st: &mut Statements<'_>,
    record: &Record,
    now: i64,
    deltas: &mut Deltas,
    folds: &mut Folds,
) -> Result<(), StoreError> {
    match record {
        Record::AttemptStarted {
            job,
            task,
            attempt,
            worker,
            at_ms,
        } => {
            // The core's clock starts at 0 until its first tick.
            let started_at = if *at_ms > 0 { to_sql(*at_ms) } else { now };
            if folds.defer_start(*attempt, started_at) {
                return Ok(());
            }
            let from = current_state(st, *job, *task)?;
            st.start_task
                .execute(params![to_sql(*job), task, to_sql(*worker)])?;
            st.start_attempt.execute(params![
                to_sql(*attempt),
                to_sql(*job),
                task,
                to_sql(*worker),
                started_at
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
            let end = End::new(*job, *task, *attempt, *worker, *task_state);
            let failure = report.outcome.as_ref().err();
            let started = folds.take_start(*attempt);
            end_attempt(st, &end, Some(report), failure, now, started, deltas)?;
        }
        Record::AttemptAbandoned {
            job,
            task,
            attempt,
            worker,
            failure,
            task_state,
        } => {
            let end = End::new(*job, *task, *attempt, *worker, *task_state);
            let started = folds.take_start(*attempt);
            end_attempt(st, &end, None, Some(failure), now, started, deltas)?;
        }
        // Worker references carry no foreign key (see the schema): an
        // unknown worker changes nothing rather than failing the batch.
        Record::WorkerCooledDown {
            worker, until_ms, ..
        } => {
            st.worker_cooldown
                .execute(params![to_sql(*worker), to_sql(*until_ms)])?;
        }
        Record::WorkerViolation { worker, message } => {
            st.worker_violation
                .execute(params![to_sql(*worker), message, now])?;
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

impl End {
    fn new(job: JobId, task: TaskIndex, attempt: u64, worker: WorkerId, state: TaskState) -> Self {
        End {
            job,
            task,
            attempt,
            worker,
            state,
        }
    }
}

/// `started`: when the attempt started, if its start record was folded into
/// this end (then the task's attempt count is raised here).
fn end_attempt(
    st: &mut Statements<'_>,
    end: &End,
    report: Option<&TaskReport>,
    failure: Option<&Failure>,
    now: i64,
    started: Option<i64>,
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
            i64::from(started.is_some()),
        ])?;
    } else if started.is_some() {
        st.count_attempt
            .execute(params![to_sql(end.job), end.task])?;
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
        started.unwrap_or(now),
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
    if let (Some(r), None) = (report, failure) {
        // What the run-time histogram counts: successful attempts. An
        // attempt ends once (the core forgets it then), so none is counted twice.
        let run_us = r.timings.run_us;
        deltas.run_time((end.job, latency_bucket(run_us)), 1, run_us);
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
