//! The wasmtime engine every task shares, and the clock that drives
//! wall-clock limits through epoch interruption.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig,
};

/// How often the epoch advances: the granularity of wall-clock limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Largest wasm stack a guest gets before a stack-overflow trap.
pub const MAX_WASM_STACK: usize = 1 << 20;

/// Native stack for the threads that run guests: room for the wasm stack plus host frames.
pub const SLOT_THREAD_STACK: usize = 8 << 20;

/// Whether tasks are metered with fuel. Without it they run a little faster
/// but only the wall-clock limit stops a runaway guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    Fuel,
    WallClockOnly,
    /// No fuel and no epoch checks: nothing stops a runaway guest. Only for
    /// measuring what the interruption checks cost (the benchmark's floor).
    Unbounded,
}

/// Memory per pooled slot reset in place rather than returned to the kernel:
/// covers what a typical task touches (a 1 MiB Rust stack, data, some heap).
const KEEP_RESIDENT_BYTES: usize = 8 << 20;

/// Largest linear memory any task may have (the wasm32 maximum).
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;

/// `concurrency`: the most tasks that may be instantiated at once. Instances
/// come from a pool sized for that many, so a fresh instance per task reuses
/// memory already mapped instead of paying mmap/munmap (and the kernel's
/// TLB shootdowns) each time. 0: the engine only compiles and links (a
/// validator), so it reserves no pool and instantiates on demand.
/// `epoch`: compile epoch checks into guests (for wall-clock limits where
/// signals cannot stop a guest, and for the CPU cap's rests).
pub fn new_engine(metering: Metering, concurrency: u32, epoch: bool) -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    // A wasip2 component holds a handful of core instances, memories and
    // tables; the margin covers slots whose reset is still under way.
    let slots = concurrency * 2 + 4;
    pool.total_component_instances(slots)
        .total_core_instances(slots * 16)
        .total_memories(slots * 2)
        .total_tables(slots * 8)
        .max_memories_per_component(4)
        .max_memory_size(MAX_MEMORY_BYTES as usize)
        .max_tables_per_component(16)
        .table_elements(1 << 16)
        // Reset a used slot by rewriting only its dirty pages (PAGEMAP_SCAN on
        // Linux 6.7+) rather than madvise: madvise from several slot threads
        // makes the kernel flush every CPU's TLB and scales negatively.
        .pagemap_scan(Enabled::Auto)
        .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
        .table_keep_resident(64 << 10);
    let mut config = Config::new();
    config
        .allocation_strategy(if concurrency == 0 {
            InstanceAllocationStrategy::OnDemand
        } else {
            InstanceAllocationStrategy::Pooling(pool)
        })
        .consume_fuel(metering == Metering::Fuel)
        .epoch_interruption(epoch && metering != Metering::Unbounded)
        .max_wasm_stack(MAX_WASM_STACK)
        .cranelift_opt_level(OptLevel::Speed);
    Engine::new(&config)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] while a task runs, and
/// sleeps otherwise: an idle worker on somebody's PC wakes nobody.
pub struct EpochClock {
    shared: Arc<ClockShared>,
    thread: Option<thread::JoinHandle<()>>,
}

struct ClockShared {
    /// Tasks running now (holders of a [`Ticking`]).
    running: AtomicUsize,
    stop: AtomicBool,
    /// Epochs advanced so far.
    ticks: AtomicU64,
}

/// Keeps the clock ticking while held; one per running task.
pub struct Ticking<'a> {
    clock: &'a EpochClock,
}

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.clock.shared.running.fetch_sub(1, Ordering::Release);
    }
}

impl EpochClock {
    pub fn start(engine: &Engine) -> std::io::Result<Self> {
        let shared = Arc::new(ClockShared {
            running: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
        });
        let engine = engine.clone();
        let state = shared.clone();
        let thread = thread::Builder::new()
            .name("wasmgrid-epoch".into())
            .spawn(move || {
                while !state.stop.load(Ordering::Acquire) {
                    if state.running.load(Ordering::Acquire) == 0 {
                        // Deadlines count ticks from when a task starts, so
                        // ticks nobody waits for can be skipped.
                        thread::park();
                        continue;
                    }
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    state.ticks.fetch_add(1, Ordering::Relaxed);
                }
            })?;
        Ok(EpochClock {
            shared,
            thread: Some(thread),
        })
    }

    /// Call before a task's deadline is set; the clock ticks until the
    /// returned guard is dropped.
    pub fn ticking(&self) -> Ticking<'_> {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0 {
            if let Some(thread) = &self.thread {
                thread.thread().unpark();
            }
        }
        Ticking { clock: self }
    }

    /// Epoch ticks that cover `timeout`, rounded up, plus one for the partial
    /// tick already under way.
    pub fn ticks_for(timeout: Duration) -> u64 {
        let tick = EPOCH_TICK.as_nanos();
        (timeout.as_nanos().div_ceil(tick) as u64).saturating_add(1)
    }
}

impl Drop for EpochClock {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_ticks_only_while_a_task_runs() {
        let engine = new_engine(Metering::WallClockOnly, 1, true).unwrap();
        let clock = EpochClock::start(&engine).unwrap();
        let ticks = || clock.shared.ticks.load(Ordering::Relaxed);
        thread::sleep(EPOCH_TICK * 10);
        assert_eq!(ticks(), 0, "an idle clock advanced the epoch");
        let ticking = clock.ticking();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ticks() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock never ticked"
            );
            thread::sleep(EPOCH_TICK);
        }
        drop(ticking);
    }

    #[test]
    fn ticks_cover_the_timeout() {
        assert_eq!(EpochClock::ticks_for(Duration::from_millis(5)), 2);
        assert_eq!(EpochClock::ticks_for(Duration::from_millis(6)), 3);
        assert_eq!(EpochClock::ticks_for(Duration::from_secs(1)), 201);
    }
}
