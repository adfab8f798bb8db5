//! Deleting finished jobs, on request or once older than the retention:
//! a job goes in one transaction with its tasks, attempts, failures and
//! run-time histogram, so it is either all there or all gone, and with its
//! module once no job names that and nothing has for [`MODULE_GRACE`].

use rusqlite::{Connection, OptionalExtension};

use super::modules::{self, ModuleUses, MODULE_GRACE};
use super::schema::{self, from_sql, to_sql};
use super::{Changes, Store, StoreError};
use crate::model::{JobId, JobState};

/// What became of a request to delete a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Deleted, with this many tasks.
    Deleted {
        tasks: u64,
    },
    NotFound,
    /// Queued or running: it must be cancelled (or finish) first.
    NotFinished(JobState),
}

/// Most jobs one retention sweep reads at a time; each is deleted on its own.
const SWEEP_PAGE: u64 = 256;

impl Store {
    /// Deletes a finished job and everything recorded about it, after every
    /// record queued before. Grid-wide counters and histograms keep its share.
    pub fn delete_job(&self, id: JobId) -> Result<Deletion, StoreError> {
        let uses = self.inner.module_uses.clone();
        let deletion = self.call(false, move |conn| delete_job(conn, id, &uses))?;
        if matches!(deletion, Deletion::Deleted { .. }) {
            self.announce(Changes {
                deleted_jobs: vec![id],
                ..Changes::default()
            });
        }
        Ok(deletion)
    }

    /// Up to [`SWEEP_PAGE`] finished jobs that ended before `cutoff_ms` (unix ms), oldest first.
    pub fn finished_before(&self, cutoff_ms: i64) -> Result<Vec<JobId>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id FROM jobs
                 WHERE state IN ('completed', 'failed', 'cancelled') AND finished_at_ms < ?1
                 ORDER BY id LIMIT ?2",
            )?;
            let ids = statement
                .query_map([cutoff_ms, to_sql(SWEEP_PAGE)], |row| row.get::<_, i64>(0))?
                .map(|id| id.map(from_sql))
                .collect::<Result<Vec<JobId>, _>>()?;
            Ok(ids)
        })
    }

    /// Deletes every finished job that ended before `cutoff_ms`, one
    /// transaction each (commits of running jobs go in between); returns
    /// how many jobs were deleted.
    pub fn delete_finished_before(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let page = self.finished_before(cutoff_ms)?;
            if page.is_empty() {
                return Ok(deleted);
            }
            for id in page {
                if matches!(self.delete_job(id)?, Deletion::Deleted { .. }) {
                    deleted += 1;
                }
            }
        }
    }
}

fn delete_job(conn: &mut Connection, id: JobId, uses: &ModuleUses) -> Result<Deletion, StoreError> {
    let tx = conn.transaction()?;
    let found = tx
        .query_row(
            "SELECT state, total FROM jobs WHERE id = ?1",
            [to_sql(id)],
            |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
        )
        .optional()?;
    let Some((state, total)) = found else {
        return Ok(Deletion::NotFound);
    };
    let state = schema::job_state(&state)?;
    if !state.is_finished() {
        return Ok(Deletion::NotFinished(state));
    }
    let id = to_sql(id);
    for statement in [
        "DELETE FROM attempts WHERE job_id = ?1",
        "DELETE FROM worker_failures WHERE job_id = ?1",
        "DELETE FROM run_time_buckets WHERE job_id = ?1",
        "DELETE FROM tasks WHERE job_id = ?1",
        "DELETE FROM jobs WHERE id = ?1",
    ] {
        tx.prepare_cached(statement)?.execute([id])?;
    }
    tx.commit()?;
    // A transaction of its own: a big job's commit must not hold the lock
    // that accepting a job takes.
    if let Err(error) = modules::delete_unused(conn, uses, MODULE_GRACE) {
        tracing::warn!("deleting modules no job names: {error}");
    }
    Ok(Deletion::Deleted {
        tasks: from_sql(total),
    })
}
