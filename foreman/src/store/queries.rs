//! One-shot operations. Writes (`put_module`, `create_job`, workers) run on
//! the writer thread's connection, between record batches; reads run on
//! pooled read connections, and those that read more than one statement do
//! so in one read transaction, so they see one snapshot.

use rusqlite::types::ValueRef;

use rusqlite::{params, Connection, OptionalExtension, Row};
use wasmgrid_protocol::wire::{Load, ModuleHash, SlotPriority, WorkerInfo};
use wasmgrid_protocol::{Failure, TaskLimits};

use super::schema::{self, from_sql, now_ms, to_sql, u32_from_sql};
use super::{
    JobRow, StoreError, TaskOutcomeRow, UnfinishedJob, WorkerRow, RECENT_FAILURES_WINDOW_MS,
};
use crate::model::{JobId, JobSpec, JobState, WorkerId};

const JOB_COLUMNS: &str = "id, module, state, priority, scheduler, fuel, memory_bytes, timeout_ms,
    output_bytes, max_retries, total, queued, running, succeeded, failed, cancelled, fuel_used,
    created_at_ms, started_at_ms, finished_at_ms, not_before_ms, retry_deterministic,
    result_bytes, token_id";

/// `?1`: failures at or after this time count as recent.
const WORKER_COLUMNS: &str = "id, name, hostname, os, arch, cores, memory_bytes, slots,
    wasmtime_version, engine_hash, cpu_model, benchmark_fuel_per_sec, cpu_limit_percent,
    online, draining, last_seen_ms, cpu_permille, memory_used_bytes, worker_rss_bytes, running,
    cooldown_until_ms, cooldowns, tasks_succeeded, tasks_failed, last_heartbeat_ms, fuel_used,
    (SELECT count(*) FROM worker_failures f WHERE f.worker_id = workers.id AND f.at_ms >= ?1),
    priority";

/// The id the next job gets. The store's admission hands out ids from here
/// on, so a job's id is known before it commits.
pub(super) fn next_job_id(conn: &Connection) -> Result<JobId, StoreError> {
    let last: i64 = conn.query_row(
        "SELECT max(coalesce((SELECT max(id) FROM jobs), 0),
                    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0))",
        [],
        |row| row.get(0),
    )?;
    Ok(schema::from_sql(last) + 1)
}

pub(super) fn upsert_worker(
    conn: &mut Connection,
    w: &WorkerRow,
    token: Option<u64>,
) -> Result<WorkerId, StoreError> {
    let i = &w.info;
    // A worker that joins again starts afresh: not draining, its old load gone.
    let id: i64 = conn.query_row(
        "INSERT INTO workers (name, hostname, os, arch, cores, memory_bytes, slots,
             wasmtime_version, engine_hash, cpu_model, benchmark_fuel_per_sec, cpu_limit_percent,
             online, first_seen_ms, last_seen_ms, token_id, priority)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15, ?16)
         ON CONFLICT (name, hostname) DO UPDATE SET os = excluded.os, arch = excluded.arch,
             cores = excluded.cores, memory_bytes = excluded.memory_bytes,
             slots = excluded.slots, wasmtime_version = excluded.wasmtime_version,
             engine_hash = excluded.engine_hash, cpu_model = excluded.cpu_model,
             benchmark_fuel_per_sec = excluded.benchmark_fuel_per_sec,
             cpu_limit_percent = excluded.cpu_limit_percent, priority = excluded.priority,
             online = excluded.online,
             last_seen_ms = excluded.last_seen_ms, token_id = excluded.token_id, draining = 0, running = 0,
             cpu_permille = 0, memory_used_bytes = 0, worker_rss_bytes = 0,
             last_heartbeat_ms = NULL
         RETURNING id",
        params![
            i.name,
            i.hostname,
            i.os,
            i.arch,
            i.cores,
            to_sql(i.memory_bytes),
            i.slots,
            i.wasmtime_version,
            i.engine_hash,
            i.cpu_model,
            to_sql(i.benchmark_fuel_per_sec),
            i.cpu_limit_percent,
            w.online,
            now_ms(),
            token.map(to_sql),
            i.priority.as_str(),
        ],
        |row| row.get(0),
    )?;
    Ok(schema::from_sql(id))
}

pub(super) fn set_worker_online(
    conn: &mut Connection,
    id: WorkerId,
    online: bool,
) -> Result<(), StoreError> {
    let changed = conn.execute(
        // Nothing runs on a worker that is gone, whatever its last heartbeat said.
        "UPDATE workers SET online = ?2, last_seen_ms = ?3,
             running = CASE WHEN ?2 THEN running ELSE 0 END
         WHERE id = ?1",
        params![to_sql(id), online, now_ms()],
    )?;
    if changed == 0 {
        return Err(StoreError::UnknownWorker(id));
    }
    Ok(())
}

pub(super) fn job(conn: &mut Connection, id: JobId) -> Result<Option<JobRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?;
    let mut rows = stmt.query([to_sql(id)])?;
    rows.next()?.map(job_row).transpose()
}

pub(super) fn jobs(
    conn: &mut Connection,
    skip: u64,
    limit: u64,
    state: Option<JobState>,
) -> Result<Vec<JobRow>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let skip = i64::try_from(skip).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    let (sql, filter) = match state {
        None => (
            format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?1 OFFSET ?2"),
            None,
        ),
        Some(state) => (
            format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state = ?3 ORDER BY id DESC LIMIT ?1 OFFSET ?2"
            ),
            Some(state.as_str()),
        ),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = match filter {
        None => stmt.query(params![limit, skip])?,
        Some(state) => stmt.query(params![limit, skip, state])?,
    };
    while let Some(row) = rows.next()? {
        out.push(job_row(row)?);
    }
    Ok(out)
}

pub(super) fn results(
    conn: &mut Connection,
    id: JobId,
) -> Result<Option<Vec<TaskOutcomeRow>>, StoreError> {
    let tx = conn.transaction()?;
    let total: Option<i64> = tx
        .prepare_cached("SELECT total FROM jobs WHERE id = ?1")?
        .query_row([to_sql(id)], |row| row.get(0))
        .optional()?;
    let Some(total) = total else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    {
        let mut stmt = tx.prepare_cached(
            "SELECT idx, state, result, failure_kind, failure_message, attempts
             FROM tasks WHERE job_id = ?1 ORDER BY idx",
        )?;
        let mut rows = stmt.query([to_sql(id)])?;
        while let Some(row) = rows.next()? {
            let failure = match text(row, 3)? {
                Some(kind) => Some(Failure {
                    kind: schema::failure_kind(kind)?,
                    message: row.get::<_, Option<String>>(4)?.unwrap_or_default(),
                }),
                None => None,
            };
            out.push(TaskOutcomeRow {
                index: u32_from_sql(row.get(0)?)?,
                state: schema::task_state(required_text(row, 1)?)?,
                result: row.get(2)?,
                failure,
                attempts: u32_from_sql(row.get(5)?)?,
            });
        }
    }
    tx.finish()?;
    Ok(Some(out))
}

pub(super) fn unfinished_jobs(conn: &mut Connection) -> Result<Vec<UnfinishedJob>, StoreError> {
    let tx = conn.transaction()?;
    let mut jobs = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') ORDER BY id"
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            jobs.push(job_row(row)?);
        }
    }
    let mut out = Vec::with_capacity(jobs.len());
    {
        let mut stmt = tx.prepare_cached(
            "SELECT args, state, attempts FROM tasks WHERE job_id = ?1 ORDER BY idx",
        )?;
        for job in jobs {
            let mut args = Vec::with_capacity(job.total as usize);
            let mut tasks = Vec::with_capacity(job.total as usize);
            let mut rows = stmt.query([to_sql(job.id)])?;
            while let Some(row) = rows.next()? {
                args.push(row.get(0)?);
                tasks.push((
                    schema::task_state(required_text(row, 1)?)?,
                    u32_from_sql(row.get(2)?)?,
                ));
            }
            let module = hex::decode(&job.module)
                .ok()
                .and_then(|bytes| ModuleHash::try_from(bytes).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("module hash {}", job.module)))?;
            out.push(UnfinishedJob {
                spec: JobSpec {
                    id: job.id,
                    module,
                    limits: job.limits,
                    max_retries: job.max_retries,
                    priority: job.priority,
                    task_count: job.total,
                    scheduler: job.scheduler,
                    not_before_ms: job.not_before_ms,
                    retry_deterministic: job.retry_deterministic,
                },
                state: job.state,
                args,
                tasks,
            });
        }
    }
    tx.finish()?;
    Ok(out)
}

pub(super) fn next_attempt_id(conn: &mut Connection) -> Result<u64, StoreError> {
    let max: i64 = conn
        .prepare_cached("SELECT coalesce(max(id), 0) FROM attempts")?
        .query_row([], |row| row.get(0))?;
    Ok(from_sql(max).wrapping_add(1))
}

/// Every worker by id, or only `only`.
pub(super) fn workers(
    conn: &mut Connection,
    only: Option<WorkerId>,
) -> Result<Vec<WorkerRow>, StoreError> {
    let recent_since = now_ms().saturating_sub(to_sql(RECENT_FAILURES_WINDOW_MS));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {WORKER_COLUMNS} FROM workers WHERE ?2 IS NULL OR id = ?2 ORDER BY id"
    ))?;
    let mut rows = stmt.query(params![recent_since, only.map(to_sql)])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(WorkerRow {
            id: from_sql(row.get(0)?),
            info: WorkerInfo {
                name: row.get(1)?,
                hostname: row.get(2)?,
                os: row.get(3)?,
                arch: row.get(4)?,
                cores: u32_from_sql(row.get(5)?)?,
                memory_bytes: from_sql(row.get(6)?),
                slots: u32_from_sql(row.get(7)?)?,
                wasmtime_version: row.get(8)?,
                engine_hash: row.get(9)?,
                cpu_model: row.get(10)?,
                benchmark_fuel_per_sec: from_sql(row.get(11)?),
                cpu_limit_percent: u32_from_sql(row.get(12)?)?,
                // A name this foreman does not know came from a newer one: as `normal`.
                priority: SlotPriority::from_name(&row.get::<_, String>(27)?).unwrap_or_default(),
            },
            online: row.get(13)?,
            draining: row.get(14)?,
            last_seen_ms: from_sql(row.get(15)?),
            load: Load {
                cpu_permille: u32_from_sql(row.get(16)?)?,
                memory_used_bytes: from_sql(row.get(17)?),
                worker_rss_bytes: from_sql(row.get(18)?),
                running: u32_from_sql(row.get(19)?)?,
            },
            cooldown_until_ms: row.get::<_, Option<i64>>(20)?.map(from_sql),
            cooldowns: from_sql(row.get(21)?),
            tasks_succeeded: from_sql(row.get(22)?),
            tasks_failed: from_sql(row.get(23)?),
            last_heartbeat_ms: row.get::<_, Option<i64>>(24)?.map(from_sql),
            fuel_used: from_sql(row.get(25)?),
            recent_failures: u32_from_sql(row.get(26)?)?,
        });
    }
    Ok(out)
}

/// A row selected with `JOB_COLUMNS`.
fn job_row(row: &Row<'_>) -> Result<JobRow, StoreError> {
    let module: Vec<u8> = row.get(1)?;
    Ok(JobRow {
        id: from_sql(row.get(0)?),
        module: hex::encode(module),
        state: schema::job_state(required_text(row, 2)?)?,
        priority: row.get(3)?,
        scheduler: schema::scheduler(required_text(row, 4)?)?,
        not_before_ms: row.get::<_, Option<i64>>(20)?.map(from_sql),
        retry_deterministic: row.get(21)?,
        limits: TaskLimits {
            fuel: from_sql(row.get(5)?),
            memory_bytes: from_sql(row.get(6)?),
            timeout_ms: from_sql(row.get(7)?),
            output_bytes: u32_from_sql(row.get(8)?)?,
            result_bytes: u32_from_sql(row.get(22)?)?,
        },
        max_retries: u32_from_sql(row.get(9)?)?,
        total: u32_from_sql(row.get(10)?)?,
        queued: u32_from_sql(row.get(11)?)?,
        running: u32_from_sql(row.get(12)?)?,
        succeeded: u32_from_sql(row.get(13)?)?,
        failed: u32_from_sql(row.get(14)?)?,
        cancelled: u32_from_sql(row.get(15)?)?,
        fuel_used: from_sql(row.get(16)?),
        created_at_ms: from_sql(row.get(17)?),
        started_at_ms: row.get::<_, Option<i64>>(18)?.map(from_sql),
        finished_at_ms: row.get::<_, Option<i64>>(19)?.map(from_sql),
        token_id: row.get::<_, Option<i64>>(23)?.map(from_sql),
    })
}

/// A nullable text column, borrowed from the row.
pub(super) fn text<'r>(row: &'r Row<'_>, i: usize) -> Result<Option<&'r str>, StoreError> {
    match row.get_ref(i)? {
        ValueRef::Null => Ok(None),
        value => Ok(Some(value.as_str().map_err(rusqlite::Error::from)?)),
    }
}

pub(super) fn required_text<'r>(row: &'r Row<'_>, i: usize) -> Result<&'r str, StoreError> {
    text(row, i)?.ok_or_else(|| StoreError::Corrupt(format!("NULL in column {i}")))
}
