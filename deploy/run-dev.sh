#!/usr/bin/env bash
# Runs the gateway on a fresh Debian machine with Rust (README "Run the gateway"):
# installs and starts redis-server when none answers on LIVEGATE_REDIS_URL's default
# 127.0.0.1:6379, makes a JWT secret when none is set, and starts `livegate serve` with the
# in-process order writer and the embedded SQLite store (livegate-orders.db).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi
if [ -z "${LIVEGATE_REDIS_URL:-}" ] && ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "starting redis-server on 127.0.0.1:6379 (append-only file in ./.redis)"
  mkdir -p .redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir "$PWD/.redis" \
    --appendonly yes --appendfsync everysec --save ""
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi
if [ -z "${LIVEGATE_JWT_SECRET:-}" ]; then
  mkdir -p .livegate
  [ -s .livegate/jwt-secret ] || head -c 32 /dev/urandom | base64 > .livegate/jwt-secret
  LIVEGATE_JWT_SECRET=$(cat .livegate/jwt-secret)
  export LIVEGATE_JWT_SECRET
  echo "using the JWT secret in .livegate/jwt-secret; mint tokens with:"
  echo "  LIVEGATE_JWT_SECRET=\$(cat .livegate/jwt-secret) target/release/livegate token --sub alice --role viewer"
fi
cargo build --release --locked -p livegate --bin livegate
exec target/release/livegate serve "$@"
