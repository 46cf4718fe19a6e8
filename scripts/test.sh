#!/usr/bin/env bash
# The whole suite (called by `make test`): lint, types, then unit and integration tests against real parts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/services.sh
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

step "ruff"
.venv/bin/ruff check .
step "mypy"
.venv/bin/mypy

step "PostgreSQL for the storage tests"
if ! pg_lsclusters -h 2>/dev/null | grep -q online; then
  pg_ctlcluster 15 main start
fi
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='ivr_test'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE ROLE ivr_test LOGIN PASSWORD 'ivr_test'\""
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='ivr_test'\"" | grep -q 1 ||
  su postgres -c "createdb -O ivr_test ivr_test"
export IVR_TEST_PG_URL="postgresql+asyncpg://ivr_test:ivr_test@127.0.0.1:5432/ivr_test"

step "pytest"
exec .venv/bin/pytest -p no:cacheprovider "$@"
