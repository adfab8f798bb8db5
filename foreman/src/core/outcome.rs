//! What an attempt's outcome means for its task and job: success, a
//! deterministic failure, a retry, or a late report taken once.

use wasmgrid_protocol::wire::AttemptId;
use wasmgrid_protocol::{Failure, FailureKind, TaskReport};

use super::{violations, Command, Core, Held};
use crate::model::{JobId, JobState, Record, TaskState, WorkerId};

impl Core {
    /// A report for an attempt. Also returns one credit to that worker (the
    /// worker does not send Credit for it). A report that crossed a `Cancel`,
    /// a lease expiry or a restart is dropped silently (no records, no
    /// credit). A report for another worker's attempt, for one never given,
    /// a duplicate, or one over the job's limits (result, output) or with a
    /// result that is not JSON is a protocol violation: the worker is cut
    /// off and the report never stored (see `violations`).
    pub fn attempt_finished(&mut self, worker: WorkerId, attempt: AttemptId, report: TaskReport) {
        if let Some(held) = self.live.get(&attempt).copied() {
            if held.worker != worker {
                self.foreign_report(worker, attempt, held.worker);
                return;
            }
            self.live.remove(&attempt);
            self.pool.release(worker, attempt);
            if let Some(limits) = self.limits_of(&held) {
                if let Err(problem) = violations::check_report(&report, &limits) {
                    self.reject_live_report(held, attempt, format!("sent {problem}"));
                    return;
                }
            }
            self.learn(worker, held.job, &report);
            if matches!(&report.outcome, Err(f) if f.kind == FailureKind::Timeout) {
                self.infrastructure_failure(worker);
            }
            self.finish_live(held, attempt, report);
        } else if let Some(held) = self.lost.get(&attempt).copied() {
            if held.worker != worker {
                self.foreign_report(worker, attempt, held.worker);
                return;
            }
            if let Some(released) = self.released.get_mut(&worker) {
                released.take(attempt);
            }
            self.lost.remove(&attempt);
            if let Some(limits) = self.limits_of(&held) {
                if let Err(problem) = violations::check_report(&report, &limits) {
                    self.protocol_violation(worker, format!("sent {problem}"));
                    return;
                }
            }
            self.pool.grant(worker, 1);
            self.finish_late(held, attempt, report);
        } else {
            self.stray_report(worker, attempt);
        }
    }

    /// Folds a successful report into the worker's speed and the job's fuel
    /// per task, which the performance scheduler plans with.
    fn learn(&mut self, worker: WorkerId, job: JobId, report: &TaskReport) {
        let run_us = report.timings.run_us;
        if let Some(job) = self.jobs.get_mut(&job) {
            let task_us = (report.timings.instantiate_us + run_us).max(1) as f64;
            job.task_us = if job.task_us > 0.0 {
                0.8 * job.task_us + 0.2 * task_us
            } else {
                task_us
            };
        }
        if report.outcome.is_err() || report.fuel_used == 0 || run_us == 0 {
            return;
        }
        self.pool
            .observe_speed(worker, report.fuel_used as f64 * 1e6 / run_us as f64);
        if let Some(job) = self.jobs.get_mut(&job) {
            let fuel = report.fuel_used as f64;
            job.fuel_per_task = if job.fuel_per_task > 0.0 {
                0.8 * job.fuel_per_task + 0.2 * fuel
            } else {
                fuel
            };
        }
    }

    fn record_ended(
        &mut self,
        held: Held,
        attempt: AttemptId,
        report: TaskReport,
        next: TaskState,
    ) {
        self.commands
            .push_back(Command::Record(Record::AttemptEnded {
                job: held.job,
                task: held.task,
                attempt,
                worker: held.worker,
                report: Box::new(report),
                task_state: next,
            }));
    }

    /// Ends `attempt`, no longer live, without a report (its worker left or
    /// its lease ran out) if it was still its task's current attempt: the
    /// task is queued again or, out of retries, failed; the record is
    /// emitted. The caller requeues or finishes. `None` when the attempt had
    /// already been superseded.
    pub(super) fn abandon_running(
        &mut self,
        held: Held,
        attempt: AttemptId,
        failure: Failure,
    ) -> Option<TaskState> {
        let job = self.jobs.get_mut(&held.job)?;
        let task = job.tasks.get_mut(held.task as usize)?;
        if task.current != Some(attempt) {
            return None;
        }
        task.current = None;
        let next = retry_state(task.attempts, job.spec.max_retries);
        task.state = next;
        job.progress.move_task(TaskState::Running, next);
        self.commands
            .push_back(Command::Record(Record::AttemptAbandoned {
                job: held.job,
                task: held.task,
                attempt,
                worker: held.worker,
                failure,
                task_state: next,
            }));
        Some(next)
    }

    /// The report of the attempt running the task now.
    fn finish_live(&mut self, held: Held, attempt: AttemptId, report: TaskReport) {
        let Some(job) = self.jobs.get_mut(&held.job) else {
            return;
        };
        let max_retries = job.spec.max_retries;
        let final_failures = !job.spec.retry_deterministic;
        let Some(task) = job.tasks.get_mut(held.task as usize) else {
            return;
        };
        task.current = None;
        let next = match &report.outcome {
            Ok(_) => TaskState::Succeeded,
            Err(f) if f.kind.is_deterministic() && final_failures => TaskState::Failed,
            Err(_) => retry_state(task.attempts, max_retries),
        };
        task.state = next;
        job.progress.move_task(TaskState::Running, next);
        self.record_ended(held, attempt, report, next);
        if next == TaskState::Queued {
            self.queued += 1;
            self.requeue_front(held.job, held.task);
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
                self.released_without_report(other.worker, current);
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
        self.record_ended(held, attempt, report, next);
        self.maybe_finish(held.job);
    }

    /// Emits the job's final state once no task is queued or running.
    pub(super) fn maybe_finish(&mut self, job_id: JobId) {
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
        job.queue.clear();
        if job.task_us > 0.0 {
            self.task_us_by_module
                .remember(job.spec.module, job.task_us);
        }
        self.order.remove(&job.spec);
        self.finished.push(job_id);
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
