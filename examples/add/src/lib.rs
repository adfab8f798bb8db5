//! The smallest useful task: adds two numbers. Used to measure per-task overhead.

use wasmgrid_guest::task;

#[task]
fn add(a: i64, b: i64) -> i64 {
    a.wrapping_add(b)
}
