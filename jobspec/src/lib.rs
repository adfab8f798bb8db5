//! A job submission as the foreman receives it (`POST /api/jobs`), parsed and
//! checked against the foreman's limits, and `args.json` as `worker exec`
//! reads it. Pure parsing with no wasmtime, so it can be fuzzed.

mod args;
mod limits;
mod options;
mod scheduler;
mod submission;

pub use args::{split_args, ArgsError};
pub use limits::{Limit, SubmitLimits};
pub use options::JobOptions;
pub use scheduler::{Scheduler, UnknownScheduler};
pub use submission::{parse_hash, parse_submission, ModuleRef, Submission, SubmitError};
