use std::collections::HashMap;
use std::sync::Arc;

use wasmgrid_protocol::wire::AttemptId;
use wasmgrid_protocol::{
    CacheSource, CapturedOutput, Failure, FailureKind, TaskLimits, TaskReport, TaskTimings,
};

use super::sim::assert_consistent;
use super::{Command, Core, WorkerSpec};
use crate::model::{JobId, JobSpec, JobState, Record, TaskIndex, TaskState, WorkerId};

pub(super) fn spec(id: JobId, tasks: u32, max_retries: u32) -> JobSpec {
    JobSpec {
        id,
        module: [id as u8; 32],
        limits: TaskLimits::default(),
        max_retries,
        priority: 0,
        task_count: tasks,
        scheduler: Default::default(),
        not_before_ms: None,
        retry_deterministic: false,
    }
}

pub(super) fn args(n: u32) -> Vec<Arc<str>> {
    (0..n).map(|i| Arc::from(format!("[{i}]"))).collect()
}

pub(super) fn report(outcome: Result<&str, FailureKind>) -> TaskReport {
    TaskReport {
        outcome: outcome
            .map(str::to_string)
            .map_err(|kind| Failure::new(kind, "test")),
        fuel_used: 1,
        cache: CacheSource::Memory,
        timings: TaskTimings::default(),
        stdout: CapturedOutput::default(),
        stderr: CapturedOutput::default(),
    }
}

pub(super) fn ok() -> TaskReport {
    report(Ok("null"))
}

pub(super) fn err(kind: FailureKind) -> TaskReport {
    report(Err(kind))
}

/// One `Send`: the worker and (attempt, job, task) per assignment.
pub(super) type Batch = (WorkerId, Vec<(AttemptId, JobId, TaskIndex)>);

/// A core plus what it said: which task each attempt runs.
pub(super) struct Harness {
    pub(super) core: Core,
    pub(super) task_of: HashMap<AttemptId, (JobId, TaskIndex)>,
}

impl Harness {
    pub(super) fn new() -> Self {
        Harness {
            core: Core::new(100),
            task_of: HashMap::new(),
        }
    }

    /// Drains the commands, learning attempt → task from `AttemptStarted`.
    pub(super) fn drain(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        while let Some(c) = self.core.poll_command() {
            if let Command::Record(Record::AttemptStarted {
                job, task, attempt, ..
            }) = &c
            {
                self.task_of.insert(*attempt, (*job, *task));
            }
            out.push(c);
        }
        assert_consistent(&self.core);
        out
    }

    /// Dispatches; returns (worker, [(attempt, job, task)]) per Send.
    pub(super) fn dispatch(&mut self) -> Vec<Batch> {
        self.core.dispatch();
        let commands = self.drain();
        sends(&commands)
            .into_iter()
            .map(|(w, attempts)| {
                let tasks = attempts
                    .into_iter()
                    .map(|a| {
                        let (j, t) = self.task_of[&a];
                        (a, j, t)
                    })
                    .collect();
                (w, tasks)
            })
            .collect()
    }

    pub(super) fn finish(
        &mut self,
        worker: WorkerId,
        attempt: AttemptId,
        r: TaskReport,
    ) -> Vec<Command> {
        self.core.attempt_finished(worker, attempt, r);
        self.drain()
    }

    pub(super) fn worker(&mut self, id: WorkerId, credit: u32) {
        self.core.worker_joined(id, WorkerSpec::with_slots(credit));
        self.core.grant_credit(id, credit);
    }
}

pub(super) fn sends(commands: &[Command]) -> Vec<(WorkerId, Vec<AttemptId>)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Send {
                worker,
                assignments,
            } => Some((*worker, assignments.iter().map(|a| a.attempt).collect())),
            _ => None,
        })
        .collect()
}

fn job_states(commands: &[Command]) -> Vec<(JobId, JobState)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Record(Record::JobStateChanged { job, state }) => Some((*job, *state)),
            _ => None,
        })
        .collect()
}

/// An attempt's end, compactly: `Ended(task, attempt, task_state)` or
/// `Abandoned(task, attempt, kind, task_state)`.
#[derive(Debug, PartialEq)]
pub(super) enum Ev {
    Ended(TaskIndex, AttemptId, TaskState),
    Abandoned(TaskIndex, AttemptId, FailureKind, TaskState),
}

use Ev::{Abandoned, Ended};
use TaskState as S;

pub(super) fn events(commands: &[Command]) -> Vec<Ev> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Record(Record::AttemptEnded {
                task,
                attempt,
                task_state,
                ..
            }) => Some(Ended(*task, *attempt, *task_state)),
            Command::Record(Record::AttemptAbandoned {
                task,
                attempt,
                failure,
                task_state,
                ..
            }) => Some(Abandoned(*task, *attempt, failure.kind, *task_state)),
            _ => None,
        })
        .collect()
}

pub(super) fn tasks_of(sent: &[Batch]) -> Vec<(JobId, TaskIndex)> {
    sent.iter()
        .flat_map(|(_, v)| v.iter().map(|&(_, j, t)| (j, t)))
        .collect()
}

#[test]
fn fifo_across_two_jobs_then_task_index() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 3, 0), args(3));
    h.core.submit_job(spec(2, 2, 0), args(2));
    h.worker(7, 2);
    let first = h.dispatch();
    assert_eq!(tasks_of(&first), [(1, 0), (1, 1)]);
    h.core.grant_credit(7, 10);
    let second = h.dispatch();
    assert_eq!(second.len(), 1, "one batch per worker per dispatch");
    assert_eq!(tasks_of(&second), [(1, 2), (2, 0), (2, 1)]);
    // Attempt ids are fresh and monotonic from `new`.
    let ids: Vec<_> = first
        .iter()
        .chain(&second)
        .flat_map(|(_, v)| v.iter().map(|x| x.0))
        .collect();
    assert_eq!(ids, [100, 101, 102, 103, 104]);
    assert_eq!(h.core.next_attempt_id(), 105);
}

#[test]
fn assignments_carry_args_module_and_limits_and_records_come_first() {
    let mut h = Harness::new();
    h.core.tick(5_000);
    h.core.submit_job(spec(3, 1, 0), args(1));
    h.worker(1, 1);
    h.core.dispatch();
    let c = h.drain();
    assert_eq!(job_states(&c), [(3, JobState::Running)]);
    let started = Record::AttemptStarted {
        job: 3,
        task: 0,
        attempt: 100,
        worker: 1,
        at_ms: 5_000,
    };
    assert_eq!(c[1], Command::Record(started));
    let Command::Send { assignments, .. } = &c[2] else {
        panic!("expected a Send, got {c:?}");
    };
    assert_eq!(assignments[0].args, "[0]");
    assert_eq!(assignments[0].module, [3; 32]);
    assert_eq!(assignments[0].limits, TaskLimits::default());
}

#[test]
fn credit_is_never_exceeded() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 10, 0), args(10));
    h.worker(1, 3);
    assert_eq!(tasks_of(&h.dispatch()).len(), 3);
    assert!(h.dispatch().is_empty(), "no credit left");
    assert_eq!((h.core.outstanding(1), h.core.free_credit(1)), (3, 0));
    // A report returns one credit.
    h.finish(1, 100, ok());
    assert_eq!(tasks_of(&h.dispatch()).len(), 1);
    h.core.grant_credit(1, 2);
    assert_eq!(tasks_of(&h.dispatch()).len(), 2);
    assert_eq!(h.core.outstanding(1), 5);
    assert!(h.dispatch().is_empty());
    // Credit for an unknown worker goes nowhere.
    h.core.grant_credit(99, 5);
    assert!(h.dispatch().is_empty());
}

#[test]
fn a_short_queue_is_spread_over_workers() {
    let mut h = Harness::new();
    h.worker(1, 10);
    h.worker(2, 10);
    h.core.submit_job(spec(1, 6, 0), args(6));
    let sent = h.dispatch();
    let sizes: Vec<_> = sent.iter().map(|(w, v)| (*w, v.len())).collect();
    assert_eq!(sizes, [(1, 3), (2, 3)]);
    // A long queue fills both, each within its credit, one batch each.
    h.core.submit_job(spec(2, 30, 0), args(30));
    let sent = h.dispatch();
    let sizes: Vec<_> = sent.iter().map(|(w, v)| (*w, v.len())).collect();
    assert_eq!(sizes, [(1, 7), (2, 7)]);
    // One task at a time goes round, not always to the same worker.
    let mut h = Harness::new();
    h.worker(1, 5);
    h.worker(2, 5);
    let mut got = Vec::new();
    for job in 1..=4 {
        h.core.submit_job(spec(job, 1, 0), args(1));
        got.extend(h.dispatch().into_iter().map(|(w, _)| w));
    }
    assert_eq!(got, [1, 2, 1, 2]);
}

#[test]
fn success_and_deterministic_failure_finish_the_task() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 2, 5), args(2));
    h.worker(1, 2);
    h.dispatch();
    assert_eq!(
        events(&h.finish(1, 100, ok())),
        [Ended(0, 100, S::Succeeded)]
    );
    let c = h.finish(1, 101, err(FailureKind::Trap));
    assert_eq!(events(&c), [Ended(1, 101, S::Failed)]);
    assert_eq!(job_states(&c), [(1, JobState::Failed)]);
    assert!(h.dispatch().is_empty(), "not retried");
    for kind in FailureKind::ALL
        .into_iter()
        .filter(|k| k.is_deterministic())
    {
        let mut h = Harness::new();
        h.core.submit_job(spec(1, 1, 5), args(1));
        h.worker(1, 1);
        h.dispatch();
        h.finish(1, 100, err(kind));
        assert_eq!(h.core.task_state(1, 0), Some(S::Failed), "{kind}");
    }
}

#[test]
fn timeout_is_retried_at_the_front_until_retries_run_out() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 4, 1), args(4));
    h.worker(1, 2);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 0), (1, 1)]);
    let c = h.finish(1, 101, err(FailureKind::Timeout));
    assert_eq!(events(&c), [Ended(1, 101, S::Queued)]);
    // Task 1 goes before tasks 2 and 3.
    assert_eq!(tasks_of(&h.dispatch()), [(1, 1)]);
    let c = h.finish(1, 102, err(FailureKind::Timeout));
    assert_eq!(events(&c), [Ended(1, 102, S::Failed)]);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 2)]);
    let p = h.core.job_progress(1).unwrap();
    assert_eq!((p.running, p.queued, p.failed), (2, 1, 1));
    // With no retries, a timeout fails at once.
    h.core.submit_job(spec(2, 1, 0), args(1));
    h.finish(1, 100, ok());
    h.finish(1, 103, ok());
    assert_eq!(h.dispatch(), [(1, vec![(104, 1, 3), (105, 2, 0)])]);
    let c = h.finish(1, 105, err(FailureKind::Timeout));
    assert_eq!(job_states(&c), [(2, JobState::Failed)]);
}

#[test]
fn worker_left_requeues_at_the_front_as_worker_lost() {
    use FailureKind::WorkerLost as Lost;
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 6, 1), args(6));
    h.worker(1, 2);
    h.dispatch();
    h.core.worker_joined(2, WorkerSpec::with_slots(2));
    h.core.grant_credit(2, 1);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 2)]);
    h.core.worker_left(1);
    let c = h.drain();
    assert_eq!(
        events(&c),
        [
            Abandoned(0, 100, Lost, S::Queued),
            Abandoned(1, 101, Lost, S::Queued)
        ]
    );
    assert_eq!(c.len(), 2);
    assert_eq!((h.core.outstanding(1), h.core.free_credit(1)), (0, 0));
    // Lost tasks go first, in their order.
    h.core.grant_credit(2, 3);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 0), (1, 1), (1, 3)]);
    // Their second loss uses up max_retries = 1.
    h.core.worker_left(2);
    assert_eq!(
        events(&h.drain()),
        [
            Abandoned(2, 102, Lost, S::Queued),
            Abandoned(0, 103, Lost, S::Failed),
            Abandoned(1, 104, Lost, S::Failed),
            Abandoned(3, 105, Lost, S::Queued),
        ]
    );
    // A rejoined worker starts with no credit.
    h.core.worker_joined(1, WorkerSpec::with_slots(4));
    assert!(h.dispatch().is_empty());
}

#[test]
fn late_report_after_reassignment_is_taken_once() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 2, 3), args(2));
    h.worker(1, 1);
    h.dispatch(); // task 0 = attempt 100 on worker 1
    h.core.worker_left(1);
    h.drain();
    h.worker(2, 1);
    assert_eq!(h.dispatch(), [(2, vec![(101, 1, 0)])]);
    // Worker 1 comes back and reports the lost attempt.
    h.worker(1, 1);
    assert_eq!(h.dispatch(), [(1, vec![(102, 1, 1)])]);
    let c = h.finish(1, 100, ok());
    // The loser's record first, so the winner's result is what a store keeps.
    let cancelled = Abandoned(0, 101, FailureKind::Cancelled, S::Succeeded);
    assert_eq!(events(&c), [cancelled, Ended(0, 100, S::Succeeded)]);
    assert_eq!(
        c[1],
        Command::Cancel {
            worker: 2,
            attempts: vec![101]
        }
    );
    assert_eq!(c.len(), 3);
    assert_eq!(
        h.core.free_credit(2),
        1,
        "the cancelled attempt's credit is back"
    );
    assert_eq!(
        h.core.free_credit(1),
        1,
        "the late report returned its credit"
    );
    // The cancelled attempt's report, which crossed the Cancel, is dropped.
    assert!(h.finish(2, 101, err(FailureKind::Trap)).is_empty());
    assert_eq!(h.core.free_credit(2), 1);
    let c = h.finish(1, 102, ok());
    assert_eq!(job_states(&c), [(1, JobState::Completed)]);
    let p = h.core.job_progress(1).unwrap();
    assert_eq!((p.succeeded, p.failed, p.cancelled), (2, 0, 0));
}

#[test]
fn a_finished_job_leaves_memory_at_the_next_tick_and_late_reports_still_return_credit() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 1, 3), args(1));
    h.worker(1, 1);
    h.dispatch(); // attempt 100 on worker 1, which then leaves
    h.core.worker_left(1);
    h.drain();
    h.worker(2, 1);
    assert_eq!(h.dispatch(), [(2, vec![(101, 1, 0)])]);
    let c = h.finish(2, 101, ok());
    assert_eq!(job_states(&c), [(1, JobState::Completed)]);
    assert_eq!(h.core.jobs_in_memory(), 1);
    h.core.tick(1);
    assert_eq!(h.core.jobs_in_memory(), 0);
    assert_eq!(h.core.job_progress(1), None);
    // Worker 1 comes back and reports the lost attempt: nothing to record,
    // no violation, and its credit is back.
    h.worker(1, 0);
    assert!(h.finish(1, 100, ok()).is_empty());
    assert_eq!(h.core.free_credit(1), 1);
    // A cancelled job leaves too, and cancelling it again changes nothing.
    h.core.submit_job(spec(2, 3, 0), args(3));
    assert!(h.core.cancel_job(2));
    h.drain();
    h.core.tick(2);
    assert_eq!(h.core.jobs_in_memory(), 0);
    assert!(!h.core.cancel_job(2));
    assert!(h.drain().is_empty());
}

#[test]
fn a_lost_attempt_is_forgotten_an_hour_on_and_its_report_is_then_benign() {
    let mut h = Harness::new();
    h.core.tick(1_000);
    h.core.submit_job(spec(1, 2, 3), args(2));
    h.worker(1, 2);
    h.dispatch(); // attempts 100 and 101 on worker 1, which leaves
    h.core.worker_left(1);
    h.drain();
    assert_eq!(h.core.lost_attempts(), 2);
    h.core.tick(1_000 + super::LOST_KEPT_MS - 1);
    assert_eq!(h.core.lost_attempts(), 2);
    h.core.tick(1_000 + super::LOST_KEPT_MS);
    assert_eq!(h.core.lost_attempts(), 0);
    // Worker 1 comes back with a report that old: dropped, without a
    // violation (it crossed the loss) and without credit.
    h.worker(1, 0);
    let c = h.finish(1, 100, ok());
    assert!(c.is_empty(), "{c:?}");
    assert_eq!(h.core.free_credit(1), 0);
}

#[test]
fn late_report_for_a_requeued_task_finishes_it_and_its_retry_is_skipped() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 2, 3), args(2));
    h.worker(1, 1);
    h.dispatch();
    h.core.worker_left(1);
    h.worker(1, 0);
    h.drain();
    let c = h.finish(1, 100, err(FailureKind::Timeout));
    assert!(c.is_empty(), "a late Timeout changes nothing, unrecorded");
    assert_eq!(h.core.task_state(1, 0), Some(S::Queued));
    // The late Timeout returned worker 1's credit; worker 2 joins too.
    h.worker(2, 1);
    assert_eq!(
        h.dispatch(),
        [(1, vec![(101, 1, 0)]), (2, vec![(102, 1, 1)])]
    );
    // A lost attempt that reports a deterministic failure while its task waits.
    h.core.worker_left(1);
    h.drain();
    h.worker(1, 0);
    let c = h.finish(1, 101, err(FailureKind::GuestError));
    assert_eq!(events(&c), [Ended(0, 101, S::Failed)]);
    assert_eq!(h.core.queued_tasks(), 0);
    assert!(h.dispatch().is_empty(), "the stale retry entry is skipped");
    let c = h.finish(2, 102, ok());
    assert_eq!(job_states(&c), [(1, JobState::Failed)]);
}

#[test]
fn a_stored_success_never_changes() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 2, 3), args(2));
    h.worker(1, 2);
    h.dispatch();
    h.finish(1, 100, ok());
    // A second report of the attempt cuts the worker off; the task keeps its result.
    let c = h.finish(1, 100, err(FailureKind::Trap));
    assert_eq!(
        events(&c),
        [Abandoned(1, 101, FailureKind::WorkerLost, S::Queued)]
    );
    assert_eq!(h.core.task_state(1, 0), Some(S::Succeeded));
    h.worker(1, 1);
    h.dispatch();
    let c = h.finish(1, 100, err(FailureKind::Trap));
    assert_eq!(
        events(&c),
        [Abandoned(1, 102, FailureKind::WorkerLost, S::Queued)]
    );
    assert_eq!(h.core.task_state(1, 0), Some(S::Succeeded));
    assert_eq!(h.core.job_progress(1).unwrap().succeeded, 1);
}

#[test]
fn cancel_with_queued_and_running_tasks() {
    use FailureKind::Cancelled;
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 5, 0), args(5));
    h.core.submit_job(spec(2, 1, 0), args(1));
    h.worker(1, 1);
    h.worker(2, 1);
    h.dispatch(); // 100 on 1, 101 on 2
    h.finish(2, 101, ok());
    h.dispatch(); // 102 on 2
    assert!(h.core.cancel_job(1));
    let c = h.drain();
    let abandoned = [
        Abandoned(0, 100, Cancelled, S::Cancelled),
        Abandoned(2, 102, Cancelled, S::Cancelled),
    ];
    assert_eq!(events(&c), abandoned);
    assert!(c.contains(&Command::Cancel {
        worker: 1,
        attempts: vec![100]
    }));
    assert!(c.contains(&Command::Cancel {
        worker: 2,
        attempts: vec![102]
    }));
    assert_eq!(job_states(&c), [(1, JobState::Cancelled)]);
    assert_eq!(c.len(), 5);
    let p = h.core.job_progress(1).unwrap();
    let counts = (p.state, p.cancelled, p.succeeded, p.queued, p.running);
    assert_eq!(counts, (JobState::Cancelled, 4, 1, 0, 0));
    assert_eq!((h.core.free_credit(1), h.core.free_credit(2)), (1, 1));
    assert_eq!((h.core.outstanding(1), h.core.outstanding(2)), (0, 0));
    assert!(
        h.finish(1, 100, ok()).is_empty(),
        "report after cancel is dropped"
    );
    assert!(!h.core.cancel_job(1));
    assert!(!h.core.cancel_job(42));
    // The next job gets the workers.
    assert_eq!(tasks_of(&h.dispatch()), [(2, 0)]);
    assert!(h.core.forget_job(1));
    assert_eq!(h.core.job_progress(1), None);
    // A job cancelled before it started.
    h.core.submit_job(spec(3, 3, 0), args(3));
    assert!(h.core.cancel_job(3));
    assert_eq!(job_states(&h.drain()), [(3, JobState::Cancelled)]);
    h.core.grant_credit(1, 5);
    assert!(h.dispatch().is_empty());
    assert_eq!(h.core.queued_tasks(), 0);
}

#[test]
fn restore_job_requeues_unfinished_tasks_with_their_attempts() {
    let mut h = Harness::new();
    // Out-of-range and unfinished entries in `done` are ignored; task 4 has no count.
    let done = vec![
        (0, S::Succeeded),
        (2, S::Failed),
        (9, S::Succeeded),
        (3, S::Running),
    ];
    h.core
        .restore_job(spec(1, 5, 2), args(5), done, vec![1, 0, 1, 2]);
    assert!(h.drain().is_empty());
    let p = h.core.job_progress(1).unwrap();
    let counts = (p.state, p.total, p.queued, p.succeeded, p.failed);
    assert_eq!(counts, (JobState::Running, 5, 3, 1, 1));
    h.worker(1, 5);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 1), (1, 3), (1, 4)]);
    // Task 3 had 2 attempts: this was its third, so a timeout fails it.
    let c = h.finish(1, 101, err(FailureKind::Timeout));
    assert_eq!(events(&c), [Ended(3, 101, S::Failed)]);
    h.finish(1, 100, ok());
    let c = h.finish(1, 102, ok());
    assert_eq!(job_states(&c), [(1, JobState::Failed)]);
    // A restored job with everything done finishes at once; an unstarted one stays Queued.
    let done = vec![(0, S::Succeeded), (1, S::Succeeded)];
    h.core.restore_job(spec(2, 2, 0), args(2), done, vec![]);
    assert_eq!(job_states(&h.drain()), [(2, JobState::Completed)]);
    h.core.restore_job(spec(3, 1, 0), args(1), vec![], vec![]);
    assert_eq!(h.core.job_progress(3).unwrap().state, JobState::Queued);
}

#[test]
fn job_completion_is_emitted_exactly_once() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 2, 0), args(2));
    h.worker(1, 2);
    h.dispatch();
    let mut all = h.finish(1, 100, ok());
    all.extend(h.finish(1, 101, ok()));
    all.extend(h.finish(1, 101, ok()));
    h.core.worker_left(1);
    all.extend(h.drain());
    assert!(!h.core.cancel_job(1));
    all.extend(h.drain());
    assert_eq!(job_states(&all), [(1, JobState::Completed)]);
    // An empty job completes at once; a second submit of a known id is ignored.
    h.core.submit_job(spec(2, 0, 0), Vec::new());
    h.core.submit_job(spec(2, 3, 0), args(3));
    assert_eq!(job_states(&h.drain()), [(2, JobState::Completed)]);
    assert_eq!(h.core.job_progress(2).unwrap().total, 0);
}

#[test]
fn rejoin_under_a_known_id_abandons_the_old_connection() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 1, 1), args(1));
    h.worker(1, 1);
    h.dispatch();
    h.core.worker_joined(1, WorkerSpec::with_slots(1));
    let lost = Abandoned(0, 100, FailureKind::WorkerLost, S::Queued);
    assert_eq!(events(&h.drain()), [lost]);
    assert_eq!(h.core.worker_slots(1), Some(1));
}
