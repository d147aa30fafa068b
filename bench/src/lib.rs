//! weir's benchmark harness: weir, HAProxy and nginx measured side by side
//! on one namespace topology, in one run (`cargo xtask bench`).
//!
//! - [`load`] and [`tcpload`]: the load generator (`weir-load`), run as
//!   several processes;
//! - [`procs`]: CPU and memory of process trees, read from /proc;
//! - [`systems`]: weir, HAProxy and nginx started with equivalent
//!   configurations, and each one's way of changing backends;
//! - [`scenarios`]: steady, idle, connrate, churn, drain, l4;
//! - [`results`], [`report`], [`plot`]: JSON, Markdown and SVG.

pub mod load;
pub mod plot;
pub mod procs;
pub mod report;
pub mod results;
pub mod scenarios;
pub mod systems;
pub mod tcpload;
