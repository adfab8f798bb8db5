//! How much work a joined worker asks for: credit for its slots plus a
//! prefetch window sized in time, grown as it learns how long tasks take.

use std::time::Duration;

use wasmgrid_protocol::wire::MAX_PREFETCH_PER_SLOT;

/// Queued work to hold per slot, measured in time: enough that tiny tasks are
/// not bound by round trips nor by the reports held back (`outgoing`), little
/// enough that long ones are not hoarded.
const PIPE_TARGET_US: f64 = 16_000.0;
const MIN_PREFETCH_PER_SLOT: u32 = 2;

/// The credit this worker has granted, grown as it learns how long tasks take.
pub struct CreditWindow {
    slots: u32,
    granted: u32,
    /// Moving average of a task's instantiate + run time.
    task_us: f64,
}

impl CreditWindow {
    pub fn new(slots: u32) -> Self {
        CreditWindow {
            slots,
            granted: slots * (1 + MIN_PREFETCH_PER_SLOT),
            task_us: PIPE_TARGET_US / f64::from(MIN_PREFETCH_PER_SLOT),
        }
    }

    /// Credit granted so far.
    pub fn granted(&self) -> u32 {
        self.granted
    }

    /// How long `queued` tasks keep the slots busy, at the usual task time.
    pub fn queue_lasts(&self, queued: usize) -> Duration {
        let micros = queued as f64 * self.task_us / f64::from(self.slots.max(1));
        Duration::from_secs_f64(micros / 1e6)
    }

    pub fn observe(&mut self, micros: u64) {
        self.task_us = 0.9 * self.task_us + 0.1 * (micros.max(1) as f64);
    }

    /// More credit to grant, when tasks turned out shorter than assumed.
    /// Credit is never taken back: each report returns its own.
    pub fn grow(&mut self) -> Option<u32> {
        let per_slot = (PIPE_TARGET_US / self.task_us).ceil() as u32;
        let per_slot = per_slot.clamp(MIN_PREFETCH_PER_SLOT, MAX_PREFETCH_PER_SLOT);
        let wanted = self.slots * (1 + per_slot);
        (wanted > self.granted).then(|| {
            let extra = wanted - self.granted;
            self.granted = wanted;
            extra
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_lasts_its_tasks_shared_over_the_slots() {
        let mut window = CreditWindow::new(2);
        for _ in 0..200 {
            window.observe(1_000);
        }
        let lasts = window.queue_lasts(6).as_secs_f64();
        assert!((lasts - 0.003).abs() < 1e-4, "{lasts}");
        assert_eq!(window.queue_lasts(0), Duration::ZERO);
    }

    #[test]
    fn credit_grows_for_tiny_tasks_and_stays_small_for_long_ones() {
        let mut long = CreditWindow::new(2);
        for _ in 0..100 {
            long.observe(2_000_000);
        }
        assert_eq!(long.grow(), None);
        assert_eq!(long.granted, 6);

        let mut tiny = CreditWindow::new(2);
        for _ in 0..200 {
            tiny.observe(1);
        }
        assert_eq!(tiny.grow(), Some(2 * (1 + MAX_PREFETCH_PER_SLOT) - 6));
        assert_eq!(tiny.grow(), None);
    }
}
