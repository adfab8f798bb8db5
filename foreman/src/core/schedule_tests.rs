//! Each scheduler's choices, memory fit, delayed jobs, leases, cooldown
//! and drain, on small hand-built grids.

use wasmgrid_protocol::{FailureKind, TaskReport};

use super::tests::{args, err, events, ok, spec, tasks_of, Ev, Harness};
use super::{Command, Core, HealthPolicy, WorkerSpec};
use crate::model::{JobId, JobSpec, Record, Scheduler, TaskState, WorkerId};

const GIB: u64 = 1 << 30;

fn job(id: JobId, tasks: u32, scheduler: Scheduler) -> JobSpec {
    JobSpec {
        scheduler,
        ..spec(id, tasks, 3)
    }
}

fn join(h: &mut Harness, id: WorkerId, slots: u32, credit: u32, memory: u64, speed: u64) {
    h.core.worker_joined(
        id,
        WorkerSpec {
            slots,
            memory_bytes: memory,
            benchmark_fuel_per_sec: speed,
        },
    );
    h.core.grant_credit(id, credit);
}

/// Per worker, the tasks it was sent, in order.
fn per_worker(h: &mut Harness) -> Vec<(WorkerId, Vec<u32>)> {
    let mut sent: Vec<(WorkerId, Vec<u32>)> = h
        .dispatch()
        .into_iter()
        .map(|(w, v)| (w, v.iter().map(|&(_, _, t)| t).collect()))
        .collect();
    sent.sort();
    sent
}

fn timed(fuel: u64, run_us: u64) -> TaskReport {
    let mut r = ok();
    r.fuel_used = fuel;
    r.timings.run_us = run_us;
    r
}

/// The attempt running `task` of `job`.
fn attempt_of(h: &Harness, job: JobId, task: u32) -> u64 {
    let mut found: Vec<_> = h
        .task_of
        .iter()
        .filter(|(_, &(j, t))| j == job && t == task)
        .map(|(a, _)| *a)
        .collect();
    found.sort();
    *found.last().expect("the task was started")
}

#[test]
fn round_robin_deals_one_task_per_worker_per_turn_where_fifo_deals_chunks() {
    let mut h = Harness::new();
    for w in 1..=3 {
        h.worker(w, 4);
    }
    h.core.submit_job(job(1, 5, Scheduler::RoundRobin), args(5));
    assert_eq!(
        per_worker(&mut h),
        [(1, vec![0, 3]), (2, vec![1, 4]), (3, vec![2])]
    );
    let mut h = Harness::new();
    for w in 1..=3 {
        h.worker(w, 4);
    }
    h.core.submit_job(job(1, 5, Scheduler::Fifo), args(5));
    assert_eq!(
        per_worker(&mut h),
        [(1, vec![0, 1]), (2, vec![2, 3]), (3, vec![4])]
    );
}

#[test]
fn least_loaded_fills_by_running_per_slot() {
    let mut h = Harness::new();
    join(&mut h, 1, 4, 8, 0, 0);
    join(&mut h, 2, 1, 8, 0, 0);
    h.core
        .submit_job(job(1, 5, Scheduler::LeastLoaded), args(5));
    let sent = per_worker(&mut h);
    let counts: Vec<_> = sent.iter().map(|(w, v)| (*w, v.len())).collect();
    // Loads go 1:0→¼→½→¾→1 while 2 goes 0→1: four tasks to 1, one to 2.
    assert_eq!(counts, [(1, 4), (2, 1)]);
}

#[test]
fn performance_keeps_the_last_tasks_off_a_slow_worker() {
    let mut h = Harness::new();
    join(&mut h, 1, 1, 3, 0, 4_000_000_000);
    join(&mut h, 2, 1, 3, 0, 1_000_000_000);
    h.core
        .submit_job(job(1, 10, Scheduler::Performance), args(10));
    // Nothing is known about the job yet: fastest first, everyone busy.
    let sent = per_worker(&mut h);
    assert_eq!(sent, [(1, vec![0, 1, 2]), (2, vec![3, 4, 5])]);
    // A task takes 0.25 ms on the fast worker, 1 ms on the slow one (short
    // enough that the prefetch window is not what holds tasks back).
    h.finish(1, attempt_of(&h, 1, 0), timed(1_000_000, 250));
    assert_eq!(per_worker(&mut h), [(1, vec![6])]);
    h.finish(2, attempt_of(&h, 1, 3), timed(1_000_000, 1_000));
    // Three tasks left: the fast worker finishes them all (by 1 ms) before the
    // slow one would finish another (its third round, at 3 ms).
    assert!(per_worker(&mut h).is_empty());
    h.finish(1, attempt_of(&h, 1, 1), timed(1_000_000, 250));
    assert_eq!(per_worker(&mut h), [(1, vec![7])]);

    // Under fifo the slow worker takes a task as soon as it has credit.
    let mut h = Harness::new();
    join(&mut h, 1, 1, 3, 0, 4_000_000_000);
    join(&mut h, 2, 1, 3, 0, 1_000_000_000);
    h.core.submit_job(job(1, 8, Scheduler::Fifo), args(8));
    per_worker(&mut h);
    h.finish(2, attempt_of(&h, 1, 4), timed(1_000_000, 1_000));
    assert_eq!(per_worker(&mut h), [(2, vec![6])]);
}

#[test]
fn performance_sends_bulk_work_to_the_fastest_first() {
    let mut h = Harness::new();
    join(&mut h, 1, 2, 4, 0, 1_000_000_000);
    join(&mut h, 2, 2, 4, 0, 3_000_000_000);
    join(&mut h, 3, 2, 4, 0, 2_000_000_000);
    h.core
        .submit_job(job(1, 6, Scheduler::Performance), args(6));
    let sent = h.dispatch();
    let order: Vec<_> = sent.iter().map(|(w, v)| (*w, v.len())).collect();
    assert_eq!(order, [(2, 4), (3, 2)]);
}

#[test]
fn a_high_priority_job_gets_the_next_free_slots() {
    let mut h = Harness::new();
    h.worker(1, 2);
    h.core
        .submit_job(job(1, 100, Scheduler::Priority), args(100));
    assert_eq!(tasks_of(&h.dispatch()), [(1, 0), (1, 1)]);
    // Same level later: waits its turn. Higher level: next. A fifo job's
    // priority does not count.
    let mut fifo = job(2, 5, Scheduler::Fifo);
    fifo.priority = 9;
    h.core.submit_job(fifo, args(5));
    let mut urgent = job(3, 2, Scheduler::Priority);
    urgent.priority = 5;
    h.core.submit_job(urgent, args(2));
    h.finish(1, attempt_of(&h, 1, 0), ok());
    assert_eq!(tasks_of(&h.dispatch()), [(3, 0)]);
    h.finish(1, attempt_of(&h, 1, 1), ok());
    assert_eq!(tasks_of(&h.dispatch()), [(3, 1)]);
    h.finish(1, attempt_of(&h, 3, 0), ok());
    assert_eq!(tasks_of(&h.dispatch()), [(1, 2)]);
}

#[test]
fn tasks_go_only_where_their_memory_fits() {
    let mut h = Harness::new();
    join(&mut h, 1, 2, 4, GIB, 0);
    join(&mut h, 2, 2, 4, 8 * GIB, 0);
    let mut big = job(1, 4, Scheduler::Fifo);
    big.limits.memory_bytes = 5 * GIB;
    h.core.submit_job(big, args(4));
    // 5 GiB: never on 1 GiB; on 8 GiB more than one per slot's share (4 GiB),
    // so only while what it holds fits: once.
    assert_eq!(per_worker(&mut h), [(2, vec![0])]);
    h.finish(2, 100, ok());
    assert_eq!(per_worker(&mut h), [(2, vec![1])]);
    let mut h = Harness::new();
    join(&mut h, 1, 2, 4, GIB, 0);
    join(&mut h, 2, 2, 4, 8 * GIB, 0);
    let mut huge = job(2, 1, Scheduler::LeastLoaded);
    huge.limits.memory_bytes = 16 * GIB;
    h.core.submit_job(huge, args(1));
    let mut small = job(3, 2, Scheduler::Fifo);
    small.limits.memory_bytes = 64 << 20;
    h.core.submit_job(small, args(2));
    // The job that fits nowhere waits without holding up the next one.
    let sent = per_worker(&mut h);
    assert_eq!(tasks_of(&h.dispatch()), []);
    assert_eq!(sent.iter().map(|(_, v)| v.len()).sum::<usize>(), 2);
    assert_eq!(h.core.task_state(2, 0), Some(TaskState::Queued));
}

#[test]
fn a_delayed_job_waits_for_its_time() {
    let mut h = Harness::new();
    h.core.tick(1_000);
    h.worker(1, 4);
    assert_eq!(h.core.next_deadline(), None, "nothing waits for the time");
    let mut later = job(1, 2, Scheduler::Fifo);
    later.not_before_ms = Some(5_000);
    h.core.submit_job(later, args(2));
    assert_eq!(h.core.next_deadline(), Some(5_000));
    h.core.submit_job(job(2, 1, Scheduler::Fifo), args(1));
    assert_eq!(tasks_of(&h.dispatch()), [(2, 0)]);
    h.core.tick(4_999);
    assert!(h.dispatch().is_empty());
    h.core.tick(5_000);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 0), (1, 1)]);
}

#[test]
fn an_attempt_past_its_lease_is_abandoned_cancelled_and_retried() {
    let mut h = Harness::new();
    h.core.tick(1);
    join(&mut h, 1, 1, 2, 0, 0);
    let mut short = job(1, 2, Scheduler::Fifo);
    short.limits.timeout_ms = 1_000;
    h.core.submit_job(short, args(2));
    h.dispatch();
    // Lease: 1 s per round queued ahead and its own, plus 10 s slack.
    assert_eq!(h.core.next_deadline(), Some(11_001));
    h.core.tick(11_000);
    assert!(h.drain().is_empty());
    h.core.tick(11_001);
    let c = h.drain();
    assert_eq!(
        events(&c),
        [Ev::Abandoned(
            0,
            100,
            FailureKind::Timeout,
            TaskState::Queued
        )]
    );
    assert!(c.contains(&Command::Cancel {
        worker: 1,
        attempts: vec![100]
    }));
    // Its credit came back with the cancel: the retry goes out now.
    assert_eq!(tasks_of(&h.dispatch()), [(1, 0)]);
    // The second attempt's lease counts the round queued ahead of it.
    h.core.tick(12_001);
    assert_eq!(
        events(&h.drain()),
        [Ev::Abandoned(
            1,
            101,
            FailureKind::Timeout,
            TaskState::Queued
        )]
    );
}

#[test]
fn ended_attempts_leases_are_swept_and_a_live_one_still_runs_out() {
    let mut h = Harness::new();
    h.core.tick(1);
    // Worker 1 takes task 0 and never reports it.
    join(&mut h, 1, 1, 1, 0, 0);
    let mut long = job(1, 10_000, Scheduler::Fifo);
    long.limits.timeout_ms = 3_600_000;
    h.core.submit_job(long, args(10_000));
    assert_eq!(tasks_of(&h.dispatch()), [(1, 0)]);
    // Worker 2 runs all the others, 100 at a time.
    join(&mut h, 2, 100, 100, 0, 0);
    let (mut finished, mut most_leases) = (0, 0);
    loop {
        let sent = h.dispatch();
        if sent.is_empty() {
            break;
        }
        for (worker, tasks) in sent {
            for (attempt, _, _) in tasks {
                h.finish(worker, attempt, ok());
                finished += 1;
            }
        }
        most_leases = most_leases.max(h.core.leases_held());
    }
    assert_eq!(finished, 9_999);
    assert!(
        most_leases <= 2 * 101 + 1024 + 1,
        "{most_leases} leases held"
    );
    // The sweeps kept the live attempt's lease: an hour and the slack later, it runs out.
    h.core.tick(3_610_000);
    assert!(h.drain().is_empty());
    h.core.tick(3_610_001);
    assert_eq!(
        events(&h.drain()),
        [Ev::Abandoned(
            0,
            100,
            FailureKind::Timeout,
            TaskState::Queued
        )]
    );
}

#[test]
fn repeated_infrastructure_failures_cool_a_worker_down_for_a_while() {
    let mut h = Harness {
        core: Core::with_policy(
            100,
            HealthPolicy {
                cooldown_after: 2,
                cooldown_window_ms: 60_000,
                cooldown_ms: 30_000,
                ..HealthPolicy::default()
            },
        ),
        task_of: Default::default(),
    };
    h.core.tick(1_000);
    h.worker(1, 2);
    h.core.submit_job(job(1, 10, Scheduler::Fifo), args(10));
    h.dispatch();
    h.finish(1, 100, err(FailureKind::Timeout));
    let c = h.finish(1, 101, err(FailureKind::Timeout));
    assert!(c.contains(&Command::Record(Record::WorkerCooledDown {
        worker: 1,
        until_ms: 31_000,
        recent_failures: 2
    })));
    assert!(h.dispatch().is_empty(), "cooling down despite free credit");
    h.worker(2, 2);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 1), (1, 0)]);
    // A reconnect does not end the cooldown; time does.
    h.core.worker_left(1);
    h.worker(1, 2);
    assert!(h.dispatch().is_empty());
    assert_eq!(h.core.cooling_until(1), Some(31_000));
    assert!(h.core.next_deadline().is_some_and(|at| at <= 31_000));
    h.core.tick(31_000);
    assert_eq!(tasks_of(&h.dispatch()), [(1, 2), (1, 3)]);
    // Deterministic failures are the task's fault, not the worker's.
    for attempt in [104, 105] {
        h.finish(1, attempt, err(FailureKind::Trap));
    }
    assert_eq!(h.core.cooling_until(1), None);
}

#[test]
fn a_draining_worker_gets_nothing_and_its_returned_tasks_run_elsewhere() {
    let mut h = Harness::new();
    h.worker(1, 3);
    h.core.submit_job(job(1, 3, Scheduler::Fifo), args(3));
    h.dispatch();
    h.core.worker_draining(1);
    h.finish(1, 100, ok());
    assert!(h.dispatch().is_empty());
    h.core.attempts_returned(1, &[101, 102, 999]);
    let c = h.drain();
    assert_eq!(
        events(&c),
        [
            Ev::Abandoned(1, 101, FailureKind::Cancelled, TaskState::Queued),
            Ev::Abandoned(2, 102, FailureKind::Cancelled, TaskState::Queued)
        ]
    );
    h.worker(2, 4);
    let sent = h.dispatch();
    assert_eq!(sent[0].0, 2);
    assert_eq!(tasks_of(&sent), [(1, 1), (1, 2)]);
    // Handing back is not an attempt: one retry left means one more try.
    let mut h = Harness::new();
    h.worker(1, 1);
    h.core.submit_job(spec(1, 1, 0), args(1));
    h.dispatch();
    h.core.worker_draining(1);
    h.core.attempts_returned(1, &[100]);
    h.drain();
    h.worker(2, 1);
    h.dispatch();
    let c = h.finish(2, 101, err(FailureKind::Timeout));
    assert_eq!(
        events(&c),
        [Ev::Ended(0, 101, TaskState::Failed)],
        "max_retries 0: the one real attempt was the only one"
    );
}

#[test]
fn performance_gives_a_short_queue_to_equally_fast_idle_workers() {
    let mut h = Harness::new();
    for w in 1..=3 {
        join(&mut h, w, 2, 2, 0, 1_000_000_000);
    }
    h.core
        .submit_job(job(1, 7, Scheduler::Performance), args(7));
    h.dispatch();
    h.finish(1, attempt_of(&h, 1, 0), timed(1_000_000, 1_000));
    h.finish(1, attempt_of(&h, 1, 1), timed(1_000_000, 1_000));
    h.finish(2, attempt_of(&h, 1, 2), timed(1_000_000, 1_000));
    // One task left, three workers that would finish it at the same time:
    // it goes out rather than waiting for a better one that does not exist.
    assert_eq!(tasks_of(&h.dispatch()), [(1, 6)]);
}

#[test]
fn deterministic_failures_are_retried_only_when_the_job_asks() {
    let mut h = Harness::new();
    h.worker(1, 1);
    let mut flaky = spec(1, 1, 1);
    flaky.retry_deterministic = true;
    h.core.submit_job(flaky, args(1));
    h.dispatch();
    let c = h.finish(1, 100, err(FailureKind::Trap));
    assert_eq!(events(&c), [Ev::Ended(0, 100, TaskState::Queued)]);
    h.dispatch();
    let c = h.finish(1, 101, err(FailureKind::OutOfFuel));
    assert_eq!(events(&c), [Ev::Ended(0, 101, TaskState::Failed)]);
}

#[test]
fn a_worker_holds_about_two_ms_of_a_jobs_tasks_beyond_its_slots() {
    for scheduler in [
        Scheduler::Fifo,
        Scheduler::RoundRobin,
        Scheduler::LeastLoaded,
        Scheduler::Performance,
    ] {
        // Credit for 500 tasks each, as workers grant after a job of tiny ones.
        let mut h = Harness::new();
        join(&mut h, 1, 2, 500, 0, 1_000_000_000);
        join(&mut h, 2, 2, 500, 0, 1_000_000_000);
        h.core.submit_job(job(1, 400, scheduler), args(400));
        // Task time unknown: slots plus two per slot.
        let sent = per_worker(&mut h);
        let counts: Vec<_> = sent.iter().map(|(w, v)| (*w, v.len())).collect();
        assert_eq!(counts, [(1, 6), (2, 6)], "{scheduler:?}");
        let first = &sent[0].1;
        // Long tasks (100 ms): one prefetched per slot, not the whole job.
        h.finish(1, attempt_of(&h, 1, first[0]), timed(1_000_000, 100_000));
        assert!(per_worker(&mut h).is_empty(), "{scheduler:?}");
        h.finish(1, attempt_of(&h, 1, first[1]), timed(1_000_000, 100_000));
        h.finish(1, attempt_of(&h, 1, first[2]), timed(1_000_000, 100_000));
        let counts: Vec<_> = per_worker(&mut h)
            .iter()
            .map(|(w, v)| (*w, v.len()))
            .collect();
        assert_eq!(counts, [(1, 1)], "{scheduler:?}");

        // Tiny tasks (10 µs): 200 per slot, so the whole job goes out at once.
        let mut h = Harness::new();
        join(&mut h, 1, 2, 500, 0, 1_000_000_000);
        join(&mut h, 2, 2, 500, 0, 1_000_000_000);
        h.core.submit_job(job(1, 400, scheduler), args(400));
        let first = per_worker(&mut h)[0].1[0];
        h.finish(1, attempt_of(&h, 1, first), timed(1_000, 10));
        h.dispatch();
        let held = (h.core.outstanding(1), h.core.outstanding(2));
        assert_eq!(held.0 + held.1, 399, "{scheduler:?}: {held:?}");
    }
}

#[test]
fn a_new_job_of_a_known_module_starts_with_its_prefetch_window_sized() {
    let mut h = Harness::new();
    join(&mut h, 1, 1, 32, 0, 0);
    // Unknown task time: one to run and two to queue.
    h.core.submit_job(spec(1, 3, 0), args(3));
    let first = h.dispatch();
    assert_eq!(first[0].1.len(), 3);
    for &(attempt, _, _) in &first[0].1 {
        h.finish(1, attempt, timed(1_000, 1_000));
    }
    // The same module's next job: its 1 ms tasks fill the 16 ms window at
    // once (one to run, sixteen to queue).
    let second = JobSpec {
        id: 2,
        ..spec(1, 20, 0)
    };
    h.core.submit_job(second, args(20));
    assert_eq!(h.dispatch()[0].1.len(), 17);
}
