//! The state each task's store carries: an empty WASI context, bounded output
//! pipes, the memory guard, and the host side of the `wasmgrid:task/host` import.

use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::wasmgrid::task::{host, types};
use super::naps::TaskClock;
use super::output::BoundedPipe;
use super::CancelFlag;

/// Longest panic message kept, so a guest cannot grow the report without bound.
const MAX_PANIC_MESSAGE: usize = 16 * 1024;

/// Most table elements one instance may have; guards host memory against huge tables.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// A deadline this far off stands for none.
const FAR_OFF: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub struct Sandbox {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    /// The guest's monotonic clock, and when its sleeps end at the latest.
    pub(super) clock: TaskClock,
    pub(super) deadline: Instant,
    /// Why a sleep was cut short, if one was (see `naps`).
    pub(super) nap_cut: Arc<AtomicU8>,
    /// Ends sleeps early too, so a cancelled task is back where it can be stopped.
    pub(super) cancel: Option<CancelFlag>,
    pub memory: MemoryGuard,
    pub stdout: BoundedPipe,
    pub stderr: BoundedPipe,
    pub panic_message: Option<String>,
}

impl Sandbox {
    /// A sandbox with no files, no environment, no arguments, no network,
    /// stdout/stderr captured up to `output_bytes` each, and sleeps that end
    /// by `timeout` from now.
    pub fn new(memory_bytes: u64, output_bytes: usize, timeout: Duration) -> Self {
        let stdout = BoundedPipe::new(output_bytes);
        let stderr = BoundedPipe::new(output_bytes);
        let clock = TaskClock {
            started: Instant::now(),
        };
        let deadline = clock
            .started
            .checked_add(timeout.min(FAR_OFF))
            .unwrap_or(clock.started);
        let wasi = WasiCtxBuilder::new()
            .monotonic_clock(clock)
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Sandbox {
            wasi,
            table: ResourceTable::new(),
            clock,
            deadline,
            nap_cut: Arc::default(),
            cancel: None,
            memory: MemoryGuard::new(memory_bytes),
            stdout,
            stderr,
            panic_message: None,
        }
    }
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for Sandbox {
    fn report_panic(&mut self, mut message: String) {
        if message.len() > MAX_PANIC_MESSAGE {
            let mut end = MAX_PANIC_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(" [truncated]");
        }
        self.panic_message = Some(message);
    }
}

impl types::Host for Sandbox {}

/// Caps linear memory summed over all of an instance's memories, and
/// remembers a refused growth so the failure is named `MemoryLimit` rather
/// than the bare trap a guest's allocator turns it into.
#[derive(Debug)]
pub struct MemoryGuard {
    limit: u64,
    in_use: u64,
    pub refused: Option<u64>,
}

impl MemoryGuard {
    pub fn new(limit: u64) -> Self {
        MemoryGuard {
            limit,
            in_use: 0,
            refused: None,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

impl ResourceLimiter for MemoryGuard {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let wanted = self.in_use.saturating_sub(current as u64) + desired as u64;
        if wanted > self.limit {
            self.refused = Some(wanted);
            return Ok(false);
        }
        self.in_use = wanted;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_guard_sums_memories_and_records_refusal() {
        let mut guard = MemoryGuard::new(100);
        assert!(guard.memory_growing(0, 60, None).unwrap());
        assert!(guard.memory_growing(0, 40, None).unwrap());
        assert!(!guard.memory_growing(40, 41, None).unwrap());
        assert_eq!(guard.refused, Some(101));
        assert!(guard.memory_growing(60, 59, None).unwrap());
    }
}
