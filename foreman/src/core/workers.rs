//! Workers coming and going: joins, credit, leaving, draining and handing
//! attempts back.

use wasmgrid_protocol::wire::AttemptId;
use wasmgrid_protocol::{Failure, FailureKind};

use super::pool::WorkerSpec;
use super::{Command, Core};
use crate::model::{Record, TaskState, WorkerId};

impl Core {
    /// A worker connected. It gets no credit until [`Core::grant_credit`].
    /// A worker id already connected is treated as having left first.
    /// A worker still in its cooldown stays cooling after a reconnect.
    pub fn worker_joined(&mut self, worker: WorkerId, spec: WorkerSpec) {
        if self.pool.get(worker).is_some() {
            self.worker_left(worker);
        }
        self.pool.join(worker, spec);
        self.backlog.joined(worker);
        if let Some(until) = self.cooling_until(worker) {
            self.pool.set_cooling(worker, Some(until));
        }
    }

    /// The worker can take `n` more tasks. Credit accumulates. Unknown workers are ignored.
    /// Credit past [`Core::max_credit`] is a protocol violation.
    pub fn grant_credit(&mut self, worker: WorkerId, n: u32) {
        if n > 0 && self.credit_allowed(worker, n) {
            self.pool.grant(worker, n);
        }
    }

    /// The worker went away: every attempt it held ends as `WorkerLost` and is
    /// retried at the front of the queue (lowest attempt first) or fails once
    /// its retries are used up. Its credit is gone.
    pub fn worker_left(&mut self, worker: WorkerId) {
        let Some(gone) = self.pool.leave(worker) else {
            return;
        };
        self.backlog.left(worker);
        let mut held: Vec<AttemptId> = gone.held.into_keys().collect();
        held.sort_unstable();
        let mut requeue = Vec::new();
        for attempt in held {
            let Some(h) = self.live.remove(&attempt) else {
                continue;
            };
            self.lost.insert(attempt, h);
            self.lost_at.push_back((self.now_ms, attempt));
            self.released_without_report(worker, attempt);
            let failure = Failure::new(
                FailureKind::WorkerLost,
                format!("worker {worker} went away"),
            );
            match self.abandon_running(h, attempt, failure) {
                Some(TaskState::Queued) => {
                    requeue.push((h.job, h.task));
                    self.queued += 1;
                }
                Some(_) => self.maybe_finish(h.job),
                None => {}
            }
        }
        if !requeue.is_empty() {
            self.infrastructure_failure(worker);
        }
        for (job, task) in requeue.into_iter().rev() {
            self.requeue_front(job, task);
        }
    }

    /// The worker is leaving: it takes no more tasks; what it holds stays
    /// its until reported or handed back.
    pub fn worker_draining(&mut self, worker: WorkerId) {
        self.pool.set_draining(worker);
    }

    /// The worker hands these attempts back unstarted: each task is queued
    /// again at the front, the attempt not counted. Attempts it does not
    /// hold are ignored. Those asked back for an idle worker start there
    /// at once if it still has room.
    pub fn attempts_returned(&mut self, worker: WorkerId, attempts: &[AttemptId]) {
        let mut requeue = Vec::new();
        let mut for_idle = Vec::new();
        for &attempt in attempts {
            let Some(held) = self.live.get(&attempt).copied() else {
                continue;
            };
            if held.worker != worker {
                continue;
            }
            let recalled_for = self.recalled_for(attempt);
            self.live.remove(&attempt);
            self.pool.release(worker, attempt);
            let Some(job) = self.jobs.get_mut(&held.job) else {
                continue;
            };
            let Some(task) = job.tasks.get_mut(held.task as usize) else {
                continue;
            };
            task.current = None;
            task.attempts = task.attempts.saturating_sub(1);
            task.state = TaskState::Queued;
            job.progress
                .move_task(TaskState::Running, TaskState::Queued);
            self.queued += 1;
            let why = match recalled_for {
                Some(idle) => {
                    format!("handed back unstarted by worker {worker} for idle worker {idle}")
                }
                None => format!("handed back unstarted by draining worker {worker}"),
            };
            self.commands
                .push_back(Command::Record(Record::AttemptAbandoned {
                    job: held.job,
                    task: held.task,
                    attempt,
                    worker,
                    failure: Failure::new(FailureKind::Cancelled, why),
                    task_state: TaskState::Queued,
                }));
            requeue.push((held.job, held.task));
            if let Some(idle) = recalled_for {
                for_idle.push((held.job, held.task, idle));
            }
        }
        // In the order handed back, ahead of everything else.
        for (job, task) in requeue.into_iter().rev() {
            self.requeue_front(job, task);
        }
        self.hand_to_idle(&for_idle);
    }
}
