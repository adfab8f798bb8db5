//! Workers that break the protocol: reports checked before they count
//! (whose attempt, how big, whether the result is JSON), credit beyond what
//! a worker may grant, and cutting a violator off. A cut-off worker's
//! attempts go elsewhere, the violation is recorded in its failure history,
//! and the driver closes its connection.

use std::collections::VecDeque;

use rustc_hash::FxHashSet as HashSet;
use wasmgrid_protocol::wire::{AttemptId, MAX_PREFETCH_PER_SLOT};
use wasmgrid_protocol::{Failure, FailureKind, TaskLimits, TaskReport};

use super::{Command, Core, Held};
use crate::model::{Record, TaskState, WorkerId};

/// Attempts remembered per worker as ended without their report (cancelled,
/// lease expired, lost): a report for one of them crossed our `Cancel` or
/// the connection's end and is benign.
const RECENTLY_RELEASED: usize = 16_384;

/// Longest failure message a report may carry (the worker cuts its own at
/// [`wasmgrid_protocol::Failure::MAX_MESSAGE_BYTES`]).
const MAX_FAILURE_MESSAGE_BYTES: usize = 4 * Failure::MAX_MESSAGE_BYTES;

/// Captured output is decoded lossily: each kept byte may become a 3-byte
/// replacement character.
const LOSSY_UTF8_GROWTH: usize = 3;

/// Attempt ids in insertion order, the oldest forgotten past a bound.
#[derive(Debug, Default)]
pub(super) struct RecentAttempts {
    set: HashSet<AttemptId>,
    order: VecDeque<AttemptId>,
}

impl RecentAttempts {
    pub(super) fn insert(&mut self, attempt: AttemptId) {
        if self.set.insert(attempt) {
            self.order.push_back(attempt);
        }
        while self.order.len() > RECENTLY_RELEASED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Whether `attempt` was remembered; it is forgotten now (one report each).
    pub(super) fn take(&mut self, attempt: AttemptId) -> bool {
        self.set.remove(&attempt)
    }
}

/// What is wrong with a report for an attempt of a job with these limits.
pub(super) fn check_report(report: &TaskReport, limits: &TaskLimits) -> Result<(), String> {
    match &report.outcome {
        Ok(json) => {
            if json.len() > limits.result_bytes as usize {
                return Err(format!(
                    "a result of {} bytes; this job's limit is {} bytes",
                    json.len(),
                    limits.result_bytes
                ));
            }
            if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(json) {
                return Err(format!("a result that is not valid JSON ({error})"));
            }
        }
        Err(failure) => {
            if failure.message.len() > MAX_FAILURE_MESSAGE_BYTES {
                return Err(format!(
                    "a failure message of {} bytes; the limit is {MAX_FAILURE_MESSAGE_BYTES} bytes",
                    failure.message.len()
                ));
            }
        }
    }
    let output_limit = (limits.output_bytes as usize).saturating_mul(LOSSY_UTF8_GROWTH);
    for (name, text) in [
        ("stdout", &report.stdout.text),
        ("stderr", &report.stderr.text),
    ] {
        if text.len() > output_limit {
            return Err(format!(
                "{} bytes of {name}; this job keeps at most {} bytes of it",
                text.len(),
                limits.output_bytes
            ));
        }
    }
    Ok(())
}

impl Core {
    /// Most credit a worker with `slots` slots may have granted at once.
    pub fn max_credit(slots: u32) -> u32 {
        slots.saturating_mul(1 + MAX_PREFETCH_PER_SLOT)
    }

    /// The worker broke the protocol: the violation is recorded, the
    /// worker is treated as gone (its attempts are retried elsewhere) and
    /// the driver is told to close its connection. Ignored for a worker
    /// not connected (already cut off or gone).
    pub fn protocol_violation(&mut self, worker: WorkerId, message: String) {
        if self.pool.get(worker).is_none() {
            return;
        }
        self.commands
            .push_back(Command::Record(Record::WorkerViolation {
                worker,
                message: message.clone(),
            }));
        self.cut_off(worker, message);
    }

    fn cut_off(&mut self, worker: WorkerId, reason: String) {
        tracing::warn!(worker, "cutting off worker: {reason}");
        self.worker_left(worker);
        self.commands.push_back(Command::CutOff { worker, reason });
    }

    /// Credit beyond slots plus the largest prefetch window is a violation.
    pub(super) fn credit_allowed(&mut self, worker: WorkerId, n: u32) -> bool {
        let Some(w) = self.pool.get(worker) else {
            return false;
        };
        let total = u64::from(w.free) + w.held.len() as u64 + u64::from(n);
        let max = Self::max_credit(w.slots);
        if total > u64::from(max) {
            let message = format!(
                "granted credit for {total} attempts; a worker with {} slots may grant at most {max}",
                w.slots
            );
            self.protocol_violation(worker, message);
            return false;
        }
        true
    }

    /// Remembers that `attempt`, held by `worker`, ended without its report.
    pub(super) fn released_without_report(&mut self, worker: WorkerId, attempt: AttemptId) {
        self.released.entry(worker).or_default().insert(attempt);
    }

    /// A report for an attempt that is neither live nor lost: benign when
    /// it crossed a `Cancel`, a lease expiry or a foreman restart; otherwise
    /// the worker was never given it, or reports it twice.
    pub(super) fn stray_report(&mut self, worker: WorkerId, attempt: AttemptId) {
        if self.pool.get(worker).is_none() {
            return;
        }
        let crossed = self
            .released
            .get_mut(&worker)
            .is_some_and(|recent| recent.take(attempt));
        if crossed || attempt < self.first_attempt {
            return;
        }
        let message = if attempt >= self.next_attempt {
            format!("a report for attempt {attempt}, which was never given to any worker")
        } else {
            format!(
                "a report for attempt {attempt}, which this worker does not hold (never given to it, or already reported)"
            )
        };
        self.protocol_violation(worker, message);
    }

    /// A report for another worker's attempt.
    pub(super) fn foreign_report(&mut self, worker: WorkerId, attempt: AttemptId, owner: WorkerId) {
        self.protocol_violation(
            worker,
            format!("a report for attempt {attempt}, which belongs to worker {owner}"),
        );
    }

    /// The live attempt's report broke the job's limits: the attempt ends
    /// as `ProtocolViolation` (retried elsewhere, its result never stored)
    /// and the worker is cut off.
    pub(super) fn reject_live_report(
        &mut self,
        held: Held,
        attempt: AttemptId,
        message: String,
    ) -> Option<TaskState> {
        let failure = Failure::new(FailureKind::ProtocolViolation, message.clone());
        let next = self.abandon_running(held, attempt, failure);
        match next {
            Some(TaskState::Queued) => {
                self.queued += 1;
                self.requeue_front(held.job, held.task);
            }
            Some(_) => self.maybe_finish(held.job),
            None => {}
        }
        self.cut_off(held.worker, message);
        next
    }

    /// The limits of the job an attempt belongs to.
    pub(super) fn limits_of(&self, held: &Held) -> Option<TaskLimits> {
        self.jobs.get(&held.job).map(|j| j.spec.limits)
    }
}
