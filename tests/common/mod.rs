//! Shared test harness: a real redis-server on a free port (`redis`), the gateway on port 0
//! (`gateway`), and PostgreSQL detection (`redis::postgres_url`).
#![allow(dead_code)]

pub mod gateway;
pub mod redis;
