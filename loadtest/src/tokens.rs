//! Token minting: HS256 JWTs signed with the deployment secret (`--secret`, or the secret
//! generated for a `--spawn`ed gateway), with exactly the claims protocol.md fixes:
//! `sub`, `role`, `rooms` (anchors only) and `exp`. The harness mints its own tokens so it
//! needs nothing from the gateway but the shared secret.

use anyhow::{Context, Result};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    role: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rooms: Option<&'a [String]>,
    exp: u64,
}

/// Mints tokens for one secret; cheap to clone.
#[derive(Clone)]
pub struct Minter {
    key: EncodingKey,
}

impl Minter {
    pub fn new(secret: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// A token that expires an hour from now.
    fn mint(&self, sub: &str, role: &str, rooms: Option<&[String]>) -> Result<String> {
        self.sign(sub, role, rooms, now()? + 3600)
    }

    fn sign(&self, sub: &str, role: &str, rooms: Option<&[String]>, exp: u64) -> Result<String> {
        let claims = Claims {
            sub,
            role,
            rooms,
            exp,
        };
        encode(&Header::default(), &claims, &self.key).context("signing token")
    }

    pub fn viewer(&self, sub: &str) -> Result<String> {
        self.mint(sub, "viewer", None)
    }

    pub fn anchor(&self, sub: &str, rooms: &[String]) -> Result<String> {
        self.mint(sub, "anchor", Some(rooms))
    }

    pub fn admin(&self, sub: &str) -> Result<String> {
        self.mint(sub, "admin", None)
    }

    /// A viewer token that expired an hour ago (for the probe).
    pub fn expired_viewer(&self, sub: &str) -> Result<String> {
        self.sign(sub, "viewer", None, now()? - 3600)
    }
}

/// Seconds since the Unix epoch.
fn now() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}
