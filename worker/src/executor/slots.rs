//! A fixed number of slot threads that run tasks, so callers (async or not)
//! never block on wasm themselves.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use wasmgrid_protocol::{Failure, FailureKind, TaskLimits, TaskReport};

use super::{CancelFlag, Executor, Load, PreparedTask, SLOT_THREAD_STACK};

type Reply = Box<dyn FnOnce(TaskReport) + Send>;

struct Job {
    task: Arc<PreparedTask>,
    load: Load,
    args: String,
    limits: TaskLimits,
    cancel: Option<CancelFlag>,
    reply: Reply,
}

pub struct SlotPool {
    jobs: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl SlotPool {
    /// `slots` threads, at most the executor's concurrency.
    pub fn new(executor: Arc<Executor>, slots: usize) -> std::io::Result<Self> {
        let slots = slots.clamp(1, executor.concurrency() as usize);
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let threads = (0..slots)
            .map(|slot| {
                let executor = executor.clone();
                let receiver = receiver.clone();
                thread::Builder::new()
                    .name(format!("wasmgrid-slot-{slot}"))
                    .stack_size(SLOT_THREAD_STACK)
                    .spawn(move || {
                        for job in receiver {
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
                            (job.reply)(report);
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(SlotPool {
            jobs: Some(sender),
            threads,
        })
    }

    pub fn slots(&self) -> usize {
        self.threads.len()
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
        self.submit_cancellable(task, load, args, limits, None, reply);
    }

    /// Like [`SlotPool::submit`]; setting `cancel` skips the task if it has
    /// not started and stops it within an epoch tick if it has.
    pub fn submit_cancellable(
        &self,
        task: Arc<PreparedTask>,
        load: Load,
        args: String,
        limits: TaskLimits,
        cancel: Option<CancelFlag>,
        reply: impl FnOnce(TaskReport) + Send + 'static,
    ) {
        let job = Job {
            task,
            load,
            args,
            limits,
            cancel,
            reply: Box::new(reply),
        };
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

impl Drop for SlotPool {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
