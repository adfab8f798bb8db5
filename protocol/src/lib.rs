//! Types shared by the foreman and the worker: what a task may use, and what
//! an attempt to run it reports.

mod report;
#[cfg(feature = "quinn")]
pub mod stream;
pub mod wire;

pub use report::{
    CacheSource, CapturedOutput, Failure, FailureKind, TaskLimits, TaskOutcome, TaskReport,
    TaskTimings,
};
