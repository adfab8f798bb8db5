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
//! and the task's attempt running elsewhere is cancelled.
//! A late retryable failure changes nothing and is not recorded.
//!
//! # Memory
//!
//! A finished job leaves memory at the next [`Core::tick`]: the store holds
//! everything about it, as after a restart. What the core keeps grows with
//! the work in flight, not with the work ever done.
//!
//! # Scheduling
//!
//! Jobs are served in order of priority (jobs on the `priority` scheduler;
//! all others count as 0), then submission; a job held back by `not_before`
//! waits until [`Core::tick`] passes that time. Each job's own scheduler
//! picks its workers (see `dispatch`). A task goes only to a worker whose
//! memory it fits, and never beyond the worker's credit.
//!
//! # Time, leases and cooldown
//!
//! The core has no clock: [`Core::tick`] tells it the time (unix ms), and the
//! driver calls it before anything else and then regularly. Every attempt has
//! a lease (its timeout, times the rounds queued ahead of it on the worker,
//! plus slack); an attempt unreported past its lease is abandoned as
//! `Timeout`, cancelled on its worker and retried. A worker with too many
//! infrastructure failures (`WorkerLost`, `Timeout`) within a window gets no
//! tasks for a cooldown period.
//!
//! # Drain
//!
//! A draining worker gets no more tasks; attempts it hands back unstarted
//! are queued again at the front without counting as attempts.
//!
//! # The end of a job
//!
//! Once nothing is queued, a worker with an idle slot takes over part of
//! what another holds unstarted: the core sends that worker a
//! [`Command::Recall`], and the attempts it hands back go to the idle one
//! (see `tail`). Attempts already started run on and report as usual.

mod backlog;
mod dispatch;
mod health;
mod outcome;
mod pool;
mod queue;
#[cfg(test)]
mod schedule_tests;
#[cfg(test)]
mod sim;
mod tail;
#[cfg(test)]
mod tail_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod violation_tests;
mod violations;
mod workers;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wasmgrid_protocol::wire::{Assignment, AttemptId, ModuleHash};
use wasmgrid_protocol::{Failure, FailureKind};

use crate::model::{JobId, JobSpec, JobState, Record, TaskIndex, TaskState, WorkerId};
pub use health::{HealthPolicy, LOST_KEPT_MS};
use pool::Pool;
pub use pool::WorkerSpec;
use queue::{JobOrder, JobQueue};

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
    /// Ask this worker to hand back these attempts if it has not started
    /// them (or the share of them that its real queue warrants: see
    /// `ToWorker::GiveBack`): another worker idles, or soon will, at the
    /// end of their job.
    Recall {
        worker: WorkerId,
        attempts: Vec<AttemptId>,
        /// Attempts the core believes the worker has not started.
        believed_unstarted: u32,
    },
    /// Tell this worker whether tasks wait for its credit (see `backlog`).
    Backlog { worker: WorkerId, waiting: bool },
    /// Persist this change (in order).
    Record(Record),
    /// Close this worker's connection: it broke the protocol. The core
    /// already treats it as gone.
    CutOff { worker: WorkerId, reason: String },
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
    queue: JobQueue,
    /// EWMA of the fuel a task of this job burns; 0 until a task reports.
    fuel_per_task: f64,
    /// EWMA of a task's instantiate + run time on one slot, in µs; seeded
    /// from the module's last job, else 0 until a task reports. Sizes the
    /// prefetch window.
    task_us: f64,
}

/// The task time of each module's last finished job: a new job of the same
/// module (the usual way a grid is used) starts with its prefetch window
/// sized, instead of learning it over its first reports. Bounded: forgotten
/// wholesale past [`TaskTimes::MAX_MODULES`].
#[derive(Debug, Default)]
struct TaskTimes(HashMap<ModuleHash, f64>);

impl TaskTimes {
    const MAX_MODULES: usize = 4096;

    fn remember(&mut self, module: ModuleHash, task_us: f64) {
        if self.0.len() >= Self::MAX_MODULES && !self.0.contains_key(&module) {
            self.0.clear();
        }
        self.0.insert(module, task_us);
    }

    /// 0 when unknown.
    fn of(&self, module: &ModuleHash) -> f64 {
        self.0.get(module).copied().unwrap_or(0.0)
    }
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
    /// The first attempt of this run; reports for earlier ones (from before
    /// a restart) are dropped.
    first_attempt: AttemptId,
    jobs: HashMap<JobId, Job>,
    order: JobOrder,
    /// Queued tasks over all jobs.
    queued: usize,
    pool: Pool,
    /// The time of the last tick, unix ms.
    now_ms: u64,
    policy: HealthPolicy,
    /// Lease deadlines of live attempts; stale ones are skipped when they come due.
    leases: BinaryHeap<Reverse<(u64, AttemptId)>>,
    /// Recent infrastructure failures per worker (unix ms), kept across reconnects.
    failures: HashMap<WorkerId, health::FailureHistory>,
    /// Attempts running now.
    live: HashMap<AttemptId, Held>,
    /// Attempts abandoned because their worker left; a late report is still
    /// taken once (returning its credit), even after its job is forgotten,
    /// for [`LOST_KEPT_MS`]: a worker that never comes back leaves nothing
    /// behind for good.
    lost: HashMap<AttemptId, Held>,
    /// When each lost attempt was lost, oldest first.
    lost_at: VecDeque<(u64, AttemptId)>,
    /// Jobs that finished since the last tick, forgotten at the next one:
    /// a finished job needs nothing from memory (the store has it all, as
    /// after a restart), and a long-running foreman must not keep every
    /// task it ever ran.
    finished: Vec<JobId>,
    /// Per worker, attempts that ended without their report lately.
    released: HashMap<WorkerId, violations::RecentAttempts>,
    /// Attempts asked back from their worker for an idle one.
    recalls: tail::Recalls,
    /// What workers were told of the queue, so their reports may wait.
    backlog: backlog::BacklogNotices,
    task_us_by_module: TaskTimes,
    commands: VecDeque<Command>,
}

impl Core {
    /// `next_attempt`: first AttemptId to use (after a restart, one past the largest stored).
    pub fn new(next_attempt: AttemptId) -> Self {
        Self::with_policy(next_attempt, HealthPolicy::default())
    }

    pub fn with_policy(next_attempt: AttemptId, policy: HealthPolicy) -> Self {
        Core {
            next_attempt,
            first_attempt: next_attempt,
            jobs: HashMap::default(),
            order: JobOrder::default(),
            queued: 0,
            pool: Pool::default(),
            now_ms: 0,
            policy,
            leases: BinaryHeap::new(),
            failures: HashMap::default(),
            live: HashMap::default(),
            lost: HashMap::default(),
            lost_at: VecDeque::new(),
            finished: Vec::new(),
            released: HashMap::default(),
            recalls: tail::Recalls::default(),
            backlog: backlog::BacklogNotices::default(),
            task_us_by_module: TaskTimes::default(),
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
        let task_us = self.task_us_by_module.of(&spec.module);
        self.queued += progress.queued as usize;
        if progress.queued > 0 {
            self.order.activate(&spec, self.now_ms);
        }
        self.jobs.insert(
            id,
            Job {
                spec,
                args,
                tasks,
                progress,
                queue: JobQueue::new(total),
                fuel_per_task: 0.0,
                task_us,
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
            self.released
                .entry(held.worker)
                .or_default()
                .insert(attempt);
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
        j.queue.clear();
        self.order.remove(&j.spec);
        self.finished.push(job);
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

    /// Each connected worker's busy slots as dispatch counts them: the
    /// attempts it holds, up to its slots (beyond them they wait in its
    /// prefetch queue). Current to the last report, where heartbeats are
    /// seconds old.
    pub fn busy_slots(&self) -> std::collections::HashMap<WorkerId, u32> {
        self.pool
            .iter()
            .map(|(id, w)| {
                (
                    id,
                    u32::try_from(w.held.len()).unwrap_or(u32::MAX).min(w.slots),
                )
            })
            .collect()
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

    /// Drops a finished job from memory. Late reports for its attempts are
    /// then taken as after a restart (a lost one still returns its credit).
    /// Returns false when the job is unknown or not finished.
    pub fn forget_job(&mut self, job: JobId) -> bool {
        if !self
            .jobs
            .get(&job)
            .is_some_and(|j| j.progress.state.is_finished())
        {
            return false;
        }
        self.jobs.remove(&job);
        true
    }

    /// Jobs held in memory: the unfinished ones, and those that finished
    /// since the last tick.
    pub fn jobs_in_memory(&self) -> usize {
        self.jobs.len()
    }

    /// Lost attempts whose late report would still be taken.
    pub fn lost_attempts(&self) -> usize {
        self.lost.len()
    }
}
