//! Who goes next: [`Core::dispatch`] (which queued task goes to which
//! worker), the queue of tasks waiting for a worker, and the rotation of
//! workers that have free credit. Both are O(1) amortized per operation;
//! entries that went stale (a task finished or cancelled while queued, a
//! worker that left) are skipped when they reach the front, never searched for.

use std::collections::{HashMap, HashSet, VecDeque};

use wasmgrid_protocol::wire::{Assignment, AttemptId};

use super::{Command, Core, Held};
use crate::model::{JobId, JobState, Record, TaskIndex, TaskState, WorkerId};

impl Core {
    /// Assigns queued tasks to workers with free credit and emits one `Send`
    /// per worker served. Workers are dealt chunks in rotation, so a short
    /// queue is spread evenly instead of filling the first worker; workers
    /// left unserved are first in line next time.
    pub fn dispatch(&mut self) {
        if self.queued == 0 {
            return;
        }
        let chunk = self.queued.div_ceil(self.pool.ring_len().max(1)).max(1);
        let mut batches: Vec<(WorkerId, Vec<Assignment>)> = Vec::new();
        let mut batch_of: HashMap<WorkerId, usize> = HashMap::new();
        while self.queued > 0 {
            let Some(worker) = self.pool.next_ready() else {
                break;
            };
            let free = self.pool.get(worker).map_or(0, |w| w.free as usize);
            let slot = *batch_of.entry(worker).or_insert_with(|| {
                batches.push((worker, Vec::new()));
                batches.len() - 1
            });
            let mut given = 0;
            while given < chunk.min(free) {
                let Some((job, task)) = self.pop_queued() else {
                    break;
                };
                if let Some(assignment) = self.start_attempt(job, task, worker) {
                    batches[slot].1.push(assignment);
                    given += 1;
                }
            }
            if given == 0 {
                // The queue ran dry (counts and queue disagree only on a bug).
                self.pool.enlist(worker, true);
                break;
            }
            self.pool.enlist(worker, false);
        }
        for (worker, assignments) in batches {
            if !assignments.is_empty() {
                self.commands.push_back(Command::Send {
                    worker,
                    assignments,
                });
            }
        }
    }

    fn pop_queued(&mut self) -> Option<(JobId, TaskIndex)> {
        let jobs = &self.jobs;
        self.queue.pop(|job, task| {
            jobs.get(&job)
                .and_then(|j| j.tasks.get(task as usize))
                .is_some_and(|t| t.state == TaskState::Queued)
        })
    }

    fn start_attempt(
        &mut self,
        job_id: JobId,
        index: TaskIndex,
        worker: WorkerId,
    ) -> Option<Assignment> {
        let job = self.jobs.get_mut(&job_id)?;
        let args = job.args.get(index as usize)?;
        let task = job.tasks.get_mut(index as usize)?;
        let attempt = self.next_attempt;
        self.next_attempt = attempt.wrapping_add(1);
        task.state = TaskState::Running;
        task.attempts = task.attempts.saturating_add(1);
        task.current = Some(attempt);
        job.progress
            .move_task(TaskState::Queued, TaskState::Running);
        self.queued = self.queued.saturating_sub(1);
        if job.progress.state == JobState::Queued {
            job.progress.state = JobState::Running;
            self.commands
                .push_back(Command::Record(Record::JobStateChanged {
                    job: job_id,
                    state: JobState::Running,
                }));
        }
        self.commands
            .push_back(Command::Record(Record::AttemptStarted {
                job: job_id,
                task: index,
                attempt,
                worker,
            }));
        let assignment = Assignment {
            attempt,
            module: job.spec.module,
            args: args.to_string(),
            limits: job.spec.limits,
        };
        self.live.insert(
            attempt,
            Held {
                job: job_id,
                task: index,
                worker,
            },
        );
        self.pool.take(worker, attempt);
        Some(assignment)
    }
}

/// Tasks waiting for a worker: retried tasks first (newest retry first), then
/// never-started tasks in job submission order and task index order.
///
/// Never-started tasks are not stored one by one: each job is a range with a
/// cursor, so a 100,000-task job costs one entry.
#[derive(Debug, Default)]
pub(super) struct TaskQueue {
    retry: VecDeque<(JobId, TaskIndex)>,
    fresh: VecDeque<Fresh>,
}

#[derive(Debug)]
struct Fresh {
    job: JobId,
    next: TaskIndex,
    end: TaskIndex,
}

impl TaskQueue {
    /// Queues tasks `0..count` of a new job behind every job queued before it.
    pub(super) fn push_job(&mut self, job: JobId, count: TaskIndex) {
        if count > 0 {
            self.fresh.push_back(Fresh {
                job,
                next: 0,
                end: count,
            });
        }
    }

    /// Queues a task to be retried ahead of everything else.
    pub(super) fn push_front(&mut self, job: JobId, task: TaskIndex) {
        self.retry.push_front((job, task));
    }

    /// Drops a finished job's never-started range (its retry entries go stale
    /// and are skipped when reached). O(number of queued jobs).
    pub(super) fn remove_job(&mut self, job: JobId) {
        self.fresh.retain(|f| f.job != job);
    }

    /// The next task for which `is_queued` holds; entries for which it does not
    /// are stale and are discarded.
    pub(super) fn pop(
        &mut self,
        mut is_queued: impl FnMut(JobId, TaskIndex) -> bool,
    ) -> Option<(JobId, TaskIndex)> {
        while let Some((job, task)) = self.retry.pop_front() {
            if is_queued(job, task) {
                return Some((job, task));
            }
        }
        while let Some(front) = self.fresh.front_mut() {
            while front.next < front.end {
                let task = front.next;
                front.next += 1;
                if is_queued(front.job, task) {
                    return Some((front.job, task));
                }
            }
            self.fresh.pop_front();
        }
        None
    }
}

/// One connected worker, as the core accounts for it.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) slots: u32,
    /// Credit granted and not yet used: how many more attempts it may be sent.
    pub(super) free: u32,
    /// Attempts it holds now (sent, not yet reported, cancelled or lost).
    pub(super) held: HashSet<AttemptId>,
    /// Tells this incarnation's rotation entries from those of an earlier
    /// worker with the same id.
    epoch: u64,
    in_ring: bool,
}

/// The connected workers and the rotation of those with free credit.
#[derive(Debug, Default)]
pub(super) struct Pool {
    workers: HashMap<WorkerId, Worker>,
    ring: VecDeque<(WorkerId, u64)>,
    next_epoch: u64,
}

impl Pool {
    pub(super) fn get(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    pub(super) fn join(&mut self, id: WorkerId, slots: u32) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.workers.insert(
            id,
            Worker {
                slots,
                free: 0,
                held: HashSet::new(),
                epoch,
                in_ring: false,
            },
        );
    }

    /// Removes the worker with its credit; its rotation entry goes stale.
    pub(super) fn leave(&mut self, id: WorkerId) -> Option<Worker> {
        self.workers.remove(&id)
    }

    pub(super) fn grant(&mut self, id: WorkerId, n: u32) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.free = w.free.saturating_add(n);
        }
        self.enlist(id, false);
    }

    /// One credit back, for an attempt the worker no longer holds in the
    /// core's books (a late report of a lost attempt).
    pub(super) fn give_back(&mut self, id: WorkerId) {
        self.grant(id, 1);
    }

    /// The worker was handed `attempt`: it uses one credit.
    pub(super) fn take(&mut self, id: WorkerId, attempt: AttemptId) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.free = w.free.saturating_sub(1);
            w.held.insert(attempt);
        }
    }

    /// The worker no longer holds `attempt` (reported or cancelled): its
    /// credit comes back.
    pub(super) fn release(&mut self, id: WorkerId, attempt: AttemptId) {
        let returned = self
            .workers
            .get_mut(&id)
            .is_some_and(|w| w.held.remove(&attempt));
        if returned {
            self.give_back(id);
        }
    }

    /// Entries in the rotation, stale ones included (an upper bound on the
    /// number of workers with free credit).
    pub(super) fn ring_len(&self) -> usize {
        self.ring.len()
    }

    /// Takes the next worker with free credit out of the rotation; put it
    /// back with [`Pool::enlist`].
    pub(super) fn next_ready(&mut self) -> Option<WorkerId> {
        while let Some((id, epoch)) = self.ring.pop_front() {
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            if w.epoch != epoch || !w.in_ring {
                continue;
            }
            w.in_ring = false;
            if w.free > 0 {
                return Some(id);
            }
        }
        None
    }

    /// Puts the worker in the rotation if it has free credit and is not
    /// there yet: at the front (it is next) or at the back (its turn is over).
    pub(super) fn enlist(&mut self, id: WorkerId, front: bool) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.in_ring || w.free == 0 {
            return;
        }
        w.in_ring = true;
        if front {
            self.ring.push_front((id, w.epoch));
        } else {
            self.ring.push_back((id, w.epoch));
        }
    }
}
