//! The wasmtime engine every task shares, and the clock that drives
//! wall-clock limits through epoch interruption.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use wasmtime::{Config, Engine, OptLevel};

/// How often the epoch advances: the granularity of wall-clock limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Largest wasm stack a guest gets before a stack-overflow trap.
pub const MAX_WASM_STACK: usize = 1 << 20;

/// Native stack for the threads that run guests: room for the wasm stack plus host frames.
pub const SLOT_THREAD_STACK: usize = 8 << 20;

pub fn new_engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .cranelift_opt_level(OptLevel::Speed);
    Engine::new(&config)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochClock {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EpochClock {
    pub fn start(engine: &Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let stop_flag = stop.clone();
        let thread = thread::Builder::new()
            .name("wasmgrid-epoch".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(EpochClock {
            stop,
            thread: Some(thread),
        })
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
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_timeout() {
        assert_eq!(EpochClock::ticks_for(Duration::from_millis(5)), 2);
        assert_eq!(EpochClock::ticks_for(Duration::from_millis(6)), 3);
        assert_eq!(EpochClock::ticks_for(Duration::from_secs(1)), 201);
    }
}
