//! The wasmgrid worker: the sandboxed executor, and the `worker exec` command
//! that runs a whole job on this machine.

pub mod benchmark;
pub mod cli_io;
pub mod exec;
pub mod executor;
pub mod join;
pub mod sysinfo;
