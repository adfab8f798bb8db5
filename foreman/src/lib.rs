//! The wasmgrid foreman: accepts jobs, splits them into tasks, dispatches
//! them to workers over QUIC and keeps everything in SQLite.

pub mod admin;
pub mod api;
pub mod client;
pub mod core;
pub mod dashboard;
pub mod driver;
pub mod identity;
pub mod model;
pub mod net;
pub mod retention;
pub mod serve;
pub mod store;
pub mod tables;
pub mod tokens;
