//! The wasmgrid worker: the sandboxed executor, and the `worker exec` command
//! that runs a whole job on this machine.

pub mod api;
mod attempts;
pub mod benchmark;
pub mod cli_io;
mod credit;
mod drain;
pub mod exec;
pub mod executor;
pub mod join;
mod outgoing;
pub mod status;
pub mod sysinfo;
mod tls;
