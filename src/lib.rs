//! livegate: a real-time gateway for live-room commerce.
//!
//! The library holds every part of the gateway so that tests and benchmarks can drive them
//! directly; `main.rs` only parses the command line and calls into [`cli`]. See
//! ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod app;
pub mod auth;
pub mod cli;
pub mod command;
pub mod commit;
pub mod config;
pub mod connection;
pub mod http;
pub mod hub;
pub mod inventory;
pub mod keys;
pub mod metrics;
pub mod order_writer;
pub mod outbound;
pub mod protocol;
pub mod recovery;
pub(crate) mod resp;
pub mod server;
pub mod store;
