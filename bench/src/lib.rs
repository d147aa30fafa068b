//! weir's benchmark harness: weir, HAProxy and nginx measured side by side
//! on one namespace topology (`steady` also on loopback), in one run
//! (`cargo xtask bench`).
//!
//! - [`load`] and [`tcpload`]: the load generator (`weir-load`), run as
//!   several processes;
//! - [`micro`]: XDP per-packet timing and `weir backend set` wall time
//!   (`weir-bench-l4`, and the `micro` scenario);
//! - [`procs`]: CPU and memory of process trees, read from /proc;
//! - [`systems`]: weir, HAProxy and nginx started with equivalent
//!   configurations, and each one's way of changing backends;
//! - [`stage`]: the topology, echo backends and sizes a run shares, and
//!   how a scenario drives load and measures it;
//! - [`scenario`]: what a scenario is; [`scenarios`]: steady, push, idle,
//!   bigconn, connrate, storm, churn, propagate, discover, drain, failure,
//!   upgrade, l4, micro, each with its run, rows, check, report section
//!   and chart;
//!   [`catalog`]: all of them, and the result file;
//! - [`results`]: the measurements rows are made of and the run's facts;
//! - [`goals`]: the performance goals, checked against a run's rows;
//! - [`report`] with [`table`], and [`plot`] with [`chart`]: Markdown and
//!   SVG.

pub mod catalog;
pub mod chart;
pub mod goals;
pub mod load;
pub mod micro;
pub mod plot;
pub mod procs;
pub mod report;
pub mod results;
pub mod scenario;
pub mod scenarios;
pub mod stage;
pub mod systems;
pub mod table;
pub mod tcpload;
