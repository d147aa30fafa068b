//! weir: a load balancer for long-lived WebSocket traffic.
//!
//! - [`registry`]: services and backends in pinned BPF maps, changed only
//!   through one validated, verified, audited API (Maglev builder inside).
//! - [`dataplane`]: loads and attaches the XDP balancer and the tc decap.
//! - [`daemon`]: `weir run` around its L7 workers (the checks that keep it
//!   honest about the maps and listeners it serves, worker start-up) and
//!   `weir agent` (health checks, freeing removed backends), with the
//!   plumbing they share.
//! - [`discovery`]: backend sets from a source (a watched file, etcd) that
//!   `weir agent` applies.
//! - [`health`]: the pure core of the health checks (schedule, rise/fall,
//!   the TCP, HTTP and WebSocket probes).
//! - [`config_file`], [`prometheus`], [`logs`]: what both daemons' files,
//!   metrics and logs share.
//! - [`cli`]: the `weir` command line.
//! - [`instance`]: where an instance's pins, lock and audit log live.

pub mod cli;
pub mod config_file;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod health;
pub mod instance;
pub mod l7;
pub mod logs;
pub mod prometheus;
pub mod registry;
