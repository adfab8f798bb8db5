//! Numbers new jobs and holds each token to its cap on unfinished jobs, in
//! memory: a submission is accepted on the caller's thread, with no trip to
//! the writer thread and back, and the count is exact at every moment
//! (a job counts from its acceptance until the writer commits its end).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use super::queries;
use super::schema::from_sql;
use super::StoreError;
use crate::model::JobId;

pub(super) struct Admission {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// The id the next accepted job gets.
    next_id: JobId,
    /// Unfinished jobs (accepted, queued or running) per token.
    unfinished: HashMap<u64, u64>,
    /// The token of each unfinished job that came with one.
    owner: HashMap<JobId, u64>,
}

impl Admission {
    /// Seeded from the database: what a foreman that just started must count.
    pub(super) fn load(conn: &Connection) -> Result<Self, StoreError> {
        let mut counts = Counts {
            next_id: queries::next_job_id(conn)?,
            ..Counts::default()
        };
        let mut statement = conn.prepare(
            "SELECT id, token_id FROM jobs
             WHERE state IN ('queued', 'running') AND token_id IS NOT NULL",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                from_sql(row.get::<_, i64>(0)?),
                from_sql(row.get::<_, i64>(1)?),
            ))
        })?;
        for row in rows {
            let (job, token) = row?;
            counts.add(job, token);
        }
        Ok(Admission {
            counts: Mutex::new(counts),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An id for a new job, unless its token (first) already has as many
    /// unfinished jobs as its cap (second).
    pub(super) fn admit(&self, quota: Option<(u64, u64)>) -> Result<JobId, StoreError> {
        let mut counts = self.lock();
        if let Some((token, cap)) = quota {
            let unfinished = counts.unfinished.get(&token).copied().unwrap_or(0);
            if unfinished >= cap {
                return Err(StoreError::TooManyUnfinishedJobs {
                    token,
                    unfinished,
                    cap,
                });
            }
        }
        let id = counts.next_id;
        counts.next_id += 1;
        if let Some((token, _)) = quota {
            counts.add(id, token);
        }
        Ok(id)
    }

    /// The job ended, or was never stored: it no longer counts.
    pub(super) fn finished(&self, job: JobId) {
        let mut counts = self.lock();
        let Some(token) = counts.owner.remove(&job) else {
            return;
        };
        if let Some(unfinished) = counts.unfinished.get_mut(&token) {
            *unfinished = unfinished.saturating_sub(1);
            if *unfinished == 0 {
                counts.unfinished.remove(&token);
            }
        }
    }

    #[cfg(test)]
    pub(super) fn unfinished(&self, token: u64) -> u64 {
        self.lock().unfinished.get(&token).copied().unwrap_or(0)
    }
}

impl Counts {
    fn add(&mut self, job: JobId, token: u64) {
        if self.owner.insert(job, token).is_none() {
            *self.unfinished.entry(token).or_default() += 1;
        }
    }
}

/// Whether the module a job names is stored (read on the caller's connection).
pub(super) fn module_known(conn: &Connection, module: &[u8; 32]) -> Result<bool, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .prepare_cached("SELECT 1 FROM modules WHERE hash = ?1")?
        .query_row([&module[..]], |_| Ok(()))
        .optional()?
        .is_some())
}
