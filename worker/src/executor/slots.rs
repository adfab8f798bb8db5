//! A fixed number of slot threads that run tasks, so callers (async or not)
//! never block on wasm themselves.

use futures_util::FutureExt as _;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use wasmgrid_protocol::{Failure, FailureKind, TaskLimits, TaskReport};

use super::{CancelFlag, Executor, Load, PreparedTask, SlotPriority, SLOT_THREAD_STACK};

type Reply = Box<dyn FnOnce(TaskReport) + Send>;
type StartHook = Box<dyn FnOnce() + Send>;

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const TAKEN_BACK: u8 = 2;

/// Whether a queued task has started on a slot or been taken back. Exactly
/// one of the two happens (a compare-exchange decides the race), so a task
/// is never both run and handed back.
#[derive(Debug, Clone, Default)]
pub struct TaskState(Arc<AtomicU8>);

impl TaskState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes back a task that has not started. `true`: it will never run
    /// and its reply is never called. `false`: it has started (or was
    /// already taken back).
    pub fn try_take_back(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, TAKEN_BACK, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether a slot has started the task.
    pub fn has_started(&self) -> bool {
        self.0.load(Ordering::Acquire) == STARTED
    }

    /// Whether both are the state of the same submission.
    pub fn same_as(&self, other: &TaskState) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// For the slot: claims the task to run; `false` when it was taken back.
    fn try_start(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

struct Job {
    task: Arc<PreparedTask>,
    load: Load,
    args: String,
    limits: TaskLimits,
    cancel: Option<CancelFlag>,
    state: Option<TaskState>,
    on_start: Option<StartHook>,
    reply: Reply,
}

/// How a submitted task can be stopped, taken back and watched.
pub struct Tracking {
    pub cancel: CancelFlag,
    pub state: TaskState,
    /// Called on the slot thread just before the task runs (never for one taken back).
    pub on_start: Option<StartHook>,
}

impl Tracking {
    pub fn new(cancel: CancelFlag, state: TaskState) -> Self {
        Tracking {
            cancel,
            state,
            on_start: None,
        }
    }
}

pub struct SlotPool {
    jobs: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<thread::JoinHandle<()>>,
    /// Tasks running on a slot now.
    running: Arc<AtomicUsize>,
    /// Notified each time a slot takes the last queued task or finds none.
    idle: Arc<tokio::sync::Notify>,
}

impl SlotPool {
    /// `slots` threads, at most the executor's concurrency.
    pub fn new(executor: Arc<Executor>, slots: usize) -> std::io::Result<Self> {
        Self::with_priority(executor, slots, SlotPriority::Normal)
    }

    /// Like [`SlotPool::new`], with the slot threads at `priority`.
    pub fn with_priority(
        executor: Arc<Executor>,
        slots: usize,
        priority: SlotPriority,
    ) -> std::io::Result<Self> {
        let slots = slots.clamp(1, executor.concurrency() as usize);
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let running = Arc::new(AtomicUsize::new(0));
        let idle = Arc::new(tokio::sync::Notify::new());
        let threads = (0..slots)
            .map(|slot| {
                let executor = executor.clone();
                let receiver = receiver.clone();
                let running = running.clone();
                let idle = idle.clone();
                thread::Builder::new()
                    .name(format!("wasmgrid-slot-{slot}"))
                    .stack_size(SLOT_THREAD_STACK)
                    .spawn(move || {
                        if let Err(error) = super::priority::apply_to_this_thread(priority) {
                            tracing::warn!(
                                slot,
                                "cannot run tasks at {priority} priority: {error}"
                            );
                        }
                        while let Some(job) = next_job(&receiver, &idle) {
                            if job.state.as_ref().is_some_and(|state| !state.try_start()) {
                                // Taken back: neither run nor reported.
                                continue;
                            }
                            running.fetch_add(1, Ordering::Relaxed);
                            if let Some(on_start) = job.on_start {
                                on_start();
                            }
                            let report = match job.cancel {
                                Some(cancel) if cancel.load(Ordering::Relaxed) => {
                                    crate::exec::failed_report(Failure::new(
                                        FailureKind::Cancelled,
                                        "the job was cancelled before the task started",
                                    ))
                                }
                                Some(cancel) => executor.run_cancellable(
                                    &job.task,
                                    job.load,
                                    &job.args,
                                    &job.limits,
                                    cancel,
                                ),
                                None => executor.run(&job.task, job.load, &job.args, &job.limits),
                            };
                            running.fetch_sub(1, Ordering::Relaxed);
                            (job.reply)(report);
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(SlotPool {
            jobs: Some(sender),
            threads,
            running,
            idle,
        })
    }

    /// Resolves when a slot next takes the last queued task or finds none
    /// (at once if one did since the last call): what was queued has all
    /// started, and a slot will idle when its task ends.
    pub async fn queue_drained(&self) {
        self.idle.notified().await;
    }

    /// Forgets a [`SlotPool::queue_drained`] signal not yet awaited; called as
    /// new work comes, which makes it stale (it would end the next wait for
    /// no reason).
    pub fn forget_idle(&self) {
        let _ = self.idle.notified().now_or_never();
    }

    pub fn slots(&self) -> usize {
        self.threads.len()
    }

    /// Tasks running on a slot now (not those queued).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Tasks queued for a slot (a hint: some may have been taken back).
    pub fn queued(&self) -> usize {
        self.jobs.as_ref().map_or(0, |jobs| jobs.len())
    }

    /// Queues a task; `reply` is called on a slot thread with its report.
    pub fn submit(
        &self,
        task: Arc<PreparedTask>,
        load: Load,
        args: String,
        limits: TaskLimits,
        reply: impl FnOnce(TaskReport) + Send + 'static,
    ) {
        self.enqueue(Job {
            task,
            load,
            args,
            limits,
            cancel: None,
            state: None,
            on_start: None,
            reply: Box::new(reply),
        });
    }

    /// Like [`SlotPool::submit`], and: setting the cancel flag skips the task
    /// if it has not started and stops it within an epoch tick if it has; the
    /// task can be taken back through its state until a slot starts it (then
    /// it is dropped with `reply` uncalled); `on_start` tells when it starts.
    pub fn submit_tracked(
        &self,
        task: Arc<PreparedTask>,
        load: Load,
        args: String,
        limits: TaskLimits,
        tracking: Tracking,
        reply: impl FnOnce(TaskReport) + Send + 'static,
    ) {
        self.enqueue(Job {
            task,
            load,
            args,
            limits,
            cancel: Some(tracking.cancel),
            state: Some(tracking.state),
            on_start: tracking.on_start,
            reply: Box::new(reply),
        });
    }

    fn enqueue(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // The receivers live as long as the pool, so the send cannot fail.
            let _ = jobs.send(job);
        }
    }

    /// Runs a task on a slot and waits for it without blocking the async runtime.
    pub async fn run(
        &self,
        task: Arc<PreparedTask>,
        load: Load,
        args: String,
        limits: TaskLimits,
    ) -> Option<TaskReport> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.submit(task, load, args, limits, move |report| {
            let _ = sender.send(report);
        });
        receiver.await.ok()
    }
}

/// The next task for a slot, telling `idle` when it takes the last one
/// queued or finds none; `None` once the pool is gone.
fn next_job(
    receiver: &crossbeam_channel::Receiver<Job>,
    idle: &tokio::sync::Notify,
) -> Option<Job> {
    match receiver.try_recv() {
        Ok(job) => {
            // The last one queued: a slot goes idle once it is done, and
            // the foreman, told now, has that long to send more.
            if receiver.is_empty() {
                idle.notify_one();
            }
            Some(job)
        }
        Err(crossbeam_channel::TryRecvError::Empty) => {
            idle.notify_one();
            receiver.recv().ok()
        }
        Err(crossbeam_channel::TryRecvError::Disconnected) => None,
    }
}

impl Drop for SlotPool {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::mpsc;
    use std::time::Duration;

    use wasmgrid_protocol::FailureKind;

    use super::super::test_support::{executor, patient_limits, test_task, SPIN};
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(60);

    #[test]
    fn the_test_task_answers() {
        let executor = executor(1);
        let (task, load) = test_task(&executor);
        let report = executor.run(&task, load, "[]", &patient_limits());
        assert_eq!(report.outcome, Ok("1".into()));
    }

    #[tokio::test]
    async fn a_slot_says_when_it_runs_out_of_work_even_if_the_rest_was_taken_back() {
        let executor = executor(1);
        let (task, load) = test_task(&executor);
        let pool = SlotPool::new(executor.clone(), 1).unwrap();
        // Whatever the pool said before it had work does not count.
        let _ = tokio::time::timeout(Duration::from_millis(100), pool.queue_drained()).await;
        let spin_cancel = CancelFlag::default();
        let spin_state = TaskState::new();
        let queued_state = TaskState::new();
        for (args, cancel, state) in [
            (SPIN, spin_cancel.clone(), spin_state.clone()),
            ("[]", CancelFlag::default(), queued_state.clone()),
        ] {
            pool.submit_tracked(
                task.clone(),
                load,
                args.into(),
                patient_limits(),
                Tracking::new(cancel, state),
                |_| {},
            );
        }
        let waiting = std::time::Instant::now();
        while !spin_state.has_started() {
            assert!(waiting.elapsed() < PATIENCE, "the spinner never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(queued_state.try_take_back());
        assert_eq!(
            pool.queued(),
            1,
            "the entry taken back is still in the queue"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), pool.queue_drained())
                .await
                .is_err(),
            "idle while spinning"
        );
        spin_cancel.store(true, Ordering::Relaxed);
        tokio::time::timeout(PATIENCE, pool.queue_drained())
            .await
            .expect("the slot said it is idle");
        assert_eq!(pool.queued(), 0);
    }

    #[tokio::test]
    async fn idleness_from_before_new_work_is_forgotten() {
        let executor = executor(1);
        let (task, load) = test_task(&executor);
        let pool = SlotPool::new(executor.clone(), 1).unwrap();
        // The slot finds nothing to run on starting, and says so to nobody.
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.forget_idle();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), pool.queue_drained())
                .await
                .is_err(),
            "a forgotten signal still ended the wait"
        );
        pool.submit(task, load, "[]".into(), patient_limits(), |_| {});
        tokio::time::timeout(PATIENCE, pool.queue_drained())
            .await
            .expect("idle again after the new work");
    }

    #[test]
    fn tasks_taken_back_never_run_and_the_running_one_still_reports() {
        let executor = executor(1);
        let (task, load) = test_task(&executor);
        let pool = SlotPool::new(executor.clone(), 1).unwrap();
        let (tx, rx) = mpsc::channel();
        let submit = |i: usize, args: &str, cancel: CancelFlag, state: TaskState| {
            let tx = tx.clone();
            pool.submit_tracked(
                task.clone(),
                load,
                args.into(),
                patient_limits(),
                Tracking::new(cancel, state),
                move |report| {
                    let _ = tx.send((i, report));
                },
            );
        };
        let spin_cancel = CancelFlag::default();
        let spin_state = TaskState::new();
        submit(0, SPIN, spin_cancel.clone(), spin_state.clone());
        // The only slot is now taken by the spinner (or about to be), so the rest stay queued.
        let rest: Vec<TaskState> = (1..=3)
            .map(|i| {
                let state = TaskState::new();
                submit(i, "[]", CancelFlag::default(), state.clone());
                state
            })
            .collect();
        for state in &rest {
            assert!(state.try_take_back());
            assert!(!state.try_take_back(), "taken back only once");
            assert!(!state.has_started());
        }
        let waiting = std::time::Instant::now();
        while !spin_state.has_started() {
            assert!(waiting.elapsed() < PATIENCE, "the spinner never started");
            thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !spin_state.try_take_back(),
            "a started task cannot be taken back"
        );
        assert_eq!(pool.running(), 1);

        spin_cancel.store(true, Ordering::Relaxed);
        let (i, report) = rx.recv_timeout(PATIENCE).unwrap();
        assert_eq!(i, 0);
        assert_eq!(
            report.outcome.unwrap_err().kind,
            FailureKind::Cancelled,
            "the running task reports"
        );
        // Dropping the pool waits for the slot to drain its queue: the
        // tasks taken back are skipped, and nothing else reports.
        drop(pool);
        drop(tx);
        assert_eq!(rx.iter().count(), 0, "a task taken back ran");
    }

    #[test]
    fn a_watched_task_says_when_it_starts_and_one_taken_back_never_does() {
        let executor = executor(1);
        let (task, load) = test_task(&executor);
        let pool = SlotPool::new(executor.clone(), 1).unwrap();
        let (tx, rx) = mpsc::channel();
        let submit = |i: usize, args: &str, state: TaskState| {
            let (started, finished) = (tx.clone(), tx.clone());
            let tracking = Tracking {
                cancel: CancelFlag::default(),
                state,
                on_start: Some(Box::new(move || {
                    let _ = started.send((i, "started"));
                })),
            };
            pool.submit_tracked(
                task.clone(),
                load,
                args.into(),
                patient_limits(),
                tracking,
                move |_| {
                    let _ = finished.send((i, "finished"));
                },
            );
        };
        let spinner = CancelFlag::default();
        let spin_state = TaskState::new();
        pool.submit_tracked(
            task.clone(),
            load,
            SPIN.into(),
            patient_limits(),
            Tracking::new(spinner.clone(), spin_state.clone()),
            |_| {},
        );
        let queued = TaskState::new();
        submit(1, "[]", queued.clone());
        assert!(queued.try_take_back());
        spinner.store(true, Ordering::Relaxed);
        submit(2, "[]", TaskState::new());
        drop(pool);
        drop(tx);
        let seen: Vec<_> = rx.iter().collect();
        assert_eq!(seen, [(2, "started"), (2, "finished")]);
    }

    #[test]
    fn every_task_either_runs_or_is_taken_back_never_both() {
        let executor = executor(2);
        let (task, load) = test_task(&executor);
        let pool = SlotPool::new(executor.clone(), 2).unwrap();
        let (tx, rx) = mpsc::channel();
        const TASKS: usize = 500;
        let states: Vec<TaskState> = (0..TASKS)
            .map(|i| {
                let state = TaskState::new();
                let tx = tx.clone();
                pool.submit_tracked(
                    task.clone(),
                    load,
                    "[]".into(),
                    patient_limits(),
                    Tracking::new(CancelFlag::default(), state.clone()),
                    move |report| {
                        let _ = tx.send((i, report));
                    },
                );
                state
            })
            .collect();
        // Race the slots from the back of the queue, where they have not yet reached.
        let taken: HashSet<usize> = (0..TASKS)
            .rev()
            .filter(|&i| states[i].try_take_back())
            .collect();
        drop(pool);
        drop(tx);
        let reported: HashSet<usize> = rx
            .iter()
            .map(|(i, report)| {
                assert_eq!(report.outcome, Ok("1".into()));
                i
            })
            .collect();
        assert!(
            taken.is_disjoint(&reported),
            "a task ran and was taken back"
        );
        assert_eq!(taken.len() + reported.len(), TASKS, "a task was lost");
    }
}
