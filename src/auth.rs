//! Authentication: HS256 tokens (claims `sub`, `role`, `rooms`, `exp`) and the rules of who
//! may command which room.
//!
//! This module owns token signing and checking; it must not know about connections or
//! HTTP. Every failure is a typed [`AuthError`], never a panic.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a connection is allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Anchor,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Anchor => "anchor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "anchor" => Some(Role::Anchor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The claims of a livegate token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
    pub exp: u64,
}

impl Claims {
    /// Whether these claims may run anchor commands on `room`.
    pub fn controls(&self, room: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Anchor => self.rooms.iter().any(|r| r == room),
            Role::Viewer => false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token: pass ?token=<JWT> or Authorization: Bearer <JWT>")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Signs and verifies tokens with the deployment secret.
#[derive(Clone)]
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator(HS256)")
    }
}

/// Longest user id accepted in `sub`.
pub const MAX_SUB_LEN: usize = 128;

impl Authenticator {
    pub fn new(secret: &str) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Checks a token's signature, algorithm, expiry and claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid(e.to_string()),
                }
            })?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > MAX_SUB_LEN || c.sub.chars().any(char::is_control) {
            return Err(AuthError::Invalid(format!(
                "`sub` must be 1..{MAX_SUB_LEN} characters"
            )));
        }
        if c.rooms.iter().any(|r| !crate::config::valid_id(r)) {
            return Err(AuthError::Invalid(
                "`rooms` holds an invalid room id".into(),
            ));
        }
        Ok(c)
    }

    /// A token for `sub` with `role`, valid for `ttl_s` seconds from now.
    pub fn issue(
        &self,
        sub: &str,
        role: Role,
        rooms: Vec<String>,
        ttl_s: u64,
    ) -> Result<String, AuthError> {
        self.sign(&Claims {
            sub: sub.to_string(),
            role,
            rooms,
            exp: crate::metrics::unix_ms() / 1000 + ttl_s,
        })
    }
}

/// Extracts the token from a request: `?token=` in the query, or `Authorization: Bearer`.
pub fn token_from_request(query: Option<&str>, authorization: Option<&str>) -> Option<String> {
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("token=") {
                if !v.is_empty() {
                    return Some(percent_decode(v));
                }
            }
        }
    }
    let h = authorization?.trim();
    let (scheme, rest) = h.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
        Some(rest.trim().to_string())
    } else {
        None
    }
}

/// JWTs are URL-safe already; a client may still percent-encode them.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-0123456789";

    #[test]
    fn a_signed_token_verifies() {
        let a = Authenticator::new(SECRET);
        let t = a
            .issue("u1", Role::Anchor, vec!["r1".into()], 60)
            .expect("sign");
        let c = a.verify(&t).expect("verify");
        assert_eq!(c.sub, "u1");
        assert!(c.controls("r1"));
        assert!(!c.controls("r2"));
    }

    #[test]
    fn forged_expired_and_malformed_tokens_fail() {
        let a = Authenticator::new(SECRET);
        let other = Authenticator::new("another-secret-0123456789");
        let forged = other.issue("u1", Role::Admin, vec![], 60).expect("sign");
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
        let expired = a
            .sign(&Claims {
                sub: "u".into(),
                role: Role::Viewer,
                rooms: vec![],
                exp: 1,
            })
            .expect("sign");
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        assert!(matches!(a.verify("a.b.c"), Err(AuthError::Invalid(_))));
        assert!(matches!(a.verify(""), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn viewers_control_nothing_and_admins_everything() {
        let v = Claims {
            sub: "v".into(),
            role: Role::Viewer,
            rooms: vec!["r".into()],
            exp: 0,
        };
        assert!(!v.controls("r"));
        let a = Claims {
            sub: "a".into(),
            role: Role::Admin,
            rooms: vec![],
            exp: 0,
        };
        assert!(a.controls("anything"));
    }

    #[test]
    fn tokens_are_found_in_query_or_header() {
        assert_eq!(
            token_from_request(Some("a=1&token=abc"), None).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_from_request(None, Some("Bearer xyz")).as_deref(),
            Some("xyz")
        );
        assert_eq!(
            token_from_request(None, Some("bearer  xyz ")).as_deref(),
            Some("xyz")
        );
        assert_eq!(token_from_request(Some("token="), Some("Basic q")), None);
        assert_eq!(
            token_from_request(Some("token=a%2Eb"), None).as_deref(),
            Some("a.b")
        );
        assert_eq!(
            token_from_request(Some("token=%"), None).as_deref(),
            Some("%")
        );
    }
}
