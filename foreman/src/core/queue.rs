//! Tasks waiting for a worker: per job, and the order in which jobs are
//! served. All operations are O(1) amortized or O(log jobs); entries that
//! went stale (a task finished or cancelled while queued) are skipped when
//! they reach the front, never searched for.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::model::{JobId, JobSpec, Scheduler, TaskIndex};

/// One job's queued tasks: retried tasks first (newest retry first), then
/// never-started tasks in index order. Never-started tasks are a range with
/// a cursor, so a 100,000-task job costs one entry.
#[derive(Debug, Default)]
pub(super) struct JobQueue {
    retry: VecDeque<TaskIndex>,
    next: TaskIndex,
    end: TaskIndex,
}

impl JobQueue {
    pub(super) fn new(count: TaskIndex) -> Self {
        JobQueue {
            retry: VecDeque::new(),
            next: 0,
            end: count,
        }
    }

    /// Queues a task to be retried ahead of the job's other tasks.
    pub(super) fn push_front(&mut self, task: TaskIndex) {
        self.retry.push_front(task);
    }

    pub(super) fn clear(&mut self) {
        self.retry = VecDeque::new();
        self.next = self.end;
    }

    /// The next task for which `is_queued` holds; entries for which it does
    /// not are stale and are discarded.
    pub(super) fn pop(
        &mut self,
        mut is_queued: impl FnMut(TaskIndex) -> bool,
    ) -> Option<TaskIndex> {
        while let Some(task) = self.retry.pop_front() {
            if is_queued(task) {
                return Some(task);
            }
        }
        while self.next < self.end {
            let task = self.next;
            self.next += 1;
            if is_queued(task) {
                return Some(task);
            }
        }
        None
    }
}

/// A job's place among jobs: higher priority first (only jobs on the
/// priority scheduler have one; the rest count as 0), then submission order.
pub(super) type JobKey = (Reverse<i64>, JobId);

pub(super) fn job_key(spec: &JobSpec) -> JobKey {
    let priority = match spec.scheduler {
        Scheduler::Priority => i64::from(spec.priority),
        _ => 0,
    };
    (Reverse(priority), spec.id)
}

/// Jobs with queued tasks, in the order they are served, and jobs held back
/// until their not-before time.
#[derive(Debug, Default)]
pub(super) struct JobOrder {
    runnable: BTreeMap<JobKey, Scheduler>,
    delayed: BTreeSet<(u64, JobId)>,
    /// Runnable jobs on the least-loaded scheduler.
    least_loaded: usize,
}

impl JobOrder {
    /// The job may be served (again). Idempotent.
    pub(super) fn activate(&mut self, spec: &JobSpec, now_ms: u64) {
        match spec.not_before_ms {
            Some(at) if at > now_ms => {
                self.delayed.insert((at, spec.id));
            }
            _ => {
                let before = self.runnable.insert(job_key(spec), spec.scheduler);
                if before.is_none() && spec.scheduler == Scheduler::LeastLoaded {
                    self.least_loaded += 1;
                }
            }
        }
    }

    pub(super) fn remove(&mut self, spec: &JobSpec) {
        self.remove_key(&job_key(spec));
        if let Some(at) = spec.not_before_ms {
            self.delayed.remove(&(at, spec.id));
        }
    }

    /// When the first delayed job comes due.
    pub(super) fn next_due(&self) -> Option<u64> {
        self.delayed.first().map(|&(at, _)| at)
    }

    /// Delayed jobs whose time has come, taken out of the delayed set
    /// (the caller activates them).
    pub(super) fn due(&mut self, now_ms: u64) -> Vec<JobId> {
        let mut due = Vec::new();
        while let Some(&(at, job)) = self.delayed.first() {
            if at > now_ms {
                break;
            }
            self.delayed.pop_first();
            due.push(job);
        }
        due
    }

    /// The runnable job after `after` (the first one for `None`).
    pub(super) fn next_after(&self, after: Option<JobKey>) -> Option<JobKey> {
        match after {
            None => self.runnable.keys().next().copied(),
            Some(key) => self
                .runnable
                .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
                .next()
                .map(|(k, _)| *k),
        }
    }

    pub(super) fn remove_key(&mut self, key: &JobKey) {
        if self.runnable.remove(key) == Some(Scheduler::LeastLoaded) {
            self.least_loaded -= 1;
        }
    }

    /// Whether any runnable job places tasks by load.
    pub(super) fn wants_load(&self) -> bool {
        self.least_loaded > 0
    }
}
