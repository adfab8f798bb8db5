//! Who runs what next: [`Core::dispatch`] serves jobs in order and lets
//! each job's scheduler pick its workers among those with free credit whose
//! memory the job's tasks fit.
//!
//! - `fifo` and `priority`: the job's tasks in order, dealt in chunks to the
//!   workers in rotation, so a short queue is spread instead of filling one.
//! - `round-robin`: one task per worker per turn of the rotation.
//! - `least-loaded`: each task to the worker with the lowest held/slots.
//! - `performance`: fastest workers first (speed = fuel per second per slot,
//!   learned from reports); a worker gets a task only while the job has more
//!   tasks left than the other workers would finish before it finishes this
//!   one, so a job's last tasks wait for a fast worker instead of going to a
//!   slow one.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use wasmgrid_protocol::wire::Assignment;

use super::pool::Worker;
use super::{Command, Core, Held};
use crate::model::{JobId, JobState, Record, Scheduler, TaskIndex, TaskState, WorkerId};

/// Work a worker may hold beyond what its slots run, in time: enough that
/// short tasks are not bound by round trips (nor by the 8 ms a worker with
/// queued tasks may hold its reports), little enough that long ones are not
/// hoarded (and what is left at a job's end is evened out: see `tail`).
const PREFETCH_TARGET_US: f64 = 16_000.0;
/// Tasks queued per slot before a job's task time is known, and at least.
const MIN_PREFETCH_PER_SLOT: usize = 1;
const UNKNOWN_PREFETCH_PER_SLOT: usize = 2;

/// The fastest workers the tail check weighs a candidate against. Slower
/// ones add little, and leaving them out only makes the check say "give"
/// more often (never starving a task), while keeping it O(1) in grid size.
const TAIL_RIVALS: usize = 64;

/// Assignments per worker, in the order workers were first served.
#[derive(Default)]
pub(super) struct Batches {
    batches: Vec<(WorkerId, Vec<Assignment>)>,
    index: HashMap<WorkerId, usize>,
}

impl Batches {
    pub(super) fn push(&mut self, worker: WorkerId, assignment: Assignment) {
        // Chunks go to one worker in a row: skip the lookup.
        if let Some((last, batch)) = self.batches.last_mut() {
            if *last == worker {
                batch.push(assignment);
                return;
            }
        }
        let slot = *self.index.entry(worker).or_insert_with(|| {
            self.batches.push((worker, Vec::new()));
            self.batches.len() - 1
        });
        self.batches[slot].1.push(assignment);
    }
}

impl Core {
    /// Assigns queued tasks to workers with free credit and emits one `Send`
    /// per worker served; then, if nothing is left queued, evens out the
    /// end of the jobs running (see `tail`).
    pub fn dispatch(&mut self) {
        self.deal_queued();
        self.even_out_tail();
        self.announce_backlog();
    }

    fn deal_queued(&mut self) {
        if self.queued == 0 || !self.pool.any_ready() {
            return;
        }
        self.pool.track_load(self.order.wants_load());
        let mut out = Batches::default();
        let mut cursor = None;
        while self.pool.any_ready() {
            let Some(key) = self.order.next_after(cursor) else {
                break;
            };
            cursor = Some(key);
            let job = key.1;
            let Some(scheduler) = self.queued_job(job).map(|j| j.spec.scheduler) else {
                self.order.remove_key(&key);
                continue;
            };
            match scheduler {
                Scheduler::Fifo | Scheduler::Priority => {
                    self.deal_in_rotation(job, false, &mut out)
                }
                Scheduler::RoundRobin => self.deal_in_rotation(job, true, &mut out),
                Scheduler::LeastLoaded => self.deal_least_loaded(job, &mut out),
                Scheduler::Performance => self.deal_by_performance(job, &mut out),
            }
            if self.queued_job(job).is_none() {
                self.order.remove_key(&key);
            }
        }
        self.send(out);
    }

    /// One `Send` per worker served.
    pub(super) fn send(&mut self, out: Batches) {
        for (worker, assignments) in out.batches {
            self.commands.push_back(Command::Send {
                worker,
                assignments,
            });
        }
    }

    /// The job, if it still has tasks waiting.
    fn queued_job(&self, job: JobId) -> Option<&super::Job> {
        self.jobs
            .get(&job)
            .filter(|j| j.progress.queued > 0 && !j.progress.state.is_finished())
    }

    pub(super) fn memory_limit(&self, job: JobId) -> u64 {
        self.jobs
            .get(&job)
            .map_or(0, |j| j.spec.limits.memory_bytes)
    }

    pub(super) fn can_take(&self, job: JobId, worker: WorkerId, limit: u64) -> bool {
        self.pool
            .get(worker)
            .is_some_and(|w| w.ready() && w.fits(limit) && self.has_room(job, w))
    }

    /// Whether `w` holds less than its slots plus about [`PREFETCH_TARGET_US`]
    /// of this job's tasks per slot (its credit still bounds it too).
    fn has_room(&self, job: JobId, w: &Worker) -> bool {
        let task_us = self.jobs.get(&job).map_or(0.0, |j| j.task_us);
        let per_slot = if task_us > 0.0 {
            ((PREFETCH_TARGET_US / task_us).ceil() as usize).max(MIN_PREFETCH_PER_SLOT)
        } else {
            UNKNOWN_PREFETCH_PER_SLOT
        };
        let slots = w.slots as usize;
        w.held.len() < slots.saturating_add(slots.saturating_mul(per_slot))
    }

    /// Workers in rotation, `chunk` tasks each per turn (one for
    /// round-robin; otherwise the job's queue split evenly over the ready).
    fn deal_in_rotation(&mut self, job: JobId, one_each: bool, out: &mut Batches) {
        let limit = self.memory_limit(job);
        let chunk = if one_each {
            1
        } else {
            let queued = self
                .queued_job(job)
                .map_or(0, |j| j.progress.queued as usize);
            queued.div_ceil(self.pool.ring_len().max(1)).max(1)
        };
        let mut passed_over = Vec::new();
        'turns: while self.queued_job(job).is_some() {
            let Some(worker) = self.pool.next_in_ring() else {
                break;
            };
            let mut given = 0;
            while given < chunk && self.can_take(job, worker, limit) {
                if !self.give_one(job, worker, out) {
                    passed_over.push(worker);
                    break 'turns;
                }
                given += 1;
            }
            if given == 0 {
                passed_over.push(worker);
            }
            // A worker that was given tasks is back in the rotation, at the end.
        }
        for worker in passed_over.into_iter().rev() {
            self.pool.enlist(worker, true);
        }
    }

    fn deal_least_loaded(&mut self, job: JobId, out: &mut Batches) {
        let limit = self.memory_limit(job);
        while self.queued_job(job).is_some() {
            let pool = &self.pool;
            let Some(worker) = pool
                .by_load()
                .find(|&w| pool.get(w).is_some_and(|w| w.fits(limit)))
            else {
                break;
            };
            // Room is held per slot: if the least loaded has none, no one has.
            if !pool.get(worker).is_some_and(|w| self.has_room(job, w)) {
                break;
            }
            if !self.give_one(job, worker, out) {
                break;
            }
        }
    }

    fn deal_by_performance(&mut self, job: JobId, out: &mut Batches) {
        let limit = self.memory_limit(job);
        let fuel_per_task = self.jobs.get(&job).map_or(0.0, |j| j.fuel_per_task);
        let mut refused: HashSet<WorkerId> = HashSet::default();
        let plan = (fuel_per_task > 0.0).then(|| TailPlan::new(self, fuel_per_task, limit));
        while let Some(queued) = self.queued_job(job).map(|j| j.progress.queued) {
            let pool = &self.pool;
            let Some(worker) = pool.by_speed().find(|&w| {
                !refused.contains(&w)
                    && pool
                        .get(w)
                        .is_some_and(|w| w.fits(limit) && self.has_room(job, w))
            }) else {
                break;
            };
            if plan
                .as_ref()
                .is_some_and(|plan| !plan.worth_giving(self, worker, queued))
            {
                refused.insert(worker);
                if refused.len() > TAIL_RIVALS {
                    // A long line of refusals: the rest waits for the next dispatch.
                    break;
                }
                continue;
            }
            if !self.give_one(job, worker, out) {
                break;
            }
        }
    }

    /// Starts the job's next queued task on `worker`; false when the job has
    /// none left.
    pub(super) fn give_one(&mut self, job: JobId, worker: WorkerId, out: &mut Batches) -> bool {
        let Some(task) = self.pop_queued(job) else {
            return false;
        };
        if let Some(assignment) = self.start_attempt(job, task, worker) {
            out.push(worker, assignment);
        }
        true
    }

    fn pop_queued(&mut self, job: JobId) -> Option<TaskIndex> {
        let j = self.jobs.get_mut(&job)?;
        let tasks = &j.tasks;
        j.queue.pop(|task| {
            tasks
                .get(task as usize)
                .is_some_and(|t| t.state == TaskState::Queued)
        })
    }

    fn start_attempt(
        &mut self,
        job_id: JobId,
        index: TaskIndex,
        worker: WorkerId,
    ) -> Option<Assignment> {
        let (held_before, slots) = self.pool.get(worker).map(|w| (w.held.len(), w.slots))?;
        let limits = self.jobs.get(&job_id)?.spec.limits;
        let deadline = self.lease_deadline(&limits, held_before, slots);
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
                at_ms: self.now_ms,
            }));
        let assignment = Assignment {
            attempt,
            module: job.spec.module,
            args: args.to_string(),
            limits,
        };
        self.live.insert(
            attempt,
            Held {
                job: job_id,
                task: index,
                worker,
            },
        );
        self.pool.take(worker, attempt, limits.memory_bytes);
        self.push_lease(deadline, attempt);
        Some(assignment)
    }
}

/// What the performance scheduler knows about the grid during one dispatch.
struct TailPlan {
    fuel_per_task: f64,
    /// For workers not measured yet: the mean learned speed (1 if none is).
    default_speed: f64,
    /// Tasks per second all eligible workers finish together.
    throughput: f64,
    /// The fastest eligible workers that have credit or work.
    rivals: Vec<WorkerId>,
}

impl TailPlan {
    fn new(core: &Core, fuel_per_task: f64, limit: u64) -> Self {
        let (sum, n) = core
            .pool
            .iter()
            .filter(|(_, w)| w.speed > 0.0)
            .fold((0.0, 0u32), |(s, n), (_, w)| (s + w.speed, n + 1));
        let default_speed = if n == 0 { 1.0 } else { sum / f64::from(n) };
        let mut plan = TailPlan {
            fuel_per_task,
            default_speed,
            throughput: 0.0,
            rivals: Vec::new(),
        };
        let mut rivals: Vec<(f64, WorkerId)> = Vec::new();
        for (id, w) in core.pool.iter() {
            if !(w.eligible() && w.fits(limit)) {
                continue;
            }
            let task_secs = plan.task_secs(w);
            plan.throughput += f64::from(w.slots) / task_secs;
            if w.free > 0 || !w.held.is_empty() {
                rivals.push((task_secs, id));
            }
        }
        if rivals.len() > TAIL_RIVALS {
            rivals.select_nth_unstable_by(TAIL_RIVALS, |a, b| a.0.total_cmp(&b.0));
            rivals.truncate(TAIL_RIVALS);
        }
        plan.rivals = rivals.into_iter().map(|(_, id)| id).collect();
        plan
    }

    /// Seconds one task of the job takes on one of the worker's slots.
    fn task_secs(&self, w: &Worker) -> f64 {
        let speed = if w.speed > 0.0 {
            w.speed
        } else {
            self.default_speed
        };
        self.fuel_per_task / speed
    }

    /// Whether `worker` should take one more of the job's `queued` tasks:
    /// true unless its fastest rivals would finish all of them strictly
    /// before it finishes this one. Only workers with credit or work are
    /// rivals (one that holds nothing and granted nothing may never ask).
    fn worth_giving(&self, core: &Core, worker: WorkerId, queued: u32) -> bool {
        let Some(me) = core.pool.get(worker) else {
            return false;
        };
        let rounds = (me.held.len() as u64 / u64::from(me.slots) + 1) as f64;
        let finish_secs = rounds * self.task_secs(me);
        // Cheap bound first: the whole grid's throughput over that time.
        if f64::from(queued) > finish_secs * self.throughput {
            return true;
        }
        let others_finish: f64 = self
            .rivals
            .iter()
            .filter(|&&id| id != worker)
            .filter_map(|&id| core.pool.get(id))
            .map(|w| {
                // Rounds it completes strictly before `finish_secs`: ties go to the candidate.
                // (Less a hair, so that equal speeds tie despite rounding.)
                let ratio = finish_secs / self.task_secs(w) * (1.0 - 1e-9);
                let own_rounds = (ratio.ceil() - 1.0).max(0.0);
                (own_rounds * f64::from(w.slots) - w.held.len() as f64).max(0.0)
            })
            .sum();
        f64::from(queued) > others_finish
    }
}
