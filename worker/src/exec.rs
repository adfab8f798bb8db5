//! `worker exec`: runs every task of a job on this machine, in the same
//! sandbox the grid uses, and gathers the reports in argument order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::value::RawValue;

use wasmgrid_protocol::{Failure, FailureKind, TaskLimits, TaskReport};

use crate::executor::{Executor, Load, SLOT_THREAD_STACK};

/// Parsed where the foreman parses a submission, so both read args alike.
pub use wasmgrid_jobspec::{split_args, ArgsError};

/// The reports of a whole job, in argument order.
pub struct JobRun {
    pub reports: Vec<TaskReport>,
    pub load: Load,
    pub wall: Duration,
}

impl JobRun {
    pub fn all_succeeded(&self) -> bool {
        self.reports.iter().all(|r| r.outcome.is_ok())
    }

    /// The results as a JSON array in argument order; `null` where a task failed.
    pub fn results_json(&self) -> String {
        let mut out = String::with_capacity(self.reports.len() * 8 + 2);
        out.push('[');
        for (i, report) in self.reports.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match &report.outcome {
                Ok(json) => out.push_str(json),
                Err(_) => out.push_str("null"),
            }
        }
        out.push(']');
        out
    }

    /// Failures by kind, for the summary.
    pub fn failures_by_kind(&self) -> BTreeMap<FailureKind, usize> {
        let mut counts = BTreeMap::new();
        for report in &self.reports {
            if let Err(failure) = &report.outcome {
                *counts.entry(failure.kind).or_insert(0) += 1;
            }
        }
        counts
    }

    /// A few lines for people: counts, failures by kind with examples, fuel, time.
    pub fn summary(&self, max_examples: usize) -> String {
        let total = self.reports.len();
        let failed: usize = self.failures_by_kind().values().sum();
        let fuel: u64 = self.reports.iter().map(|r| r.fuel_used).sum();
        let secs = self.wall.as_secs_f64();
        let mut text = format!(
            "{total} tasks: {} succeeded, {failed} failed",
            total - failed
        );
        if failed > 0 {
            let kinds: Vec<String> = self
                .failures_by_kind()
                .iter()
                .map(|(kind, n)| format!("{kind}: {n}"))
                .collect();
            text.push_str(&format!(" ({})", kinds.join(", ")));
        }
        text.push_str(&format!(
            "\nfuel used: {fuel}; wall time: {secs:.3} s ({:.0} tasks/s); module {} in {:.1} ms",
            total as f64 / secs.max(1e-9),
            match self.load.source {
                wasmgrid_protocol::CacheSource::Compiled => "compiled",
                wasmgrid_protocol::CacheSource::Disk => "loaded from the disk cache",
                wasmgrid_protocol::CacheSource::Memory => "already loaded",
            },
            self.load.micros as f64 / 1000.0
        ));
        let failures = self
            .reports
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.outcome.as_ref().err().map(|f| (i, f)));
        for (i, failure) in failures.take(max_examples) {
            // The first lines say what happened; full backtraces belong in --reports.
            let brief: Vec<&str> = failure.message.lines().take(3).collect();
            text.push_str(&format!(
                "\ntask {i} failed: {}: {}",
                failure.kind,
                brief.join("\n    ")
            ));
        }
        if failed > max_examples {
            text.push_str(&format!("\n… and {} more failures", failed - max_examples));
        }
        text
    }
}

/// Runs every task of a job on `slots` threads; `progress` shows a bar on stderr.
///
/// Slot threads claim the next task index from a shared counter and write
/// each report into its own place, so a tiny task costs no channel hop and
/// no wake-up of the main thread, which only samples progress.
pub fn run_job(
    executor: Arc<Executor>,
    wasm: &[u8],
    args: &[&RawValue],
    limits: TaskLimits,
    slots: usize,
    progress: bool,
) -> Result<JobRun, Failure> {
    let started = Instant::now();
    let (task, load) = executor.load(wasm)?;
    let slots = slots
        .clamp(1, executor.concurrency() as usize)
        .min(args.len());
    let reports: Vec<OnceLock<TaskReport>> = (0..args.len()).map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let exited = AtomicUsize::new(0);
    let bar = progress_bar(args.len() as u64, progress);
    let main = thread::current();

    let spawned = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(slots);
        for slot in 0..slots {
            let worker = || {
                let _exit = SlotExit {
                    exited: &exited,
                    main: &main,
                };
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(arg) = args.get(index) else { break };
                    // Only the first attempt pays for the load; the rest find it warm.
                    let this_load = if index == 0 { load } else { Load::WARM };
                    let mut report = executor.run(&task, this_load, arg.get(), &limits);
                    if let Err(failure) = &mut report.outcome {
                        if failure.kind == FailureKind::BadArgs {
                            failure.message = format!("args[{index}]: {}", failure.message);
                        }
                    }
                    let _ = reports[index].set(report);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            };
            let handle = thread::Builder::new()
                .name(format!("wasmgrid-slot-{slot}"))
                .stack_size(SLOT_THREAD_STACK)
                .spawn_scoped(scope, worker);
            match handle {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    // Stop the others from claiming more work, then report.
                    next.store(args.len(), Ordering::Relaxed);
                    return Err(error);
                }
            }
        }
        while exited.load(Ordering::Acquire) < handles.len() {
            bar.set_position(done.load(Ordering::Relaxed) as u64);
            thread::park_timeout(Duration::from_millis(50));
        }
        Ok(())
    });
    bar.finish_and_clear();
    spawned.map_err(|e| {
        Failure::new(
            FailureKind::WorkerLost,
            format!("could not start slot threads: {e}"),
        )
    })?;
    let reports = reports
        .into_iter()
        .enumerate()
        .map(|(index, report)| report.into_inner().unwrap_or_else(|| lost_report(index)))
        .collect();
    Ok(JobRun {
        reports,
        load,
        wall: started.elapsed(),
    })
}

/// Counts a slot thread out, even one that panicked, and wakes the progress
/// loop at once: the run ends with its last slot, not at the next tick.
struct SlotExit<'a> {
    exited: &'a AtomicUsize,
    main: &'a thread::Thread,
}

impl Drop for SlotExit<'_> {
    fn drop(&mut self) {
        self.exited.fetch_add(1, Ordering::Release);
        self.main.unpark();
    }
}

fn lost_report(index: usize) -> TaskReport {
    failed_report(Failure::new(
        FailureKind::WorkerLost,
        format!("task {index} was never reported by its slot"),
    ))
}

/// The report of an attempt that never ran.
pub fn failed_report(failure: Failure) -> TaskReport {
    TaskReport {
        outcome: Err(failure),
        fuel_used: 0,
        cache: wasmgrid_protocol::CacheSource::Memory,
        timings: Default::default(),
        stdout: Default::default(),
        stderr: Default::default(),
    }
}

fn progress_bar(len: u64, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(10));
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40.cyan/blue} {pos}/{len} tasks  {per_sec}  ETA {eta}  {elapsed_precise}",
    ) {
        bar.set_style(style);
    }
    bar
}
