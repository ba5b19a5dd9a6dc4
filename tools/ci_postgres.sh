#!/usr/bin/env bash
# Start a local PostgreSQL (Debian's package) with a test database for the flag-queue tests; prints its URL.
# Used by `make test`; installs the server when it is missing (root or sudo needed).
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
if ! command -v pg_lsclusters >/dev/null; then
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
ver=$(pg_lsclusters -h | awk 'NR==1{print $1}')
name=$(pg_lsclusters -h | awk 'NR==1{print $2}')
port=$(pg_lsclusters -h | awk 'NR==1{print $3}')
$SUDO pg_ctlcluster "$ver" "$name" start >&2 2>/dev/null || true
for i in $(seq 1 20); do as_pg psql -qtAc "select 1" >/dev/null 2>&1 && break; sleep 0.5; done
as_pg psql -qtAc "select 1 from pg_roles where rolname='sptest'" | grep -q 1 \
  || as_pg psql -qc "create user sptest password 'sptest'" >&2
as_pg psql -qtAc "select 1 from pg_database where datname='sptest'" | grep -q 1 \
  || as_pg psql -qc "create database sptest owner sptest" >&2
echo "postgresql://sptest:sptest@localhost:${port}/sptest"
