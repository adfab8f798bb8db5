//! The built-in benchmark a worker runs at start: how much fuel one slot
//! burns per second of wall-clock time, under the volunteer's CPU cap. Tasks
//! report fuel used and run time, so the foreman can compare this first guess
//! of the worker's speed with what its tasks later show.

use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::{Instance, Module, Store, UpdateDeadline};

use crate::executor::throttle;
use crate::executor::{Executor, EPOCH_TICK};

/// How long the benchmark runs without a cap.
pub const BENCHMARK_TIME: Duration = Duration::from_millis(150);
/// Under a cap, the benchmark runs long enough to span this many epoch ticks
/// of running, so the cap's rests are measured rather than missed.
const MIN_TICKS_RUN: u32 = 25;
/// ... but never longer than this, even at a cap of 1 %.
const MAX_BENCHMARK_TIME: Duration = Duration::from_secs(2);

/// A tight integer loop (xorshift64), `n` rounds per call.
const SPIN_WAT: &str = r#"
(module
  (func (export "spin") (param $n i64) (result i64)
    (local $x i64)
    (local.set $x (i64.const 88172645463325252))
    (block $done
      (loop $next
        (br_if $done (i64.eqz (local.get $n)))
        (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 13))))
        (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 7))))
        (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 17))))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $next)))
    (local.get $x)))
"#;

/// Rounds per call: well under a millisecond, so the benchmark ends close to its time.
const ROUNDS_PER_CALL: i64 = 20_000;
const FUEL: u64 = 1 << 62;

/// How long the benchmark runs for a cap of `percent`.
pub fn benchmark_time(percent: u32) -> Duration {
    let percent = percent.clamp(1, 100);
    let capped = EPOCH_TICK * MIN_TICKS_RUN * 100 / percent;
    BENCHMARK_TIME.max(capped.min(MAX_BENCHMARK_TIME))
}

/// Fuel per second of wall-clock time on this thread, under the executor's
/// CPU cap; 0 on an executor without fuel metering. Blocks for
/// [`benchmark_time`] of the cap.
pub fn fuel_per_sec(executor: &Executor) -> anyhow::Result<u64> {
    let percent = executor.cpu_limit_percent();
    measure(executor, benchmark_time(percent))
}

fn measure(executor: &Executor, duration: Duration) -> anyhow::Result<u64> {
    let engine = executor.engine();
    let wasm = wat::parse_str(SPIN_WAT).context("the benchmark module does not parse")?;
    let module = Module::new(engine, wasm)?;
    let mut store = Store::new(engine, ());
    if store.set_fuel(FUEL).is_err() {
        return Ok(0);
    }
    let percent = executor.cpu_limit_percent();
    let capped = percent < 100;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if capped {
            throttle::tick(None);
        }
        Ok(UpdateDeadline::Continue(1))
    });
    let _ticking = executor.ticking();
    let instance = Instance::new(&mut store, &module, &[])?;
    let spin = instance.get_typed_func::<i64, i64>(&mut store, "spin")?;
    // Warm up (page in the code) outside the measurement.
    spin.call(&mut store, ROUNDS_PER_CALL)?;

    if capped {
        throttle::begin(percent, None);
    }
    let fuel_before = store.get_fuel()?;
    let started = Instant::now();
    while started.elapsed() < duration {
        spin.call(&mut store, ROUNDS_PER_CALL)?;
    }
    let elapsed = started.elapsed();
    if capped {
        throttle::end();
    }
    let used = fuel_before.saturating_sub(store.get_fuel()?);
    Ok((used as f64 / elapsed.as_secs_f64().max(1e-9)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::{ExecutorOptions, Metering};

    #[test]
    fn a_cap_lengthens_the_benchmark_within_bounds() {
        assert_eq!(benchmark_time(100), BENCHMARK_TIME);
        assert_eq!(benchmark_time(50), Duration::from_millis(250));
        assert_eq!(benchmark_time(1), MAX_BENCHMARK_TIME);
        assert_eq!(benchmark_time(0), MAX_BENCHMARK_TIME);
    }

    #[test]
    fn the_benchmark_burns_fuel() {
        let executor = Executor::with_options(ExecutorOptions {
            concurrency: 1,
            ..ExecutorOptions::default()
        })
        .unwrap();
        let score = measure(&executor, Duration::from_millis(20)).unwrap();
        // Any machine that runs wasm at all manages a million instructions a second.
        assert!(score > 1_000_000, "{score}");
    }

    #[test]
    fn without_fuel_there_is_no_score() {
        let executor = Executor::with_options(ExecutorOptions {
            concurrency: 1,
            metering: Metering::WallClockOnly,
            ..ExecutorOptions::default()
        })
        .unwrap();
        assert_eq!(measure(&executor, Duration::from_millis(5)).unwrap(), 0);
    }
}
