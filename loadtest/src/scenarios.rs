//! The scenarios, one file each: `fanout` (broadcast delivery latency, NATS baseline),
//! `rush` (flash-sale reservations, Lua baseline), `checkout` (orders end to end),
//! `soak` (churn over time, server RSS) `idle` (memory per idle connection) and `probe` (protocol conformance).

pub mod checkout;
pub mod fanout;
pub mod idle;
pub mod probe;
pub mod rush;
pub mod soak;
