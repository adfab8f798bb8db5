//! Read-only views for the dashboard and monitoring: grid totals, a page of
//! a job's tasks, a job's summary, failures across workers, run times.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;
use wasmgrid_protocol::{Failure, FailureKind};

use super::queries::{required_text, text};
use super::schema::{self, from_sql, now_ms, to_sql, u32_from_sql};
use super::StoreError;
use crate::model::{JobId, TaskState, WorkerId};

/// `tasks_per_second` counts attempts that ended within this window.
pub const RATE_WINDOW_MS: u64 = 60_000;

/// Upper bounds (milliseconds) of the run-time histogram's buckets; one
/// more bucket, unbounded, follows.
pub const LATENCY_BUCKETS_MS: [u64; 18] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536,
    131_072,
];

/// The grid at a glance. Job and task figures come from the jobs' counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct Stats {
    pub total_jobs: u64,
    pub queued_jobs: u64,
    pub running_jobs: u64,
    pub completed_jobs: u64,
    pub failed_jobs: u64,
    pub cancelled_jobs: u64,
    /// Queued and running.
    pub pending_jobs: u64,
    pub connected_workers: u64,
    /// Slots of the connected workers.
    pub total_slots: u64,
    /// Tasks handed to workers: running, or waiting in a worker's prefetch
    /// window, so it can exceed `total_slots`.
    pub active_tasks: u64,
    /// Slots running a task: as dispatch counts them for the workers in
    /// `live` (see `Store::stats`), as of the last heartbeat for the others.
    pub busy_slots: u64,
    /// Tasks that succeeded.
    pub total_tasks_completed: u64,
    pub total_tasks_failed: u64,
    /// Tasks waiting for a slot.
    pub queued_tasks: u64,
    pub cancelled_tasks: u64,
    /// Attempts that ended (cancellations excluded) over the last 60 s, per second.
    pub tasks_per_second: f64,
    pub fuel_consumed: u64,
}

pub(super) fn stats(
    conn: &mut Connection,
    live: &HashMap<WorkerId, u32>,
) -> Result<Stats, StoreError> {
    let tx = conn.transaction()?;
    let mut s = Stats::default();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT state, count(*), sum(queued), sum(running), sum(succeeded), sum(failed),
                 sum(cancelled), sum(fuel_used)
             FROM jobs GROUP BY state",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let count = from_sql(row.get(1)?);
            match schema::job_state(required_text(row, 0)?)? {
                crate::model::JobState::Queued => s.queued_jobs = count,
                crate::model::JobState::Running => s.running_jobs = count,
                crate::model::JobState::Completed => s.completed_jobs = count,
                crate::model::JobState::Failed => s.failed_jobs = count,
                crate::model::JobState::Cancelled => s.cancelled_jobs = count,
            }
            s.total_jobs += count;
            s.queued_tasks += from_sql(row.get(2)?);
            s.active_tasks += from_sql(row.get(3)?);
            s.total_tasks_completed += from_sql(row.get(4)?);
            s.total_tasks_failed += from_sql(row.get(5)?);
            s.cancelled_tasks += from_sql(row.get(6)?);
            s.fuel_consumed = s.fuel_consumed.wrapping_add(from_sql(row.get(7)?));
        }
    }
    s.pending_jobs = s.queued_jobs + s.running_jobs;
    {
        let mut stmt = tx.prepare_cached("SELECT id, slots, running FROM workers WHERE online")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id: WorkerId = from_sql(row.get(0)?);
            s.connected_workers += 1;
            s.total_slots += from_sql(row.get(1)?);
            s.busy_slots += match live.get(&id) {
                Some(&busy) => u64::from(busy),
                None => from_sql(row.get(2)?),
            };
        }
    }
    let since = now_ms().saturating_sub(to_sql(RATE_WINDOW_MS));
    let ended: i64 = tx
        .prepare_cached(
            "SELECT count(*) FROM attempts
             WHERE ended_at_ms >= ?1 AND outcome_kind IS NOT 'Cancelled'",
        )?
        .query_row([since], |row| row.get(0))?;
    s.tasks_per_second = ended as f64 / (RATE_WINDOW_MS as f64 / 1000.0);
    tx.finish()?;
    Ok(s)
}

/// Time spent in each phase of an attempt, in microseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct TaskTimingsRow {
    pub load_us: u64,
    pub instantiate_us: u64,
    pub run_us: u64,
}

/// One task, with what its last attempt reported.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskRow {
    pub index: u32,
    pub state: TaskState,
    pub attempts: u32,
    /// The last attempt's worker.
    pub worker: Option<WorkerId>,
    pub worker_name: Option<String>,
    /// Every attempt's fuel.
    pub fuel_used: u64,
    pub timings: Option<TaskTimingsRow>,
    /// The task's result once it succeeded.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Box<RawValue>>,
    pub failure: Option<Failure>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// A page of tasks; `total` counts every task that matches the filter.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskPage {
    pub total: u64,
    pub tasks: Vec<TaskRow>,
}

pub(super) fn tasks(
    conn: &mut Connection,
    job: JobId,
    skip: u64,
    limit: u64,
    state: Option<TaskState>,
) -> Result<Option<TaskPage>, StoreError> {
    let tx = conn.transaction()?;
    // The job's counters give the total without counting its tasks.
    let total: Option<i64> = tx
        .prepare_cached(
            "SELECT CASE ?2 WHEN 'queued' THEN queued WHEN 'running' THEN running
                 WHEN 'succeeded' THEN succeeded WHEN 'failed' THEN failed
                 WHEN 'cancelled' THEN cancelled ELSE total END
             FROM jobs WHERE id = ?1",
        )?
        .query_row(params![to_sql(job), state.map(TaskState::as_str)], |row| {
            row.get(0)
        })
        .optional()?;
    let Some(total) = total else {
        return Ok(None);
    };
    let mut out = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT t.idx, t.state, t.attempts, coalesce(a.worker_id, t.worker_id), w.name,
                 t.fuel_used, t.result, t.failure_kind, t.failure_message,
                 a.load_us, a.instantiate_us, a.run_us, a.stdout, a.stderr,
                 a.stdout_truncated, a.stderr_truncated
             FROM tasks t
             LEFT JOIN attempts a ON a.id =
                 (SELECT max(id) FROM attempts WHERE job_id = t.job_id AND idx = t.idx)
             LEFT JOIN workers w ON w.id = coalesce(a.worker_id, t.worker_id)
             WHERE t.job_id = ?1 AND (?2 IS NULL OR t.state = ?2)
             ORDER BY t.idx LIMIT ?3 OFFSET ?4",
        )?;
        let mut rows = stmt.query(params![
            to_sql(job),
            state.map(TaskState::as_str),
            i64::try_from(limit).unwrap_or(i64::MAX),
            i64::try_from(skip).unwrap_or(i64::MAX),
        ])?;
        while let Some(row) = rows.next()? {
            let failure = match text(row, 7)? {
                Some(kind) => Some(Failure {
                    kind: schema::failure_kind(kind)?,
                    message: row.get::<_, Option<String>>(8)?.unwrap_or_default(),
                }),
                None => None,
            };
            let result = match row.get::<_, Option<String>>(6)? {
                Some(json) => Some(
                    RawValue::from_string(json)
                        .map_err(|e| StoreError::Corrupt(format!("task result: {e}")))?,
                ),
                None => None,
            };
            let timings = match (row.get::<_, Option<i64>>(11)?, row.get(9)?, row.get(10)?) {
                (Some(run), Some(load), Some(instantiate)) => Some(TaskTimingsRow {
                    load_us: from_sql(load),
                    instantiate_us: from_sql(instantiate),
                    run_us: from_sql(run),
                }),
                _ => None,
            };
            out.push(TaskRow {
                index: u32_from_sql(row.get(0)?)?,
                state: schema::task_state(required_text(row, 1)?)?,
                attempts: u32_from_sql(row.get(2)?)?,
                worker: row.get::<_, Option<i64>>(3)?.map(from_sql),
                worker_name: row.get(4)?,
                fuel_used: from_sql(row.get(5)?),
                timings,
                result,
                failure,
                stdout: row.get::<_, Option<String>>(12)?.unwrap_or_default(),
                stderr: row.get::<_, Option<String>>(13)?.unwrap_or_default(),
                stdout_truncated: row.get::<_, Option<bool>>(14)?.unwrap_or(false),
                stderr_truncated: row.get::<_, Option<bool>>(15)?.unwrap_or(false),
            });
        }
    }
    tx.finish()?;
    Ok(Some(TaskPage {
        total: from_sql(total),
        tasks: out,
    }))
}

/// Attempts of one job on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct WorkerShare {
    pub worker: WorkerId,
    pub name: Option<String>,
    /// Attempts this worker ended for the job.
    pub tasks: u64,
    pub fuel_used: u64,
    /// Time its slots spent instantiating and running the job's tasks, in µs.
    pub busy_us: u64,
}

/// One histogram bucket: attempts whose run time is at most `le`
/// milliseconds and above the previous bucket's (`le` null: the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct LatencyBucket {
    pub le: Option<u64>,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct JobSummary {
    /// Tasks that ended failed or cancelled, by the kind of their failure.
    pub failures_by_kind: BTreeMap<String, u64>,
    pub by_worker: Vec<WorkerShare>,
    /// Successful attempts' run time; counts are per bucket, not cumulative.
    pub latency_ms: Vec<LatencyBucket>,
}

pub(super) fn job_summary(
    conn: &mut Connection,
    job: JobId,
) -> Result<Option<JobSummary>, StoreError> {
    let tx = conn.transaction()?;
    let known = tx
        .prepare_cached("SELECT 1 FROM jobs WHERE id = ?1")?
        .query_row([to_sql(job)], |_| Ok(()))
        .optional()?;
    if known.is_none() {
        return Ok(None);
    }
    let mut failures_by_kind = BTreeMap::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT failure_kind, count(*) FROM tasks
             WHERE job_id = ?1 AND failure_kind IS NOT NULL GROUP BY failure_kind",
        )?;
        let mut rows = stmt.query([to_sql(job)])?;
        while let Some(row) = rows.next()? {
            failures_by_kind.insert(required_text(row, 0)?.to_owned(), from_sql(row.get(1)?));
        }
    }
    let mut by_worker = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT a.worker_id, w.name, count(*), coalesce(sum(a.fuel_used), 0),
                    coalesce(sum(a.instantiate_us), 0) + coalesce(sum(a.run_us), 0)
             FROM attempts a LEFT JOIN workers w ON w.id = a.worker_id
             WHERE a.job_id = ?1 AND a.ended_at_ms IS NOT NULL
             GROUP BY a.worker_id ORDER BY a.worker_id",
        )?;
        let mut rows = stmt.query([to_sql(job)])?;
        while let Some(row) = rows.next()? {
            by_worker.push(WorkerShare {
                worker: from_sql(row.get(0)?),
                name: row.get(1)?,
                tasks: from_sql(row.get(2)?),
                fuel_used: from_sql(row.get(3)?),
                busy_us: from_sql(row.get(4)?),
            });
        }
    }
    let histogram = run_time_histogram(&tx, Some(job))?;
    tx.finish()?;
    let latency_ms = histogram
        .counts
        .iter()
        .enumerate()
        .map(|(i, &count)| LatencyBucket {
            le: LATENCY_BUCKETS_MS.get(i).copied(),
            count,
        })
        .collect();
    Ok(Some(JobSummary {
        failures_by_kind,
        by_worker,
        latency_ms,
    }))
}

/// Successful attempts' run times: `counts[i]` per bucket of
/// [`LATENCY_BUCKETS_MS`] (not cumulative; the last is unbounded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunTimeHistogram {
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

/// The bucket of [`LATENCY_BUCKETS_MS`] a run time falls in (the last,
/// unbounded one past every bound).
pub(super) fn latency_bucket(run_us: u64) -> usize {
    LATENCY_BUCKETS_MS
        .iter()
        .position(|&le| run_us <= le * 1000)
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// `job_id` under which `run_time_buckets` holds the grid-wide histogram.
pub(super) const GRID_RUN_TIMES: i64 = 0;

/// The run-time histogram of `job`'s successful attempts, or of every job's:
/// at most one row per bucket, kept up to date by the writer.
pub(super) fn run_time_histogram(
    conn: &Connection,
    job: Option<JobId>,
) -> Result<RunTimeHistogram, StoreError> {
    let mut h = RunTimeHistogram {
        counts: vec![0; LATENCY_BUCKETS_MS.len() + 1],
        sum_us: 0,
    };
    let mut stmt = conn
        .prepare_cached("SELECT bucket, count, sum_us FROM run_time_buckets WHERE job_id = ?1")?;
    let mut rows = stmt.query([job.map_or(GRID_RUN_TIMES, to_sql)])?;
    while let Some(row) = rows.next()? {
        let bucket: i64 = row.get(0)?;
        let slot = usize::try_from(bucket)
            .ok()
            .and_then(|b| h.counts.get_mut(b))
            .ok_or_else(|| StoreError::Corrupt(format!("run-time bucket {bucket}")))?;
        *slot += from_sql(row.get(1)?);
        h.sum_us = h.sum_us.wrapping_add(from_sql(row.get(2)?));
    }
    Ok(h)
}

/// The histogram as it was computed before `run_time_buckets`, by scanning
/// every successful attempt (or one job's): the oracle the table is
/// checked against.
#[cfg(test)]
pub(super) fn run_time_histogram_scan(
    conn: &Connection,
    job: Option<JobId>,
) -> Result<RunTimeHistogram, StoreError> {
    let mut h = RunTimeHistogram {
        counts: vec![0; LATENCY_BUCKETS_MS.len() + 1],
        sum_us: 0,
    };
    let sql = if job.is_some() {
        "SELECT run_us FROM attempts
         WHERE job_id = ?1 AND ended_at_ms IS NOT NULL AND outcome_kind IS NULL
             AND run_us IS NOT NULL"
    } else {
        "SELECT run_us FROM attempts
         WHERE ?1 IS NULL AND ended_at_ms IS NOT NULL AND outcome_kind IS NULL
             AND run_us IS NOT NULL"
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query([job.map(to_sql)])?;
    while let Some(row) = rows.next()? {
        let us = from_sql(row.get(0)?);
        h.sum_us = h.sum_us.wrapping_add(us);
        h.counts[latency_bucket(us)] += 1;
    }
    Ok(h)
}

/// One failed attempt, on any worker; or a protocol violation not tied to
/// an attempt (`ProtocolViolation` with attempt, job and task 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FailureRow {
    pub attempt: u64,
    pub worker: WorkerId,
    pub job: JobId,
    pub task: u32,
    pub kind: FailureKind,
    pub message: String,
    pub at_ms: u64,
}

pub(super) fn failures(
    conn: &mut Connection,
    worker: Option<WorkerId>,
    kind: Option<FailureKind>,
    skip: u64,
    limit: u64,
) -> Result<Vec<FailureRow>, StoreError> {
    let tx = conn.transaction()?;
    if let Some(worker) = worker {
        let known = tx
            .prepare_cached("SELECT 1 FROM workers WHERE id = ?1")?
            .query_row([to_sql(worker)], |_| Ok(()))
            .optional()?;
        if known.is_none() {
            return Err(StoreError::UnknownWorker(worker));
        }
    }
    let mut out = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT attempt, worker_id, job_id, idx, kind, message, at_ms FROM worker_failures
             WHERE (?1 IS NULL OR worker_id = ?1) AND (?2 IS NULL OR kind = ?2)
             ORDER BY at_ms DESC, attempt DESC LIMIT ?3 OFFSET ?4",
        )?;
        let mut rows = stmt.query(params![
            worker.map(to_sql),
            kind.map(FailureKind::as_str),
            i64::try_from(limit).unwrap_or(i64::MAX),
            i64::try_from(skip).unwrap_or(i64::MAX),
        ])?;
        while let Some(row) = rows.next()? {
            // Violations not tied to an attempt are keyed below 0.
            let attempt: i64 = row.get(0)?;
            out.push(FailureRow {
                attempt: from_sql(attempt.max(0)),
                worker: from_sql(row.get(1)?),
                job: from_sql(row.get(2)?),
                task: u32_from_sql(row.get(3)?)?,
                kind: schema::failure_kind(required_text(row, 4)?)?,
                message: row.get(5)?,
                at_ms: from_sql(row.get(6)?),
            });
        }
    }
    tx.finish()?;
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct WorkerFailureCount {
    pub worker: WorkerId,
    pub name: Option<String>,
    pub failures: u64,
}

/// Failed attempts (cancellations excluded) counted by worker and by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FailureStats {
    pub by_worker: Vec<WorkerFailureCount>,
    pub by_kind: BTreeMap<String, u64>,
}

pub(super) fn failure_stats(conn: &mut Connection) -> Result<FailureStats, StoreError> {
    let tx = conn.transaction()?;
    let mut by_worker = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT f.worker_id, w.name, count(*) FROM worker_failures f
             LEFT JOIN workers w ON w.id = f.worker_id
             GROUP BY f.worker_id ORDER BY f.worker_id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            by_worker.push(WorkerFailureCount {
                worker: from_sql(row.get(0)?),
                name: row.get(1)?,
                failures: from_sql(row.get(2)?),
            });
        }
    }
    let mut by_kind = BTreeMap::new();
    {
        let mut stmt =
            tx.prepare_cached("SELECT kind, count(*) FROM worker_failures GROUP BY kind")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            by_kind.insert(required_text(row, 0)?.to_owned(), from_sql(row.get(1)?));
        }
    }
    tx.finish()?;
    Ok(FailureStats { by_worker, by_kind })
}
