//! Runs tasks in a sandbox: one shared engine, modules cached by content,
//! a fresh instance per task with fuel, memory and wall-clock limits, on a
//! fixed number of slot threads.

mod artifacts;
mod cache;
mod engine;
mod naps;
mod output;
mod preempt;
mod priority;
mod run;
mod sandbox;
mod slots;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod throttle;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Engine;

use wasmgrid_protocol::{Failure, TaskLimits, TaskReport};

pub use artifacts::DEFAULT_MAX_BYTES as DEFAULT_CACHE_MAX_BYTES;
pub use cache::{ModuleId, PreparedTask};
pub use engine::{Metering, EPOCH_TICK, SLOT_THREAD_STACK};
pub use priority::{apply_to_this_thread, SlotPriority};
pub use run::{CancelFlag, Load};
pub use slots::{SlotPool, TaskState, Tracking};

use cache::ModuleCache;
use engine::{EpochClock, Ticking};
use sandbox::Sandbox;

/// Host bindings of `wit/task.wit`.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({ world: "task", path: "../wit" });
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("could not set up the wasm engine: {0:#}")]
    Engine(wasmtime::Error),
    #[error("could not start the thread that stops overrunning tasks: {0}")]
    Clock(std::io::Error),
}

/// How an executor is set up.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// Where compiled modules persist between runs; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// What the modules compiled in `cache_dir` may take; the least recently
    /// used go past it.
    pub cache_max_bytes: u64,
    pub metering: Metering,
    /// The most tasks running at once (slots); instances are pooled for that
    /// many. 0: this executor validates modules and runs none, so it
    /// reserves no pool (each pooled memory reserves gigabytes of address space).
    pub concurrency: u32,
    /// The volunteer's cap on each slot's CPU time, in percent (1..=100;
    /// 100: no cap). A capped slot sleeps between epoch ticks so that it
    /// runs this share of the time; wall-clock limits still count real time.
    pub cpu_limit_percent: u32,
    pub interruption: Interruption,
}

/// How a running task is stopped from outside, at its deadline or when cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interruption {
    /// By signal where the platform allows it (the guest's code carries no
    /// checks), else by epoch. A CPU cap always uses epochs: its rests are
    /// taken at the checks.
    #[default]
    Auto,
    /// By an epoch check compiled into every loop and function entry.
    Epoch,
}

/// What stops this executor's running tasks.
pub(crate) enum Stopper {
    Signal(preempt::Watchdog),
    Epoch(EpochClock),
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        ExecutorOptions {
            cache_dir: None,
            cache_max_bytes: artifacts::DEFAULT_MAX_BYTES,
            metering: Metering::Fuel,
            concurrency: 16,
            cpu_limit_percent: 100,
            interruption: Interruption::Auto,
        }
    }
}

pub struct Executor {
    engine: Engine,
    concurrency: u32,
    cpu_limit_percent: u32,
    cache: ModuleCache,
    stopper: Stopper,
}

impl Executor {
    /// A fuel-metered executor whose compiled modules persist in `cache_dir` when given.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, ExecutorError> {
        Self::with_options(ExecutorOptions {
            cache_dir,
            ..ExecutorOptions::default()
        })
    }

    pub fn with_options(options: ExecutorOptions) -> Result<Self, ExecutorError> {
        let ExecutorOptions {
            cache_dir,
            cache_max_bytes,
            metering,
            concurrency,
            cpu_limit_percent,
            interruption,
        } = options;
        let cpu_limit_percent = throttle::DutyCycle::new(cpu_limit_percent).percent();
        let by_signal = interruption == Interruption::Auto
            && cpu_limit_percent == 100
            && metering != Metering::Unbounded;
        let watchdog = if by_signal {
            preempt::Watchdog::start().map_err(ExecutorError::Clock)?
        } else {
            None
        };
        let engine = engine::new_engine(metering, concurrency, watchdog.is_none())
            .map_err(ExecutorError::Engine)?;
        let mut linker = Linker::<Sandbox>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(ExecutorError::Engine)?;
        naps::add_to_linker(&mut linker).map_err(ExecutorError::Engine)?;
        bindings::Task::add_to_linker::<Sandbox, HasSelf<Sandbox>>(&mut linker, |s| s)
            .map_err(ExecutorError::Engine)?;
        let stopper = match watchdog {
            Some(watchdog) => Stopper::Signal(watchdog),
            None => Stopper::Epoch(EpochClock::start(&engine).map_err(ExecutorError::Clock)?),
        };
        Ok(Executor {
            cache: ModuleCache::new(engine.clone(), linker, cache_dir, cache_max_bytes),
            engine,
            concurrency: concurrency.max(1),
            cpu_limit_percent,
            stopper,
        })
    }

    /// The most tasks this executor can run at once.
    pub fn concurrency(&self) -> u32 {
        self.concurrency
    }

    /// The cap on each slot's CPU time, in percent (100: none).
    pub fn cpu_limit_percent(&self) -> u32 {
        self.cpu_limit_percent
    }

    /// The shared engine (the benchmark runs its own module on it).
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// How running tasks are stopped: `"signal"` or `"epoch"`.
    pub fn interruption(&self) -> &'static str {
        match self.stopper {
            Stopper::Signal(_) => "signal",
            Stopper::Epoch(_) => "epoch",
        }
    }

    /// Keeps the epoch clock ticking for code that runs on [`Executor::engine`]
    /// (`None` when tasks are stopped by signal: there is no clock).
    pub(crate) fn ticking(&self) -> Option<Ticking<'_>> {
        match &self.stopper {
            Stopper::Epoch(clock) => Some(clock.ticking()),
            Stopper::Signal(_) => None,
        }
    }

    /// Validates and prepares a module, reusing any earlier compilation.
    pub fn load(&self, wasm: &[u8]) -> Result<(Arc<PreparedTask>, Load), Failure> {
        let started = Instant::now();
        let (task, source) = self.cache.load(wasm)?;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok((task, Load { source, micros }))
    }

    /// A module loaded earlier, by its sha256.
    pub fn loaded(&self, id: &ModuleId) -> Option<Arc<PreparedTask>> {
        self.cache.get(id)
    }

    /// A module by its sha256 from memory or the disk cache, without its bytes.
    pub fn load_cached(&self, id: ModuleId) -> Option<(Arc<PreparedTask>, Load)> {
        let started = Instant::now();
        let (task, source) = self.cache.load_cached(id)?;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Some((task, Load { source, micros }))
    }

    /// The engine's artifact compatibility hash, reported to the foreman.
    pub fn engine_hash(&self) -> &str {
        self.cache.compatibility()
    }

    /// Runs one task on the calling thread; blocks until it ends.
    pub fn run(
        &self,
        task: &PreparedTask,
        load: Load,
        args: &str,
        limits: &TaskLimits,
    ) -> TaskReport {
        run::run_task(
            &self.engine,
            &self.stopper,
            task,
            load,
            args,
            limits,
            None,
            self.cpu_limit_percent,
        )
    }

    /// Like [`Executor::run`], but stops with `Cancelled` once `cancel` is set.
    pub fn run_cancellable(
        &self,
        task: &PreparedTask,
        load: Load,
        args: &str,
        limits: &TaskLimits,
        cancel: CancelFlag,
    ) -> TaskReport {
        run::run_task(
            &self.engine,
            &self.stopper,
            task,
            load,
            args,
            limits,
            Some(cancel),
            self.cpu_limit_percent,
        )
    }
}
