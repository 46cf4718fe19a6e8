#!/usr/bin/env bash
# Start Redis, the local Asterisk and ivr-bridge on the embedded defaults (called by `make run`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/services.sh
BIN=.venv/bin/ivr-bridge

printf '\033[1m==> %s\033[0m\n' "Starting Redis on 127.0.0.1:6379"
start_redis 6379 "$ROOT/var/redis"
printf '\033[1m==> %s\033[0m\n' "Starting Asterisk (instance dev)"
$BIN asterisk start
$BIN db upgrade

cat <<MSG

ivr-bridge is starting. In another terminal:
  .venv/bin/ivr-bridge call 100                    # call the hotline in English (101: Chinese, 102: choose)
  .venv/bin/ivr-bridge call 100 --digits 2,1       # send digits after each prompt
  .venv/bin/ivr-bridge interactions                # the calls stored, with the path each took
  .venv/bin/ivr-bridge flows check                 # lint the flows in flows/
A SIP softphone can register as user 'softphone' on 127.0.0.1:5060 (password: var/secrets.yaml).
Stop with Ctrl-C (Asterisk keeps answering with its fallback; stop it with: $BIN asterisk stop).

MSG
exec $BIN run
