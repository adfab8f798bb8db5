//! Reports and credit a worker has no right to send: each cuts the worker
//! off, is recorded, and changes no task's outcome; reports that merely
//! crossed a cancel, a lease expiry or a restart stay benign.

use wasmgrid_protocol::wire::MAX_PREFETCH_PER_SLOT;
use wasmgrid_protocol::{CapturedOutput, FailureKind, TaskLimits};

use super::tests::{args, err, events, ok, report, spec, Ev, Harness};
use super::{Command, Core, WorkerSpec};
use crate::model::{Record, TaskState as S, WorkerId};

/// The workers cut off, and the violation messages recorded, in order.
fn cut_offs(commands: &[Command]) -> (Vec<WorkerId>, Vec<String>) {
    let cut = commands
        .iter()
        .filter_map(|c| match c {
            Command::CutOff { worker, .. } => Some(*worker),
            _ => None,
        })
        .collect();
    let recorded = commands
        .iter()
        .filter_map(|c| match c {
            Command::Record(Record::WorkerViolation { message, .. }) => Some(message.clone()),
            Command::Record(Record::AttemptAbandoned { failure, .. })
                if failure.kind == FailureKind::ProtocolViolation =>
            {
                Some(failure.message.clone())
            }
            _ => None,
        })
        .collect();
    (cut, recorded)
}

#[test]
fn foreign_duplicate_and_never_given_reports_cut_the_worker_off() {
    let mut h = Harness::new();
    h.core.submit_job(spec(1, 4, 3), args(4));
    h.worker(1, 2);
    h.worker(2, 2);
    h.dispatch(); // 100, 101 on 1; 102, 103 on 2
                  // Worker 2 reports worker 1's attempt: worker 2 is cut off, its own
                  // attempts go back to the queue, and attempt 100 still runs on 1.
    let c = h.finish(2, 100, ok());
    let (cut, recorded) = cut_offs(&c);
    assert_eq!(cut, [2]);
    assert!(recorded[0].contains("belongs to worker 1"), "{recorded:?}");
    assert_eq!(
        events(&c),
        [
            Ev::Abandoned(2, 102, FailureKind::WorkerLost, S::Queued),
            Ev::Abandoned(3, 103, FailureKind::WorkerLost, S::Queued)
        ]
    );
    assert_eq!(h.core.task_state(1, 0), Some(S::Running));
    // Worker 1 reports 100 twice: the second one cuts it off.
    assert!(cut_offs(&h.finish(1, 100, ok())).0.is_empty());
    let c = h.finish(1, 100, ok());
    let (cut, recorded) = cut_offs(&c);
    assert_eq!(cut, [1]);
    assert!(recorded[0].contains("does not hold"), "{recorded:?}");
    assert_eq!(h.core.task_state(1, 0), Some(S::Succeeded));
    // A rejoined worker reporting an attempt never handed out.
    h.worker(3, 1);
    let c = h.finish(3, 9_999, ok());
    let (cut, recorded) = cut_offs(&c);
    assert_eq!(cut, [3]);
    assert!(recorded[0].contains("never given"), "{recorded:?}");
    // A worker no longer connected is not cut off again.
    assert!(h.finish(3, 9_999, ok()).is_empty());
    let p = h.core.job_progress(1).unwrap();
    assert_eq!((p.succeeded, p.running, p.queued), (1, 0, 3));
}

#[test]
fn reports_that_crossed_a_cancel_a_lease_expiry_or_a_restart_are_benign() {
    let mut h = Harness::new(); // attempts from 100
    let mut quick = spec(1, 2, 3);
    quick.limits.timeout_ms = 1_000;
    h.core.submit_job(quick, args(2));
    h.core.submit_job(spec(2, 1, 3), args(1));
    h.worker(1, 3);
    h.dispatch(); // 100, 101 (job 1), 102 (job 2) on 1
    assert!(h.core.cancel_job(2));
    h.drain();
    assert!(h.finish(1, 102, err(FailureKind::Cancelled)).is_empty());
    // Attempt 100's lease runs out; its report arrives just after.
    h.core.tick(1_000 + 10_000 + 1);
    let expired = h.drain();
    assert!(events(&expired).contains(&Ev::Abandoned(0, 100, FailureKind::Timeout, S::Queued)));
    assert!(h.finish(1, 100, ok()).is_empty());
    // An attempt from before the foreman restarted (ids below 100).
    assert!(h.finish(1, 42, ok()).is_empty());
    assert!(cut_offs(&h.drain()).0.is_empty());
    assert_eq!(h.core.worker_slots(1), Some(3), "still connected");
}

#[test]
fn results_over_the_limits_or_not_json_are_never_stored() {
    let limits = TaskLimits {
        result_bytes: 8,
        output_bytes: 4,
        ..TaskLimits::default()
    };
    let mut big_stdout = ok();
    big_stdout.stdout = CapturedOutput {
        text: "x".repeat(13),
        truncated: true,
    };
    let cases = [
        (report(Ok("[1,2,3,4,5]")), "a result of 11 bytes"),
        (report(Ok("{nope")), "not valid JSON"),
        (big_stdout, "13 bytes of stdout"),
    ];
    for (bad, named) in cases {
        let mut h = Harness::new();
        let mut job = spec(1, 1, 3);
        job.limits = limits;
        h.core.submit_job(job, args(1));
        h.worker(1, 1);
        h.dispatch(); // 100 on 1
        let c = h.finish(1, 100, bad);
        let (cut, recorded) = cut_offs(&c);
        assert_eq!(cut, [1]);
        assert!(
            recorded[0].contains(named),
            "{recorded:?} should name {named}"
        );
        assert_eq!(
            events(&c),
            [Ev::Abandoned(
                0,
                100,
                FailureKind::ProtocolViolation,
                S::Queued
            )]
        );
        assert!(!c
            .iter()
            .any(|c| matches!(c, Command::Record(Record::AttemptEnded { .. }))));
        // An honest worker runs the retry.
        h.worker(2, 1);
        assert_eq!(h.dispatch(), [(2, vec![(101, 1, 0)])]);
        h.finish(2, 101, report(Ok("[1]")));
        assert_eq!(h.core.task_state(1, 0), Some(S::Succeeded));
    }
}

#[test]
fn credit_beyond_slots_and_the_prefetch_window_is_a_violation() {
    let mut h = Harness::new();
    h.core.worker_joined(1, WorkerSpec::with_slots(2));
    let max = Core::max_credit(2);
    assert_eq!(max, 2 * (1 + MAX_PREFETCH_PER_SLOT));
    h.core.grant_credit(1, max);
    assert!(h.drain().is_empty());
    h.core.grant_credit(1, 1);
    let (cut, recorded) = cut_offs(&h.drain());
    assert_eq!(cut, [1]);
    assert!(recorded[0].contains("may grant at most"), "{recorded:?}");
    assert_eq!(h.core.free_credit(1), 0);
}
