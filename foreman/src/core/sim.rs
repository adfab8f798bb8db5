//! A seeded simulation: many fake workers that crash, drop off and come back
//! with attempts still running, time out, and see their reports duplicated
//! and reordered; checked against an independent ledger built from the
//! records alone.

use std::collections::{HashMap, HashSet};

use wasmgrid_protocol::wire::AttemptId;
use wasmgrid_protocol::{FailureKind, TaskReport};

use super::tests::{args, report, spec};
use super::{Command, Core, JobProgress, WorkerSpec};
use crate::model::{JobId, JobState, Record, Scheduler, TaskIndex, TaskState, WorkerId};

/// Recounts everything by brute force and panics on any disagreement.
pub(super) fn assert_consistent(core: &Core) {
    let mut queued = 0;
    for (id, job) in &core.jobs {
        let mut p = JobProgress {
            queued: 0,
            running: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            ..job.progress
        };
        for (i, t) in job.tasks.iter().enumerate() {
            *p.count_mut(t.state) += 1;
            if let Some(a) = t.current {
                let h = core.live.get(&a).copied();
                assert!(h.is_some_and(|h| h.job == *id && h.task as usize == i));
                assert_eq!(t.state, TaskState::Running);
            } else {
                assert_ne!(t.state, TaskState::Running);
            }
        }
        assert_eq!(p, job.progress, "job {id}");
        queued += p.queued as usize;
    }
    assert_eq!(queued, core.queued);
    for (a, h) in &core.live {
        assert!(core
            .pool
            .get(h.worker)
            .is_some_and(|w| w.held.contains_key(a)));
    }
}

/// xorshift64*: tiny, seeded, good enough for a test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A worker as it sees itself.
struct FakeWorker {
    window: u32,
    /// At most `window`: the rest of the window is its prefetch.
    slots: u32,
    online: bool,
    /// Credit it has granted (explicitly or by reporting) and not seen used.
    free: u32,
    held: Vec<AttemptId>,
    /// Per mille chance that it acts when its turn comes: slow workers act
    /// rarely, a stalled one (0) never, until its pace changes.
    pace: u64,
}

/// What the records say, checked as they arrive.
#[derive(Default)]
struct Ledger {
    task_of: HashMap<AttemptId, (JobId, TaskIndex)>,
    last_attempt: Option<AttemptId>,
    reported: HashSet<AttemptId>,
    finished: HashMap<(JobId, TaskIndex), TaskState>,
    job_final: HashMap<JobId, JobState>,
    /// Attempts abandoned as `WorkerLost`.
    lost: HashSet<AttemptId>,
    /// How often each interesting path was taken.
    late_reports: u32,
    /// Set by the cancel of a loser: the next record must be the late report
    /// that finishes its task.
    expect_finish: Option<((JobId, TaskIndex), TaskState)>,
    late_finishes: u32,
    losers_cancelled: u32,
    /// Workers cut off for a protocol violation (a replayed report).
    violations: u32,
    /// Attempts handed back unstarted, when asked for an idle worker.
    handed_back: u32,
}

impl Ledger {
    fn finish(&mut self, key: (JobId, TaskIndex), state: TaskState) {
        let before = self.finished.insert(key, state);
        assert_eq!(before, None, "task {key:?} finished twice");
    }

    fn apply(&mut self, record: &Record) {
        if self.expect_finish.is_some() {
            assert!(matches!(record, Record::AttemptEnded { .. }), "{record:?}");
        }
        match record {
            Record::AttemptStarted {
                job, task, attempt, ..
            } => {
                assert!(self.last_attempt.is_none_or(|last| *attempt > last));
                self.last_attempt = Some(*attempt);
                assert!(
                    !self.finished.contains_key(&(*job, *task)),
                    "finished task restarted"
                );
                self.task_of.insert(*attempt, (*job, *task));
            }
            Record::AttemptEnded {
                job,
                task,
                attempt,
                task_state,
                ..
            } => {
                assert_eq!(self.task_of.get(attempt), Some(&(*job, *task)));
                assert!(
                    self.reported.insert(*attempt),
                    "attempt {attempt} reported twice"
                );
                if let Some((key, state)) = self.expect_finish.take() {
                    assert_eq!((key, state), ((*job, *task), *task_state));
                    assert!(self.lost.contains(attempt));
                }
                if self.lost.contains(attempt) {
                    self.late_reports += 1;
                    self.late_finishes += u32::from(task_state.is_finished());
                }
                if task_state.is_finished() {
                    self.finish((*job, *task), *task_state);
                }
            }
            Record::AttemptAbandoned {
                job,
                task,
                attempt,
                failure,
                task_state,
                ..
            } => {
                assert_eq!(self.task_of.get(attempt), Some(&(*job, *task)));
                assert!(!self.reported.contains(attempt));
                let key = (*job, *task);
                match failure.kind {
                    FailureKind::WorkerLost => {
                        self.lost.insert(*attempt);
                        if task_state.is_finished() {
                            self.finish(key, *task_state);
                        }
                    }
                    FailureKind::Cancelled if *task_state == TaskState::Queued => {
                        assert!(!self.finished.contains_key(&key));
                        self.handed_back += 1;
                    }
                    FailureKind::Cancelled => match self.finished.get(&key) {
                        // A late report finishes the task right after this.
                        None if *task_state != TaskState::Cancelled => {
                            assert_eq!(self.expect_finish, None);
                            self.expect_finish = Some((key, *task_state));
                            self.losers_cancelled += 1;
                        }
                        Some(_) => panic!("attempt of finished task {key:?} cancelled"),
                        None => {
                            assert_eq!(*task_state, TaskState::Cancelled);
                            assert_eq!(self.job_final.get(job), None);
                            self.finish(key, TaskState::Cancelled);
                        }
                    },
                    // A lease ran out.
                    FailureKind::Timeout => {
                        if task_state.is_finished() {
                            self.finish(key, *task_state);
                        }
                    }
                    other => panic!("abandoned as {other}"),
                }
            }
            Record::WorkerCooledDown { .. } => {}
            Record::WorkerViolation { .. } => self.violations += 1,
            Record::JobStateChanged { job, state } => {
                if state.is_finished() {
                    assert_eq!(
                        self.job_final.insert(*job, *state),
                        None,
                        "job {job} finished twice"
                    );
                }
            }
        }
    }
}

struct Sim {
    rng: Rng,
    core: Core,
    workers: Vec<FakeWorker>,
    ledger: Ledger,
    /// Reports sent and not yet delivered: (worker, attempt, report).
    in_flight: Vec<(WorkerId, AttemptId, TaskReport)>,
    delivered: Vec<(WorkerId, AttemptId, TaskReport)>,
    /// `GiveBack`s on the wire to their worker.
    recalls: Vec<(WorkerId, Vec<AttemptId>)>,
    cut_offs: u32,
}

impl Sim {
    fn pump(&mut self) {
        while let Some(command) = self.core.poll_command() {
            match command {
                Command::Send {
                    worker,
                    assignments,
                } => {
                    let w = &mut self.workers[worker as usize];
                    assert!(w.online, "sent to worker {worker}, which is gone");
                    let n = assignments.len() as u32;
                    assert!(
                        n <= w.free,
                        "worker {worker} sent {n} with {} credit",
                        w.free
                    );
                    w.free -= n;
                    w.held.extend(assignments.iter().map(|a| a.attempt));
                    assert!(w.held.len() <= w.window as usize);
                }
                Command::Cancel { worker, attempts } => {
                    let w = &mut self.workers[worker as usize];
                    for a in attempts {
                        if let Some(i) = w.held.iter().position(|&h| h == a) {
                            w.held.swap_remove(i);
                            w.free += 1;
                        }
                    }
                }
                Command::Recall {
                    worker, attempts, ..
                } => {
                    assert!(self.workers[worker as usize].online);
                    self.recalls.push((worker, attempts));
                }
                Command::Backlog { worker, .. } => {
                    assert!(self.workers[worker as usize].online);
                }
                Command::Record(r) => self.ledger.apply(&r),
                Command::CutOff { worker, .. } => self.cut_off(worker),
            }
        }
    }

    /// A `GiveBack` arrives: the worker hands back what it holds of it,
    /// except those it has started (a coin toss each).
    fn answer_recall(&mut self, i: usize) {
        let (id, attempts) = self.recalls.swap_remove(i);
        let w = &mut self.workers[id as usize];
        if !w.online {
            return;
        }
        let mut returned = Vec::new();
        for a in attempts {
            if let Some(at) = w.held.iter().position(|&h| h == a) {
                if self.rng.chance(600) {
                    w.held.swap_remove(at);
                    returned.push(a);
                }
            }
        }
        w.free += returned.len() as u32;
        self.core.attempts_returned(id, &returned);
    }

    /// The core closed the worker's connection: its reports on the wire are
    /// lost, and it starts afresh (as after a crash) when it joins again.
    fn cut_off(&mut self, id: WorkerId) {
        self.in_flight.retain(|(w, _, _)| *w != id);
        self.recalls.retain(|(w, _)| *w != id);
        let w = &mut self.workers[id as usize];
        assert!(w.online, "worker {id} cut off twice");
        w.online = false;
        w.free = 0;
        w.held.clear();
        self.cut_offs += 1;
    }

    fn deliver(&mut self, i: usize) {
        let (w, a, r) = self.in_flight.swap_remove(i);
        self.core.attempt_finished(w, a, r.clone());
        if self.delivered.len() < 256 {
            self.delivered.push((w, a, r));
        } else {
            let k = self.rng.below(256) as usize;
            self.delivered[k] = (w, a, r);
        }
    }

    /// The worker's connection drops: reports on the wire arrive first or are
    /// lost; with `crash`, its running attempts die too.
    fn disconnect(&mut self, id: WorkerId, crash: bool) {
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].0 != id {
                i += 1;
            } else if self.rng.chance(500) {
                self.deliver(i);
            } else {
                self.in_flight.swap_remove(i);
            }
        }
        self.recalls.retain(|(w, _)| *w != id);
        self.core.worker_left(id);
        let w = &mut self.workers[id as usize];
        w.online = false;
        w.free = 0;
        if crash {
            w.held.clear();
        }
    }

    fn rejoin(&mut self, id: WorkerId) {
        let w = &mut self.workers[id as usize];
        w.online = true;
        w.free = w.window - w.held.len() as u32;
        self.core.worker_joined(id, WorkerSpec::with_slots(w.slots));
        self.core.grant_credit(id, w.free);
    }

    /// The core's credit books agree with each worker's own: what a worker
    /// thinks it has free is what the core has, plus the reports on the wire
    /// that will return credit when they arrive (not those of attempts the
    /// core already cancelled: it returned their credit at the cancel).
    fn check_credit(&self) {
        let mut on_wire: HashMap<WorkerId, u32> = HashMap::new();
        for (w, a, _) in &self.in_flight {
            let held = |m: &rustc_hash::FxHashMap<AttemptId, super::Held>| {
                m.get(a).is_some_and(|h| h.worker == *w)
            };
            if held(&self.core.live) || held(&self.core.lost) {
                *on_wire.entry(*w).or_default() += 1;
            }
        }
        for (id, w) in self.workers.iter().enumerate() {
            let id = id as WorkerId;
            if w.online {
                let wire = on_wire.get(&id).copied().unwrap_or(0);
                assert_eq!(self.core.free_credit(id) + wire, w.free, "worker {id}");
            }
            assert!(self.core.outstanding(id) <= w.window as usize);
        }
    }

    /// One random thing happens to one random worker.
    fn event(&mut self) {
        let id = self.rng.below(self.workers.len() as u64);
        let w = &self.workers[id as usize];
        if !w.online {
            if self.rng.chance(400) {
                self.rejoin(id);
            }
            return;
        }
        if self.rng.chance(2) {
            let crash = self.rng.chance(300);
            self.disconnect(id, crash);
            return;
        }
        if self.rng.chance(3) {
            // Slows down, stalls or recovers.
            self.workers[id as usize].pace = [0, 50, 300, 1000][self.rng.below(4) as usize];
        }
        let w = &self.workers[id as usize];
        if w.held.is_empty() || !self.rng.chance(w.pace) {
            return;
        }
        let pace = w.pace;
        let i = self.rng.below(w.held.len() as u64) as usize;
        let attempt = self.workers[id as usize].held.swap_remove(i);
        self.workers[id as usize].free += 1;
        let job = self.ledger.task_of.get(&attempt).map_or(0, |t| t.0);
        let roll = self.rng.below(1000);
        let outcome = match roll {
            0..=39 => Err(FailureKind::Timeout),
            40..=44 if job == 3 => Err(FailureKind::Trap),
            45..=46 if job == 3 => Err(FailureKind::OutOfFuel),
            _ => Ok("{}"),
        };
        let mut r = report(outcome);
        r.fuel_used = 1_000_000;
        r.timings.run_us = 1_000_000_000 / pace.max(1);
        self.in_flight.push((id, attempt, r));
    }
}

#[test]
fn simulated_grid_finishes_every_task_exactly_once() {
    let fifo = [Scheduler::Fifo; 3];
    let mixed = [
        Scheduler::Performance,
        Scheduler::RoundRobin,
        Scheduler::LeastLoaded,
    ];
    for (seed, schedulers) in [
        (0x9E37_79B9_7F4A_7C15, fifo),
        (42, mixed),
        (0xDEAD_BEEF, mixed),
    ] {
        simulate(seed, 200, [9_000, 6_000, 5_000], schedulers);
    }
}

/// The scale: 1,000 workers, 100,000 tasks.
#[test]
fn a_thousand_workers_finish_a_hundred_thousand_tasks_exactly_once() {
    simulate(
        7,
        1_000,
        [50_000, 30_000, 20_000],
        [
            Scheduler::Priority,
            Scheduler::Performance,
            Scheduler::LeastLoaded,
        ],
    );
}

/// Workers with random windows and paces that crash, drop off, stall, slow
/// down and time out; three jobs (the second cancelled part-way, the third
/// with deterministic failures).
fn simulate(seed: u64, worker_count: u64, sizes: [u32; 3], schedulers: [Scheduler; 3]) {
    let jobs: [(JobId, u32, u32); 3] = [(1, sizes[0], 6), (2, sizes[1], 3), (3, sizes[2], 1)];
    let mut rng = Rng(seed);
    let workers = (0..worker_count)
        .map(|_| {
            let window = 1 + rng.below(8) as u32;
            FakeWorker {
                window,
                slots: 1 + rng.below(u64::from(window)) as u32,
                online: false,
                free: 0,
                held: Vec::new(),
                pace: [50, 300, 1000][rng.below(3) as usize],
            }
        })
        .collect();
    let mut sim = Sim {
        rng,
        core: Core::new(1),
        workers,
        ledger: Ledger::default(),
        in_flight: Vec::new(),
        delivered: Vec::new(),
        recalls: Vec::new(),
        cut_offs: 0,
    };
    for id in 0..worker_count {
        sim.rejoin(id);
    }
    for ((id, tasks, retries), scheduler) in jobs.into_iter().zip(schedulers) {
        let mut spec = spec(id, tasks, retries);
        spec.scheduler = scheduler;
        spec.priority = id as i32;
        // Short, so that stalled workers' leases run out within the run.
        spec.limits.timeout_ms = 2_000;
        sim.core.submit_job(spec, args(tasks));
    }
    let (mut steps, mut cancelled) = (0, false);
    // Each job's progress as it finished: the next tick forgets it.
    let mut final_progress = HashMap::new();
    let mut keep_finished = |core: &Core| {
        for (job, _, _) in jobs {
            if let Some(p) = core.job_progress(job).filter(|p| p.state.is_finished()) {
                final_progress.insert(job, p);
            }
        }
    };
    while sim.ledger.job_final.len() < jobs.len() {
        steps += 1;
        assert!(steps < 100_000, "the grid got stuck");
        keep_finished(&sim.core);
        // 100 ms a step: cooldowns end, overdue leases expire and finished jobs leave memory.
        sim.core.tick(steps * 100);
        sim.core.dispatch();
        sim.pump();
        for _ in 0..worker_count / 5 {
            sim.event();
        }
        sim.pump();
        for _ in 0..sim.rng.below(worker_count * 3 / 10) {
            if sim.in_flight.is_empty() {
                break;
            }
            let i = sim.rng.below(sim.in_flight.len() as u64) as usize;
            sim.deliver(i);
        }
        while !sim.recalls.is_empty() && sim.rng.chance(700) {
            let i = sim.rng.below(sim.recalls.len() as u64) as usize;
            sim.answer_recall(i);
        }
        // A report sent twice breaks the protocol: the worker is cut off.
        if !sim.delivered.is_empty() && sim.rng.chance(300) {
            let (w, a, r) =
                sim.delivered[sim.rng.below(sim.delivered.len() as u64) as usize].clone();
            sim.core.attempt_finished(w, a, r);
        }
        if !cancelled
            && sim
                .core
                .job_progress(2)
                .is_some_and(|p| p.succeeded >= sizes[1] / 2)
        {
            assert!(sim.core.cancel_job(2));
            cancelled = true;
        }
        sim.pump();
        if steps % (worker_count / 4) == 0 {
            assert_consistent(&sim.core);
        }
        sim.check_credit();
    }
    assert_consistent(&sim.core);
    assert!(cancelled);
    assert_eq!(sim.ledger.expect_finish, None);
    keep_finished(&sim.core);
    sim.core.tick((steps + 1) * 100);
    assert_eq!(sim.core.jobs_in_memory(), 0, "finished jobs leave memory");
    for (job, tasks, _) in jobs {
        let p = final_progress[&job];
        assert_eq!(sim.ledger.job_final[&job], p.state);
        assert_eq!((p.queued, p.running), (0, 0));
        assert_eq!(p.succeeded + p.failed + p.cancelled, tasks);
        let mut counts = [0u32; 3];
        for task in 0..tasks {
            let state = match sim.ledger.finished.get(&(job, task)) {
                Some(s) => *s,
                // Only a cancelled job's never-started tasks end without a record.
                None => {
                    assert_eq!(job, 2);
                    TaskState::Cancelled
                }
            };
            counts[match state {
                TaskState::Succeeded => 0,
                TaskState::Failed => 1,
                _ => 2,
            }] += 1;
        }
        assert_eq!(counts, [p.succeeded, p.failed, p.cancelled]);
    }
    let l = &sim.ledger;
    eprintln!(
        "seed {seed}: {steps} steps, {} attempts, {} lost, {} handed back, {} late reports ({} finished their task, {} cancelled another attempt)",
        l.task_of.len(),
        l.lost.len(),
        l.handed_back,
        l.late_reports,
        l.late_finishes,
        l.losers_cancelled
    );
    assert!(l.lost.len() > 100 && l.late_finishes > 5 && l.losers_cancelled > 0);
    assert!(l.handed_back > 0, "no attempt was handed to an idle worker");
    assert!(sim.cut_offs > 0);
    assert_eq!(l.violations, sim.cut_offs);
    assert_eq!(sim.ledger.job_final[&2], JobState::Cancelled);
    assert_eq!(sim.ledger.job_final[&3], JobState::Failed);
    for (id, w) in sim.workers.iter().enumerate() {
        assert!(sim.core.outstanding(id as WorkerId) <= w.window as usize);
    }
}

/// `cargo test --release -- --ignored --nocapture throughput`
#[test]
#[ignore = "a measurement, run in release"]
fn throughput() {
    const TASKS: u32 = 100_000;
    let mut core = Core::new(1);
    for w in 0..500 {
        core.worker_joined(w, WorkerSpec::with_slots(8));
        core.grant_credit(w, 8);
    }
    let start = std::time::Instant::now();
    core.submit_job(spec(1, TASKS, 3), args(TASKS));
    let mut held: Vec<(WorkerId, AttemptId)> = Vec::new();
    let (mut records, mut done) = (0u64, false);
    while !done {
        core.dispatch();
        while let Some(c) = core.poll_command() {
            match c {
                Command::Send {
                    worker,
                    assignments,
                } => held.extend(assignments.iter().map(|a| (worker, a.attempt))),
                Command::Record(Record::JobStateChanged { state, .. }) => {
                    done = state.is_finished();
                }
                _ => records += 1,
            }
        }
        for (w, a) in held.drain(..) {
            core.attempt_finished(w, a, report(Ok("{}")));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{TASKS} tasks, {records} records in {secs:.3}s: {:.0} tasks/s",
        f64::from(TASKS) / secs
    );
}
