//! The wasmgrid foreman: accepts jobs, splits them into tasks, dispatches
//! them to workers over QUIC and keeps everything in SQLite.

pub mod model;
pub mod store;
