//! Shared test harness: a real redis-server on a free port (`redis`), the gateway on port 0
//! (`gateway`), a proxy that can delay Redis traffic (`proxy`), and PostgreSQL detection
//! (`redis::postgres_url`).
#![allow(dead_code)]

pub mod gateway;
pub mod proxy;
pub mod redis;
