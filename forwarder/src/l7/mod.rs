//! The L7 path. The WebSocket handshake, the frame rules, drain scheduling
//! and the connection itself (`conn`) are pure (sans-IO) modules with
//! exhaustive tests; `upstream` chooses backends through the registry
//! `view`. The io_uring workers of `weir run` (`worker`, with its
//! operations in `op` and its sockets in `socket`) drive them and only move
//! bytes; a reloaded configuration reaches them through `reconfig`. A
//! relaying connection can be exported as plain data and imported by
//! another process (`conn`'s snapshot, on the wire through `handoff`).

pub mod bufring;
pub mod config;
pub mod conn;
pub mod drain;
pub mod ejections;
pub mod files;
pub mod frame;
pub mod handoff;
pub mod handshake;
pub mod metrics;
pub mod op;
pub mod outlier;
pub mod reconfig;
pub mod relay;
pub mod socket;
pub mod table;
pub mod timers;
pub mod upstream;
pub mod view;
pub mod worker;
