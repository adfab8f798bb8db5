//! A tiny task component written in WAT, for tests that need real tasks
//! without building a wasm guest: `run("spin")` loops until stopped (by its
//! cancel flag or wall clock); any other argument returns `1` at once.

use std::sync::Arc;

use wasmgrid_protocol::TaskLimits;

use super::{Executor, ExecutorOptions, Load, PreparedTask};

const TEST_TASK_WAT: &str = r#"
(component
  (core module $m
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
    (data (i32.const 16) "1")
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $at i32)
      (local.set $at
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get 2))))
      (global.set $heap (i32.add (local.get $at) (local.get 3)))
      (local.get $at))
    (func (export "run") (param $ptr i32) (param $len i32) (result i32)
      (if (i32.eq (local.get $len) (i32.const 6))
        (then (loop $forever (br $forever))))
      ;; ok("1"): discriminant at 32, the string's pointer and length after it
      (i32.store8 (i32.const 32) (i32.const 0))
      (i32.store (i32.const 36) (i32.const 16))
      (i32.store (i32.const 40) (i32.const 1))
      (i32.const 32)))
  (core instance $i (instantiate $m))
  (type $error (variant (case "bad-args" string) (case "failed" string)))
  (export $task-error "task-error" (type $error))
  (func (export "run") (param "args" string) (result (result string (error $task-error)))
    (canon lift (core func $i "run") (memory (core memory $i "memory"))
      (realloc (core func $i "realloc")))))
"#;

/// The JSON argument that makes the test task spin (six bytes with its quotes).
pub const SPIN: &str = "\"spin\"";

pub fn executor(concurrency: u32) -> Arc<Executor> {
    Arc::new(
        Executor::with_options(ExecutorOptions {
            concurrency,
            ..ExecutorOptions::default()
        })
        .expect("an executor"),
    )
}

pub fn test_task(executor: &Executor) -> (Arc<PreparedTask>, Load) {
    let wasm = wat::parse_str(TEST_TASK_WAT).expect("the test task parses");
    executor.load(&wasm).expect("the test task loads")
}

/// Limits under which only cancellation stops a spinning task.
pub fn patient_limits() -> TaskLimits {
    TaskLimits {
        fuel: u64::MAX,
        timeout_ms: 600_000,
        ..TaskLimits::default()
    }
}
