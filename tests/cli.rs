//! The `livegate` binary's operating contract: configuration errors are all listed and exit
//! 64; `token` prints a token the gateway accepts.

use std::process::Command;

use livegate::auth::{Authenticator, Role};

fn livegate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_livegate"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LIVEGATE_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn serve_without_a_secret_refuses_with_64() {
    let out = livegate().arg("serve").output().expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LIVEGATE_JWT_SECRET"), "{err}");
}

#[test]
fn every_configuration_problem_is_listed_at_once() {
    let out = livegate()
        .arg("serve")
        .env("LIVEGATE_JWT_SECRET", "a-long-enough-secret-123")
        .env("LIVEGATE_LISTEN", "not-an-address")
        .env("LIVEGATE_MAX_CONNECTIONS", "many")
        .env("LIVEGATE_ORDER_STORE", "mysql://x")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "LIVEGATE_LISTEN",
        "LIVEGATE_MAX_CONNECTIONS",
        "LIVEGATE_ORDER_STORE",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(err.contains("3 problem"), "{err}");
}

#[test]
fn token_prints_a_token_signed_with_the_secret() {
    let secret = "cli-test-secret-0123456789";
    let out = livegate()
        .args([
            "token", "--sub", "anchor-9", "--role", "anchor", "--rooms", "r1,r2", "--ttl", "60",
        ])
        .env("LIVEGATE_JWT_SECRET", secret)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let claims = Authenticator::new(secret)
        .verify(&token)
        .expect("valid token");
    assert_eq!(claims.sub, "anchor-9");
    assert_eq!(claims.role, Role::Anchor);
    assert_eq!(claims.rooms, ["r1", "r2"]);
    // Bad role, bad room id, no secret: 64 with a message.
    for args in [
        vec!["token", "--sub", "u", "--role", "king"],
        vec![
            "token", "--sub", "u", "--role", "anchor", "--rooms", "bad room",
        ],
    ] {
        let out = livegate()
            .args(&args)
            .env("LIVEGATE_JWT_SECRET", secret)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let out = livegate()
        .args(["token", "--sub", "u", "--role", "viewer"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    // A usage error is 64 too; --help is not an error.
    let out = livegate()
        .args(["serve", "--bogus"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let out = livegate().arg("--help").output().expect("runs");
    assert!(out.status.success());
}
