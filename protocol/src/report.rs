//! The per-task limits and the report of one attempt to run a task.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What one task may use. The worker enforces every field.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLimits {
    /// Fuel units (roughly wasm instructions) before `OutOfFuel`.
    pub fuel: u64,
    /// Linear memory, summed over the instance's memories, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock time before `Timeout`, in milliseconds.
    pub timeout_ms: u64,
    /// Bytes kept of each of stdout and stderr; the rest is dropped.
    pub output_bytes: u32,
    /// Largest result JSON a task may return; a longer one is `ResultTooLarge`.
    pub result_bytes: u32,
}

impl TaskLimits {
    pub const DEFAULT_FUEL: u64 = 10_000_000_000;
    pub const DEFAULT_MEMORY_MIB: u64 = 256;
    pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
    pub const DEFAULT_OUTPUT_BYTES: u32 = 64 * 1024;
    pub const DEFAULT_RESULT_BYTES: u32 = 1 << 20;
}

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits {
            fuel: Self::DEFAULT_FUEL,
            memory_bytes: Self::DEFAULT_MEMORY_MIB << 20,
            timeout_ms: Self::DEFAULT_TIMEOUT_SECS * 1000,
            output_bytes: Self::DEFAULT_OUTPUT_BYTES,
            result_bytes: Self::DEFAULT_RESULT_BYTES,
        }
    }
}

/// Why an attempt produced no result. Every failure has one of these names.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FailureKind {
    /// The task used all of its fuel.
    OutOfFuel,
    /// The task tried to grow its memory past its limit.
    MemoryLimit,
    /// The task ran past its wall-clock limit.
    Timeout,
    /// The task trapped: a panic, a stack overflow, an unreachable, a bad access.
    Trap,
    /// The task returned an error of its own.
    GuestError,
    /// The argument set did not fit the task's parameters.
    BadArgs,
    /// The module is not a valid wasm component.
    InvalidModule,
    /// The module is a component, but not of the `wasmgrid:task` world.
    WrongWorld,
    /// The worker running the task went away.
    WorkerLost,
    /// The job was cancelled before the task finished.
    Cancelled,
    /// The task's result JSON was longer than the job's result limit.
    ResultTooLarge,
    /// The worker broke the protocol (a report for an attempt it was not
    /// given, a result over the limits or not JSON, a flood): it was cut off.
    ProtocolViolation,
}

impl FailureKind {
    pub const ALL: [FailureKind; 12] = [
        FailureKind::OutOfFuel,
        FailureKind::MemoryLimit,
        FailureKind::Timeout,
        FailureKind::Trap,
        FailureKind::GuestError,
        FailureKind::BadArgs,
        FailureKind::InvalidModule,
        FailureKind::WrongWorld,
        FailureKind::WorkerLost,
        FailureKind::Cancelled,
        FailureKind::ResultTooLarge,
        FailureKind::ProtocolViolation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::OutOfFuel => "OutOfFuel",
            FailureKind::MemoryLimit => "MemoryLimit",
            FailureKind::Timeout => "Timeout",
            FailureKind::Trap => "Trap",
            FailureKind::GuestError => "GuestError",
            FailureKind::BadArgs => "BadArgs",
            FailureKind::InvalidModule => "InvalidModule",
            FailureKind::WrongWorld => "WrongWorld",
            FailureKind::WorkerLost => "WorkerLost",
            FailureKind::Cancelled => "Cancelled",
            FailureKind::ResultTooLarge => "ResultTooLarge",
            FailureKind::ProtocolViolation => "ProtocolViolation",
        }
    }

    /// The same wasm with the same input fails the same way on every PC, so
    /// retrying such a failure elsewhere only burns time.
    pub fn is_deterministic(self) -> bool {
        !matches!(
            self,
            FailureKind::Timeout
                | FailureKind::WorkerLost
                | FailureKind::Cancelled
                | FailureKind::ProtocolViolation
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named failure with a message for people.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    /// Longest message a worker sends; longer ones are cut (a guest chooses
    /// its error and panic messages).
    pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// The same failure with its message cut to [`Failure::MAX_MESSAGE_BYTES`].
    pub fn bounded(mut self) -> Self {
        if self.message.len() > Self::MAX_MESSAGE_BYTES {
            let mut end = Self::MAX_MESSAGE_BYTES - 3;
            while !self.message.is_char_boundary(end) {
                end -= 1;
            }
            self.message.truncate(end);
            self.message.push_str("...");
        }
        self
    }
}

/// A task's result JSON, or why there is none.
pub type TaskOutcome = Result<String, Failure>;

/// Where the compiled module came from for this attempt.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheSource {
    /// Already loaded in this process.
    Memory,
    /// Deserialized from the on-disk cache.
    Disk,
    /// Compiled from the wasm bytes.
    Compiled,
}

/// Bounded capture of one output stream.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedOutput {
    /// The first bytes written, lossily decoded as UTF-8.
    pub text: String,
    /// Whether bytes past the limit were dropped.
    pub truncated: bool,
}

/// Time spent in each phase of one attempt, in microseconds.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTimings {
    /// Getting the compiled module (compile, disk load, or a memory lookup).
    pub load_us: u64,
    /// Fresh store and instance.
    pub instantiate_us: u64,
    /// The call itself.
    pub run_us: u64,
}

/// Everything one attempt to run a task tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    pub outcome: TaskOutcome,
    pub fuel_used: u64,
    pub cache: CacheSource,
    pub timings: TaskTimings,
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_infrastructure_failures_are_worth_retrying() {
        let retryable: Vec<_> = FailureKind::ALL
            .into_iter()
            .filter(|k| !k.is_deterministic())
            .collect();
        assert_eq!(
            retryable,
            [
                FailureKind::Timeout,
                FailureKind::WorkerLost,
                FailureKind::Cancelled,
                FailureKind::ProtocolViolation
            ]
        );
    }

    #[test]
    fn long_failure_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(Failure::MAX_MESSAGE_BYTES);
        let cut = Failure::new(FailureKind::GuestError, long).bounded();
        assert!(cut.message.len() <= Failure::MAX_MESSAGE_BYTES);
        assert!(cut.message.ends_with("..."));
        let short = Failure::new(FailureKind::GuestError, "short").bounded();
        assert_eq!(short.message, "short");
    }

    #[test]
    fn failure_displays_kind_then_message() {
        let f = Failure::new(FailureKind::OutOfFuel, "used 10 units");
        assert_eq!(f.to_string(), "OutOfFuel: used 10 units");
    }
}
