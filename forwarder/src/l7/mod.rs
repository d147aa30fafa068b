//! The L7 path: the WebSocket handshake, the frame rules and drain
//! scheduling, as pure (sans-IO) modules with exhaustive tests. The
//! io_uring workers of `weir run` drive them and only move bytes.

pub mod bufring;
pub mod config;
pub mod conn;
pub mod drain;
pub mod frame;
pub mod handshake;
pub mod metrics;
pub mod op;
pub mod relay;
pub mod socket;
pub mod table;
pub mod upstream;
pub mod view;
pub mod worker;
