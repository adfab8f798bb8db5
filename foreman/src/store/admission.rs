//! Taking in new jobs: each is checked, numbered and held to its token's
//! cap on unfinished jobs in memory, on the caller's thread, with no trip to
//! the writer thread and back (the count is exact at every moment: a job
//! counts from its acceptance until the writer commits its end); its insert
//! is then queued for the writer like any record.

use std::collections::HashMap;
use std::sync::{mpsc, Mutex, MutexGuard};

use rusqlite::Connection;

use super::schema::{self, from_sql};
use super::writer::{Change, Command, NewJobRow, Reply};
use super::{queries, InsertCommit, NewJob, PendingJob, Store, StoreError};
use crate::model::{JobId, JobSpec};

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

impl Store {
    /// Accepts a job: allocates its id, stores the job and one task per
    /// argument set in one transaction. Durable when it returns.
    pub fn create_job(&self, job: NewJob) -> Result<JobSpec, StoreError> {
        self.create_job_for(job, None)
    }

    /// [`Store::create_job`], recording the client token that submitted it.
    pub fn create_job_for(&self, job: NewJob, token: Option<u64>) -> Result<JobSpec, StoreError> {
        self.create_job_within(job, token.map(|token| (token, u64::MAX)))
    }

    /// [`Store::create_job_for`], refused when the token (first) already has
    /// as many queued or running jobs as its cap (second).
    pub fn create_job_within(
        &self,
        job: NewJob,
        quota: Option<(u64, u64)>,
    ) -> Result<JobSpec, StoreError> {
        let (stored, done) = mpsc::sync_channel(1);
        let spec = self.admit_job(job, quota, Reply::Blocking(stored), InsertCommit::AtOnce)?;
        done.recv().map_err(|_| StoreError::Closed)??;
        Ok(spec)
    }

    /// [`Store::create_job_within`] for async callers, in two steps: the
    /// job's spec comes back at once, checked and numbered on the caller's
    /// thread, before it is stored, so the caller can dispatch it; `commit`
    /// says whether its insert waits, like an attempt's start, to commit
    /// with what follows. The caller awaits [`Store::job_stored`] before
    /// saying the job was accepted.
    pub fn insert_job(
        &self,
        job: NewJob,
        quota: Option<(u64, u64)>,
        commit: InsertCommit,
    ) -> Result<(JobSpec, PendingJob), StoreError> {
        let (stored, done) = tokio::sync::oneshot::channel();
        let spec = self.admit_job(job, quota, Reply::Async(stored), commit)?;
        Ok((spec, PendingJob { stored: done }))
    }

    /// Checks a job (its module is stored, its token is under its cap),
    /// numbers it and queues its insert; `stored` is answered once it commits.
    fn admit_job(
        &self,
        job: NewJob,
        quota: Option<(u64, u64)>,
        stored: Reply<Result<(), StoreError>>,
        commit: InsertCommit,
    ) -> Result<JobSpec, StoreError> {
        let task_count = u32::try_from(job.args.len())
            .map_err(|_| StoreError::InvalidJob(format!("{} tasks is too many", job.args.len())))?;
        if !self.name_module(&job.module)? {
            return Err(StoreError::UnknownModule(hex::encode(job.module)));
        }
        let id = self.inner.admission.admit(quota)?;
        let spec = JobSpec {
            id,
            module: job.module,
            limits: job.limits,
            max_retries: job.max_retries,
            priority: job.priority,
            task_count,
            scheduler: job.scheduler,
            not_before_ms: job.not_before_ms,
            retry_deterministic: job.retry_deterministic,
        };
        let row = NewJobRow {
            id,
            job,
            token: quota.map(|(token, _)| token),
            created_at_ms: schema::now_ms(),
            stored: Some(stored),
            commit,
        };
        if let Err(error) = self.try_send(Command::Changes(vec![Change::NewJob(Box::new(row))])) {
            self.inner.admission.finished(id);
            return Err(error);
        }
        Ok(spec)
    }

    /// Waits until a job from [`Store::insert_job`] is committed.
    pub async fn job_stored(&self, pending: PendingJob) -> Result<(), StoreError> {
        pending.stored.await.map_err(|_| StoreError::Closed)?
    }
}
