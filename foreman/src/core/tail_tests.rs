//! Evening out a job's end: who is asked to hand back what, and where the
//! handed-back tasks go.

use wasmgrid_protocol::wire::AttemptId;
use wasmgrid_protocol::{FailureKind, TaskReport};

use super::tail::fair_share;
use super::tests::{args, events, ok, spec, Batch, Ev, Harness};
use super::{Command, WorkerSpec};
use crate::model::{TaskState, WorkerId};

/// A worker with `slots` slots that granted `credit`; `speed` 0: unknown.
fn join(h: &mut Harness, id: WorkerId, slots: u32, credit: u32, speed: u64) {
    h.core.worker_joined(
        id,
        WorkerSpec {
            slots,
            memory_bytes: 0,
            benchmark_fuel_per_sec: speed,
        },
    );
    h.core.grant_credit(id, credit);
}

fn recalls(commands: &[Command]) -> Vec<(WorkerId, Vec<AttemptId>)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Recall {
                worker, attempts, ..
            } => Some((*worker, attempts.clone())),
            _ => None,
        })
        .collect()
}

/// A success after 100 ms: far longer than a recall takes.
fn long() -> TaskReport {
    let mut report = ok();
    report.timings.run_us = 100_000;
    report
}

/// The attempts these batches send to `worker`, in order.
fn attempts_of(sent: &[Batch], worker: WorkerId) -> Vec<AttemptId> {
    sent.iter()
        .filter(|(w, _)| *w == worker)
        .flat_map(|(_, v)| v.iter().map(|&(a, _, _)| a))
        .collect()
}

/// Dispatches; the attempts sent to `worker`, in order.
fn sent_to(h: &mut Harness, worker: WorkerId) -> Vec<AttemptId> {
    attempts_of(&h.dispatch(), worker)
}

/// Two one-slot workers that each got three of a six-task job (one to
/// run, two to queue: the window before a task's time is known).
fn two_workers_holding_three_each() -> (Harness, Vec<AttemptId>, Vec<AttemptId>) {
    let mut h = Harness::new();
    join(&mut h, 1, 1, 3, 0);
    join(&mut h, 2, 1, 3, 0);
    h.core.submit_job(spec(1, 6, 0), args(6));
    let sent = h.dispatch();
    let (first, second) = (attempts_of(&sent, 1), attempts_of(&sent, 2));
    assert_eq!((first.len(), second.len()), (3, 3));
    (h, first, second)
}

#[test]
fn the_share_asked_back_finishes_both_workers_soonest() {
    let worker = |slots: u32, speed: u64| {
        let mut h = Harness::new();
        join(&mut h, 1, slots, slots, speed);
        h
    };
    // (slots, speed) of the idle worker and of the holder, the holder's
    // queue, and how late a recalled task starts (in tasks).
    let share = |idle: (u32, u64), busy: (u32, u64), spare: usize, latency: f64| {
        let (a, b) = (worker(idle.0, idle.1), worker(busy.0, busy.1));
        let (a, b) = (a.core.pool.get(1).unwrap(), b.core.pool.get(1).unwrap());
        fair_share(a, idle.0 as usize, b, spare, latency)
    };
    // Equal speeds: the queue plus half the running task, split in two.
    assert_eq!(share((1, 0), (1, 0), 1, 0.0), 1);
    assert_eq!(share((1, 0), (1, 0), 2, 0.0), 1);
    assert_eq!(share((1, 0), (1, 0), 4, 0.0), 2);
    assert_eq!(share((1, 0), (1, 0), 9, 0.0), 5);
    // Known speeds weigh in; unknown on either side count as equal.
    assert_eq!(share((1, 1_000), (1, 4_000), 2, 0.0), 0);
    assert_eq!(share((1, 4_000), (1, 1_000), 4, 0.0), 4);
    assert_eq!(share((1, 40_000), (1, 1_000), 4, 0.0), 4);
    assert_eq!(share((1, 0), (1, 4_000), 2, 0.0), 1);
    // A busy worker with more slots keeps more.
    assert_eq!(share((1, 0), (3, 0), 6, 0.0), 2);
    // Tasks short next to the recall's latency: only a long queue is worth it.
    assert_eq!(share((1, 0), (1, 0), 1, 1.7), 0);
    assert_eq!(share((1, 0), (1, 0), 2, 1.7), 0);
    assert_eq!(share((1, 0), (1, 0), 4, 1.7), 1);
    assert_eq!(share((1, 0), (1, 0), 9, 1.7), 4);
    // Long tasks: the latency hardly counts.
    assert_eq!(share((1, 0), (1, 0), 1, 0.01), 1);
}

#[test]
fn an_idle_worker_gets_an_unstarted_task_from_anothers_queue() {
    let (mut h, first, second) = two_workers_holding_three_each();
    // Worker 2 gets through all three while worker 1 is still on its first.
    for (i, &a) in second.iter().enumerate() {
        h.finish(2, a, long());
        h.core.dispatch();
        let commands = h.drain();
        match i {
            0 => assert!(recalls(&commands).is_empty(), "worker 2 still queues one"),
            // Its last task runs with nothing behind it: asked now, the
            // recalled task is there when that one ends. The newest: the
            // last worker 1 would start.
            1 => assert_eq!(recalls(&commands), [(1, vec![first[2]])]),
            _ => assert!(recalls(&commands).is_empty(), "one is on its way"),
        }
    }
    // Asked once: another dispatch asks nothing more.
    h.core.dispatch();
    assert!(recalls(&h.drain()).is_empty());

    h.core.attempts_returned(1, &[first[2]]);
    let commands = h.drain();
    assert_eq!(
        events(&commands),
        [Ev::Abandoned(
            2,
            first[2],
            FailureKind::Cancelled,
            TaskState::Queued
        )]
    );
    let moved = super::tests::sends(&commands);
    assert_eq!(moved.len(), 1, "{commands:?}");
    assert_eq!(
        moved[0].0, 2,
        "the handed-back task goes to the idle worker"
    );
    assert_eq!(h.task_of[&moved[0].1[0]].1, 2);
    let progress = h.core.job_progress(1).unwrap();
    assert_eq!((progress.queued, progress.running), (0, 3));
    // The attempt handed back does not count against the task's retries.
    h.finish(1, first[0], long());
    h.finish(1, first[1], long());
    h.finish(2, moved[0].1[0], long());
    let progress = h.core.job_progress(1).unwrap();
    assert_eq!(progress.succeeded, 6);
    assert!(progress.state.is_finished());
}

#[test]
fn attempts_already_started_run_on_where_they_are() {
    let (mut h, first, second) = two_workers_holding_three_each();
    for &a in &second {
        h.finish(2, a, long());
    }
    h.core.dispatch();
    assert_eq!(recalls(&h.drain()), [(1, vec![first[2]])]);
    // Worker 1 had started it by then: it hands back nothing, and reports.
    h.core.attempts_returned(1, &[]);
    assert!(super::tests::sends(&h.drain()).is_empty());
    for &a in &first {
        let commands = h.finish(1, a, long());
        assert!(recalls(&commands).is_empty());
    }
    let progress = h.core.job_progress(1).unwrap();
    assert_eq!(progress.succeeded, 6);
    assert!(progress.state.is_finished());
}

#[test]
fn nothing_is_asked_back_while_tasks_are_queued() {
    let mut h = Harness::new();
    join(&mut h, 1, 1, 3, 0);
    h.core.submit_job(spec(1, 20, 0), args(20));
    assert_eq!(sent_to(&mut h, 1).len(), 3);
    // A second worker joins: it takes from the queue, not from worker 1.
    join(&mut h, 2, 1, 3, 0);
    h.core.dispatch();
    let commands = h.drain();
    assert!(recalls(&commands).is_empty());
    assert_eq!(super::tests::sends(&commands).len(), 1);
}

#[test]
fn a_much_slower_worker_is_not_given_a_faster_ones_queue() {
    let mut h = Harness::new();
    join(&mut h, 1, 1, 3, 4_000_000_000);
    join(&mut h, 2, 1, 3, 1_000_000_000);
    h.core.submit_job(spec(1, 4, 0), args(4));
    let sent = h.dispatch();
    let (fast, slow) = (attempts_of(&sent, 1), attempts_of(&sent, 2));
    assert_eq!((fast.len(), slow.len()), (2, 2));
    for &a in &slow {
        h.finish(2, a, long());
    }
    h.core.dispatch();
    // The fast one has 1.5 tasks to go at 4× the speed: its queued task
    // would finish later on the slow one.
    assert!(recalls(&h.drain()).is_empty());
}

#[test]
fn a_task_shorter_than_a_recall_stays_where_it_is() {
    let (mut h, first, second) = two_workers_holding_three_each();
    // Tasks of 0.3 ms: worker 1's one queued task starts there sooner than
    // it could on worker 2 after a recall.
    let mut short = ok();
    short.timings.run_us = 300;
    for &a in &second {
        h.finish(2, a, short.clone());
    }
    h.core.dispatch();
    assert!(recalls(&h.drain()).is_empty());
    assert_eq!(h.core.outstanding(1), first.len());
}

#[test]
fn tasks_asked_back_for_a_worker_that_left_go_to_whoever_is_free() {
    let (mut h, first, second) = two_workers_holding_three_each();
    for &a in &second {
        h.finish(2, a, long());
    }
    h.core.dispatch();
    assert_eq!(recalls(&h.drain()), [(1, vec![first[2]])]);
    h.core.worker_left(2);
    h.drain();
    h.core.attempts_returned(1, &[first[2]]);
    assert!(super::tests::sends(&h.drain()).is_empty());
    assert_eq!(h.core.queued_tasks(), 1);
    // It waits in the queue for whoever has room: worker 1, once its
    // running task is done (tasks of 100 ms: one queued per slot).
    h.finish(1, first[0], long());
    let again = sent_to(&mut h, 1);
    let tasks: Vec<_> = again.iter().map(|a| h.task_of[a].1).collect();
    assert_eq!(tasks, [2]);
}
