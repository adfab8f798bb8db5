//! The core's sense of time: delayed jobs coming due, attempts outliving
//! their lease, and workers cooling down after repeated infrastructure
//! failures.

use std::cmp::Reverse;
use std::collections::VecDeque;

use wasmgrid_protocol::wire::AttemptId;
use wasmgrid_protocol::{Failure, FailureKind, TaskLimits};

use super::{Command, Core};
use crate::model::{JobId, Record, TaskIndex, TaskState, WorkerId};

/// Stale leases tolerated beyond the live ones before a sweep (see [`Core::push_lease`]).
const STALE_LEASES_KEPT: usize = 1024;
/// How long a lost attempt's late report is still taken: a worker that
/// reconnects reports within seconds; one that restarted never will.
pub const LOST_KEPT_MS: u64 = 3_600_000;

/// When the core gives up on an attempt or on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Added to every lease, for the network and the worker's own timeout
    /// to speak first.
    pub lease_slack_ms: u64,
    /// This many infrastructure failures within `cooldown_window_ms` put a
    /// worker in cooldown; 0 never does.
    pub cooldown_after: u32,
    pub cooldown_window_ms: u64,
    pub cooldown_ms: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            lease_slack_ms: 10_000,
            cooldown_after: 3,
            cooldown_window_ms: 60_000,
            cooldown_ms: 30_000,
        }
    }
}

/// A worker's recent infrastructure failures, kept across reconnects.
#[derive(Debug, Default)]
pub(super) struct FailureHistory {
    /// Times (unix ms) within the window.
    recent: VecDeque<u64>,
    /// 0, or when the last cooldown ends.
    cooling_until: u64,
}

impl Core {
    /// The time is now `now_ms` (unix ms; never goes back): delayed jobs that
    /// are due become runnable, expired leases are abandoned, workers whose
    /// cooldown is over take work again, and jobs finished since the last
    /// tick leave memory. Call [`Core::dispatch`] after.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        for job in std::mem::take(&mut self.finished) {
            self.forget_job(job);
        }
        while let Some(&(at, attempt)) = self.lost_at.front() {
            if at.saturating_add(LOST_KEPT_MS) > now {
                break;
            }
            self.lost_at.pop_front();
            self.lost.remove(&attempt);
        }
        for job in self.order.due(now) {
            if let Some(j) = self.jobs.get(&job) {
                if j.progress.queued > 0 && !j.progress.state.is_finished() {
                    self.order.activate(&j.spec, now);
                }
            }
        }
        while let Some(&Reverse((deadline, attempt))) = self.leases.peek() {
            if deadline > now {
                break;
            }
            self.leases.pop();
            self.expire_lease(attempt);
        }
        let cooled: Vec<WorkerId> = self
            .pool
            .iter()
            .filter(|(_, w)| w.cooling_until.is_some_and(|until| until <= now))
            .map(|(id, _)| id)
            .collect();
        for worker in cooled {
            self.pool.set_cooling(worker, None);
        }
    }

    /// When [`Core::tick`] next has something to do (unix ms): a delayed
    /// job comes due, a lease ends or a cooldown does. `None`: nothing is
    /// waiting for the time, so an idle foreman need not wake.
    pub fn next_deadline(&self) -> Option<u64> {
        let lease = self.leases.peek().map(|Reverse((deadline, _))| *deadline);
        let cooldown = self.pool.iter().filter_map(|(_, w)| w.cooling_until).min();
        [self.order.next_due(), lease, cooldown]
            .into_iter()
            .flatten()
            .min()
    }

    /// The time of the last tick.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// When a worker's cooldown ends, if it is cooling down now.
    pub fn cooling_until(&self, worker: WorkerId) -> Option<u64> {
        let until = self.failures.get(&worker)?.cooling_until;
        (until > self.now_ms).then_some(until)
    }

    /// Leases of ended attempts stay in the heap until they come due, which
    /// with long timeouts and deep prefetch can be hours: once they
    /// outnumber the live ones, they are dropped in one pass, so the heap
    /// stays within twice the attempts running (amortised O(1) a push).
    pub(super) fn push_lease(&mut self, deadline: u64, attempt: AttemptId) {
        self.leases.push(Reverse((deadline, attempt)));
        if self.leases.len() > 2 * self.live.len() + STALE_LEASES_KEPT {
            let live = &self.live;
            self.leases.retain(|Reverse((_, a))| live.contains_key(a));
        }
    }

    /// Leases in the heap, stale ones included.
    pub fn leases_held(&self) -> usize {
        self.leases.len()
    }

    /// How long an attempt may stay unreported: its timeout for each round
    /// of the worker's slots queued ahead of it and its own, plus slack.
    pub(super) fn lease_deadline(
        &self,
        limits: &TaskLimits,
        held_before: usize,
        slots: u32,
    ) -> u64 {
        let rounds = held_before as u64 / u64::from(slots.max(1)) + 1;
        self.now_ms
            .saturating_add(limits.timeout_ms.saturating_mul(rounds))
            .saturating_add(self.policy.lease_slack_ms)
    }

    fn expire_lease(&mut self, attempt: AttemptId) {
        let Some(held) = self.live.remove(&attempt) else {
            return;
        };
        self.pool.release(held.worker, attempt);
        self.released_without_report(held.worker, attempt);
        self.commands.push_back(Command::Cancel {
            worker: held.worker,
            attempts: vec![attempt],
        });
        let failure = Failure::new(
            FailureKind::Timeout,
            format!(
                "worker {} did not report within the task's lease",
                held.worker
            ),
        );
        let Some(next) = self.abandon_running(held, attempt, failure) else {
            return;
        };
        self.infrastructure_failure(held.worker);
        if next == TaskState::Queued {
            self.queued += 1;
            self.requeue_front(held.job, held.task);
        } else {
            self.maybe_finish(held.job);
        }
    }

    /// Counts a `WorkerLost` or `Timeout` against the worker; enough of them
    /// within the window start its cooldown.
    pub(super) fn infrastructure_failure(&mut self, worker: WorkerId) {
        let policy = self.policy;
        if policy.cooldown_after == 0 {
            return;
        }
        let now = self.now_ms;
        let history = self.failures.entry(worker).or_default();
        let times = &mut history.recent;
        times.push_back(now);
        while times
            .front()
            .is_some_and(|&t| t.saturating_add(policy.cooldown_window_ms) < now)
        {
            times.pop_front();
        }
        let recent = times.len();
        if recent >= policy.cooldown_after as usize {
            // A cooldown settles the failures that caused it.
            times.clear();
            let until = now.saturating_add(policy.cooldown_ms);
            history.cooling_until = until;
            self.pool.set_cooling(worker, Some(until));
            self.commands
                .push_back(Command::Record(Record::WorkerCooledDown {
                    worker,
                    until_ms: until,
                    recent_failures: recent as u32,
                }));
        }
    }

    /// Puts a task back at the front of its job's queue and the job back
    /// among those served.
    pub(super) fn requeue_front(&mut self, job: JobId, task: TaskIndex) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.queue.push_front(task);
            self.order.activate(&j.spec, self.now_ms);
        }
    }
}
