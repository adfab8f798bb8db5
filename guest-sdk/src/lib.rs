//! The wasmgrid guest SDK: write a task as a plain Rust function.
//!
//! ```ignore
//! use wasmgrid_guest::task;
//!
//! #[task]
//! fn count_primes(lo: u64, hi: u64) -> u64 {
//!     (lo..hi).filter(|&n| is_prime(n)).count() as u64
//! }
//! ```
//!
//! Build the crate as a `cdylib` for `wasm32-wasip2`; the linker emits a
//! component of the `wasmgrid:task` world (`wit/task.wit`) that any worker runs.

mod args;
mod export;

pub use args::ArgDecoder;
pub use wasmgrid_guest_macros::task;

use std::fmt;

/// Why a task produced no result; mirrors `task-error` in `wit/task.wit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// The argument set did not fit the task's parameters.
    BadArgs(String),
    /// The task returned an error of its own.
    Failed(String),
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::BadArgs(message) => write!(f, "bad arguments: {message}"),
            TaskError::Failed(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for TaskError {}

/// Encodes a task's return value as its JSON result.
pub fn encode_output<T: serde::Serialize>(value: T) -> Result<String, TaskError> {
    serde_json::to_string(&value)
        .map_err(|e| TaskError::Failed(format!("the result could not be encoded as JSON: {e}")))
}

/// Encodes a task's `Result`: `Ok` as its JSON result, `Err` as a failure.
pub fn encode_result<T: serde::Serialize, E: fmt::Display>(
    result: Result<T, E>,
) -> Result<String, TaskError> {
    match result {
        Ok(value) => encode_output(value),
        Err(error) => Err(TaskError::Failed(error.to_string())),
    }
}

#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::export::{bindings, install_panic_hook, to_wit_error};
}
