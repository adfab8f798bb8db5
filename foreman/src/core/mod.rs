//! The foreman's sans-IO core: a plain state machine that decides which task
//! goes to which worker and what every outcome means. No sockets, no
//! database, no clock, no threads.
//!
//! # Driving it
//!
//! The driver feeds events in ([`Core::submit_job`], [`Core::grant_credit`],
//! [`Core::attempt_finished`], ...), calls [`Core::dispatch`] after a batch of
//! events (no other call dispatches by itself, so batching stays with the
//! driver), then drains [`Core::poll_command`] in order: it persists every
//! [`Command::Record`] and sends every [`Command::Send`] / [`Command::Cancel`].
//! Records of an attempt come before the `Send` that carries it.
//!
//! # Credit
//!
//! A worker is only ever sent as many attempts as it has free credit. Each
//! attempt hands its credit back exactly once: when its report arrives, or
//! when the core sends a `Cancel` for it (at once, not when the worker
//! answers), or never if the worker leaves (its credit goes with it). So a
//! worker must treat a `Cancel` for an attempt it still holds as returning
//! that credit, and must not grant `Credit` for it again. After a rejoin it
//! grants only what it has free, counting attempts still running from before.
//!
//! # Retries and late reports
//!
//! Deterministic failures fail the task at once. `Timeout`, `WorkerLost` and a
//! worker-reported `Cancelled` are retried while the task has used at most
//! `max_retries + 1` attempts; a retried task goes to the front of the queue.
//! When a worker leaves, its attempts are abandoned but remembered: if one of
//! them reports later (from the same worker id, after a rejoin) and its task
//! is still unfinished, a success or deterministic failure is accepted once,
//! and the task's attempt running elsewhere is cancelled. A late retryable
//! failure changes nothing and is not recorded.

mod sched;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wasmgrid_protocol::wire::{Assignment, AttemptId};
use wasmgrid_protocol::{Failure, FailureKind, TaskReport};

use crate::model::{JobId, JobSpec, JobState, Record, TaskIndex, TaskState, WorkerId};
use sched::{Pool, TaskQueue};

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Hand these attempts to this worker (one batch; never more than the worker's free credit).
    Send {
        worker: WorkerId,
        assignments: Vec<Assignment>,
    },
    /// Tell this worker to stop these attempts (job cancelled, or the task
    /// was finished by another attempt).
    Cancel {
        worker: WorkerId,
        attempts: Vec<AttemptId>,
    },
    /// Persist this change (in order).
    Record(Record),
}

/// A job's state and how many of its tasks are in each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub state: JobState,
    pub total: u32,
    pub queued: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub cancelled: u32,
}

impl JobProgress {
    fn count_mut(&mut self, state: TaskState) -> &mut u32 {
        match state {
            TaskState::Queued => &mut self.queued,
            TaskState::Running => &mut self.running,
            TaskState::Succeeded => &mut self.succeeded,
            TaskState::Failed => &mut self.failed,
            TaskState::Cancelled => &mut self.cancelled,
        }
    }

    fn move_task(&mut self, from: TaskState, to: TaskState) {
        let from = self.count_mut(from);
        *from = from.saturating_sub(1);
        *self.count_mut(to) += 1;
    }
}

#[derive(Debug)]
struct Task {
    state: TaskState,
    /// Attempts started so far, restored ones included.
    attempts: u32,
    /// The attempt running now, when `state` is `Running`.
    current: Option<AttemptId>,
}

#[derive(Debug)]
struct Job {
    spec: JobSpec,
    /// Emptied when the job finishes.
    args: Vec<Arc<str>>,
    tasks: Vec<Task>,
    progress: JobProgress,
    /// Attempts abandoned when their worker left, kept until the job is forgotten.
    lost: Vec<AttemptId>,
}

/// Which task an attempt runs, and where.
#[derive(Debug, Clone, Copy)]
struct Held {
    job: JobId,
    task: TaskIndex,
    worker: WorkerId,
}

/// The foreman's decisions; see the module docs.
#[derive(Debug)]
pub struct Core {
    next_attempt: AttemptId,
    jobs: HashMap<JobId, Job>,
    queue: TaskQueue,
    /// Queued tasks over all jobs.
    queued: usize,
    pool: Pool,
    /// Attempts running now.
    live: HashMap<AttemptId, Held>,
    /// Attempts abandoned because their worker left; a late report is still taken once.
    lost: HashMap<AttemptId, Held>,
    commands: VecDeque<Command>,
}

impl Core {
    /// `next_attempt`: first AttemptId to use (after a restart, one past the largest stored).
    pub fn new(next_attempt: AttemptId) -> Self {
        Core {
            next_attempt,
            jobs: HashMap::new(),
            queue: TaskQueue::default(),
            queued: 0,
            pool: Pool::default(),
            live: HashMap::new(),
            lost: HashMap::new(),
            commands: VecDeque::new(),
        }
    }

    /// A new job: tasks 0..args.len(), all queued. args[i] is the JSON text of task i.
    /// `args.len()` is the task count (`spec.task_count` is not consulted).
    /// A job id already known is ignored. A job without tasks completes at once.
    pub fn submit_job(&mut self, spec: JobSpec, args: Vec<Arc<str>>) {
        self.restore_job(spec, args, Vec::new(), Vec::new());
    }

    /// After a foreman restart: a job whose tasks are partly done. Tasks in
    /// `done` keep their finished state (entries out of range or not finished
    /// are ignored); all others are queued again, keeping `attempts_so_far[i]`
    /// attempts counted (missing entries count 0). The job starts `Running`
    /// if anything was done or attempted, `Queued` otherwise; if every task is
    /// done, its final state is emitted now.
    pub fn restore_job(
        &mut self,
        spec: JobSpec,
        mut args: Vec<Arc<str>>,
        done: Vec<(TaskIndex, TaskState)>,
        attempts_so_far: Vec<u32>,
    ) {
        if self.jobs.contains_key(&spec.id) {
            return;
        }
        let total = u32::try_from(args.len()).unwrap_or(u32::MAX);
        args.truncate(total as usize);
        let mut tasks: Vec<Task> = (0..args.len())
            .map(|i| Task {
                state: TaskState::Queued,
                attempts: attempts_so_far.get(i).copied().unwrap_or(0),
                current: None,
            })
            .collect();
        let mut progress = JobProgress {
            state: JobState::Queued,
            total,
            queued: total,
            running: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
        };
        let mut started = tasks.iter().any(|t| t.attempts > 0);
        for (index, state) in done {
            let Some(task) = tasks.get_mut(index as usize) else {
                continue;
            };
            if state.is_finished() && task.state == TaskState::Queued {
                task.state = state;
                progress.move_task(TaskState::Queued, state);
                started = true;
            }
        }
        if started {
            progress.state = JobState::Running;
        }
        let id = spec.id;
        self.queued += progress.queued as usize;
        self.queue.push_job(id, total);
        self.jobs.insert(
            id,
            Job {
                spec,
                args,
                tasks,
                progress,
                lost: Vec::new(),
            },
        );
        self.maybe_finish(id);
    }

    /// Cancels a job: queued tasks become `Cancelled`, running attempts are
    /// abandoned (`Cancel` to their workers, whose credit returns now). Returns
    /// false (a no-op) when the job is unknown or already finished.
    /// Costs one pass over the job's tasks.
    pub fn cancel_job(&mut self, job: JobId) -> bool {
        let Some(j) = self.jobs.get_mut(&job) else {
            return false;
        };
        if j.progress.state.is_finished() {
            return false;
        }
        let mut cancels: BTreeMap<WorkerId, Vec<AttemptId>> = BTreeMap::new();
        for (index, task) in j.tasks.iter_mut().enumerate() {
            if task.state.is_finished() {
                continue;
            }
            task.state = TaskState::Cancelled;
            let Some(attempt) = task.current.take() else {
                continue;
            };
            let Some(held) = self.live.remove(&attempt) else {
                continue;
            };
            self.pool.release(held.worker, attempt);
            cancels.entry(held.worker).or_default().push(attempt);
            self.commands
                .push_back(Command::Record(Record::AttemptAbandoned {
                    job,
                    task: index as TaskIndex,
                    attempt,
                    worker: held.worker,
                    failure: Failure::new(FailureKind::Cancelled, "the job was cancelled"),
                    task_state: TaskState::Cancelled,
                }));
        }
        let p = &mut j.progress;
        self.queued = self.queued.saturating_sub(p.queued as usize);
        p.cancelled += p.queued + p.running;
        p.queued = 0;
        p.running = 0;
        p.state = JobState::Cancelled;
        j.args = Vec::new();
        self.queue.remove_job(job);
        for (worker, attempts) in cancels {
            self.commands
                .push_back(Command::Cancel { worker, attempts });
        }
        self.commands
            .push_back(Command::Record(Record::JobStateChanged {
                job,
                state: JobState::Cancelled,
            }));
        true
    }

    /// A worker connected. It gets no credit until [`Core::grant_credit`].
    /// A worker id already connected is treated as having left first.
    pub fn worker_joined(&mut self, worker: WorkerId, slots: u32) {
        if self.pool.get(worker).is_some() {
            self.worker_left(worker);
        }
        self.pool.join(worker, slots);
    }

    /// The worker can take `n` more tasks. Credit accumulates. Unknown workers are ignored.
    pub fn grant_credit(&mut self, worker: WorkerId, n: u32) {
        if n > 0 {
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
        let mut held: Vec<AttemptId> = gone.held.into_iter().collect();
        held.sort_unstable();
        let mut requeue = Vec::new();
        for attempt in held {
            let Some(h) = self.live.remove(&attempt) else {
                continue;
            };
            self.lost.insert(attempt, h);
            let Some(job) = self.jobs.get_mut(&h.job) else {
                continue;
            };
            job.lost.push(attempt);
            let Some(task) = job.tasks.get_mut(h.task as usize) else {
                continue;
            };
            if task.current != Some(attempt) {
                continue;
            }
            task.current = None;
            let next = retry_state(task.attempts, job.spec.max_retries);
            task.state = next;
            job.progress.move_task(TaskState::Running, next);
            self.commands
                .push_back(Command::Record(Record::AttemptAbandoned {
                    job: h.job,
                    task: h.task,
                    attempt,
                    worker,
                    failure: Failure::new(
                        FailureKind::WorkerLost,
                        format!("worker {worker} went away"),
                    ),
                    task_state: next,
                }));
            if next == TaskState::Queued {
                requeue.push((h.job, h.task));
                self.queued += 1;
            } else {
                self.maybe_finish(h.job);
            }
        }
        for (job, task) in requeue.into_iter().rev() {
            self.queue.push_front(job, task);
        }
    }

    /// A report for an attempt. Also returns one credit to that worker (the
    /// worker does not send Credit for it). Reports from a worker that does
    /// not hold the attempt, for unknown attempts, and duplicates are dropped
    /// silently (no records, no credit).
    pub fn attempt_finished(&mut self, worker: WorkerId, attempt: AttemptId, report: TaskReport) {
        if let Some(held) = self.live.get(&attempt).copied() {
            if held.worker != worker {
                return;
            }
            self.live.remove(&attempt);
            self.pool.release(worker, attempt);
            self.finish_live(held, attempt, report);
        } else if let Some(held) = self.lost.get(&attempt).copied() {
            if held.worker != worker {
                return;
            }
            self.lost.remove(&attempt);
            self.pool.give_back(worker);
            self.finish_late(held, attempt, report);
        }
    }

    /// Drains the commands produced so far, in order.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    pub fn job_progress(&self, job: JobId) -> Option<JobProgress> {
        self.jobs.get(&job).map(|j| j.progress)
    }

    /// Attempts held by a worker.
    pub fn outstanding(&self, worker: WorkerId) -> usize {
        self.pool.get(worker).map_or(0, |w| w.held.len())
    }

    /// Credit the worker has granted and the core has not used.
    pub fn free_credit(&self, worker: WorkerId) -> u32 {
        self.pool.get(worker).map_or(0, |w| w.free)
    }

    /// The slots a connected worker announced.
    pub fn worker_slots(&self, worker: WorkerId) -> Option<u32> {
        self.pool.get(worker).map(|w| w.slots)
    }

    /// Tasks waiting for a worker, over all jobs.
    pub fn queued_tasks(&self) -> usize {
        self.queued
    }

    pub fn task_state(&self, job: JobId, task: TaskIndex) -> Option<TaskState> {
        let job = self.jobs.get(&job)?;
        job.tasks.get(task as usize).map(|t| t.state)
    }

    /// The AttemptId the next assignment will get.
    pub fn next_attempt_id(&self) -> AttemptId {
        self.next_attempt
    }

    /// Drops a finished job from memory (after its final state is persisted).
    /// Late reports for its lost attempts are then dropped without returning
    /// credit. Returns false when the job is unknown or not finished.
    pub fn forget_job(&mut self, job: JobId) -> bool {
        if !self
            .jobs
            .get(&job)
            .is_some_and(|j| j.progress.state.is_finished())
        {
            return false;
        }
        if let Some(j) = self.jobs.remove(&job) {
            for attempt in j.lost {
                self.lost.remove(&attempt);
            }
        }
        true
    }

    /// The report of the attempt running the task now.
    fn finish_live(&mut self, held: Held, attempt: AttemptId, report: TaskReport) {
        let Some(job) = self.jobs.get_mut(&held.job) else {
            return;
        };
        let max_retries = job.spec.max_retries;
        let Some(task) = job.tasks.get_mut(held.task as usize) else {
            return;
        };
        task.current = None;
        let next = match &report.outcome {
            Ok(_) => TaskState::Succeeded,
            Err(f) if f.kind.is_deterministic() => TaskState::Failed,
            Err(_) => retry_state(task.attempts, max_retries),
        };
        task.state = next;
        job.progress.move_task(TaskState::Running, next);
        self.commands
            .push_back(Command::Record(Record::AttemptEnded {
                job: held.job,
                task: held.task,
                attempt,
                worker: held.worker,
                report,
                task_state: next,
            }));
        if next == TaskState::Queued {
            self.queue.push_front(held.job, held.task);
            self.queued += 1;
        } else {
            self.maybe_finish(held.job);
        }
    }

    /// The late report of an attempt abandoned when its worker left. Only a
    /// success or a deterministic failure counts; a late retryable failure is
    /// consumed without a record (the attempt is already recorded as lost).
    fn finish_late(&mut self, held: Held, attempt: AttemptId, report: TaskReport) {
        let Some(job) = self.jobs.get_mut(&held.job) else {
            return;
        };
        let Some(task) = job.tasks.get_mut(held.task as usize) else {
            return;
        };
        let before = task.state;
        let next = match &report.outcome {
            Ok(_) => TaskState::Succeeded,
            Err(f) if f.kind.is_deterministic() => TaskState::Failed,
            Err(_) => return,
        };
        if before.is_finished() {
            return;
        }
        task.state = next;
        job.progress.move_task(before, next);
        if before == TaskState::Queued {
            // Its retry entry goes stale and is skipped.
            self.queued = self.queued.saturating_sub(1);
        }
        // The attempt running elsewhere is cancelled. Its record comes first,
        // so that a store which writes each record's outcome onto the task
        // row ends with this report's result.
        if let Some(current) = task.current.take() {
            if let Some(other) = self.live.remove(&current) {
                self.pool.release(other.worker, current);
                self.commands
                    .push_back(Command::Record(Record::AttemptAbandoned {
                        job: held.job,
                        task: held.task,
                        attempt: current,
                        worker: other.worker,
                        failure: Failure::new(
                            FailureKind::Cancelled,
                            format!("attempt {attempt} finished the task first"),
                        ),
                        task_state: next,
                    }));
                self.commands.push_back(Command::Cancel {
                    worker: other.worker,
                    attempts: vec![current],
                });
            }
        }
        self.commands
            .push_back(Command::Record(Record::AttemptEnded {
                job: held.job,
                task: held.task,
                attempt,
                worker: held.worker,
                report,
                task_state: next,
            }));
        self.maybe_finish(held.job);
    }

    /// Emits the job's final state once no task is queued or running.
    fn maybe_finish(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let p = &mut job.progress;
        if p.state.is_finished() || p.queued > 0 || p.running > 0 {
            return;
        }
        p.state = if p.failed > 0 {
            JobState::Failed
        } else if p.cancelled > 0 {
            // Only reachable through restore_job of a job cancelled mid-way.
            JobState::Cancelled
        } else {
            JobState::Completed
        };
        let state = p.state;
        job.args = Vec::new();
        self.queue.remove_job(job_id);
        self.commands
            .push_back(Command::Record(Record::JobStateChanged {
                job: job_id,
                state,
            }));
    }
}

/// A task whose attempt ended with a retryable failure: queued again while
/// it has used at most `max_retries + 1` attempts, failed after that.
fn retry_state(attempts: u32, max_retries: u32) -> TaskState {
    if attempts <= max_retries {
        TaskState::Queued
    } else {
        TaskState::Failed
    }
}
